"""RefCOCO, RefCOCO+ and RefCOCOg read as the ``refer`` toolkit distributes them.

Layout (``root`` is refer's ``data`` folder, or the dataset folder itself)::

    root/refcoco/refs(unc).p        refcoco+: refs(unc).p; refcocog: refs(umd).p or refs(google).p
    root/refcoco/instances.json     COCO-style images, annotations (polygons or RLE), categories
    root/images/mscoco/images/train2014/COCO_train2014_000000xxxxxx.jpg   (or root/train2014, image_root)

One sample per (ref, sentence), in the refs file's order::

    {"image": 3 x H x W uint8, "mask": H x W bool (the referred instance), "text": str,
     "meta": {"dataset", "split", "ref_id", "sent_id", "ann_id", "image_id", "category", "file"}}

The refs file is a Python 2 pickle of plain lists and dicts. It is read with :func:`load_plain_pickle`,
which only rebuilds builtin containers and scalars, so a tampered file cannot run code.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from langseg.data.semantic_datasets import DOCS, Transform, check_root, find_file, read_rgb
from langseg.errors import BadConfigError, BadDataError

__all__ = ["RefCOCO", "decode_segmentation", "load_plain_pickle"]

# Types a plain-data pickle may name. Everything else (functions such as eval or os.system, classes with
# custom reconstruction) is refused: the usual way a pickle executes code is by naming a callable.
_SAFE_TYPES = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
               "bool", "complex"}  # fmt: skip


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_TYPES:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def load_plain_pickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only builtin containers and scalars (never executes code).

    Python 2 ``str`` values are decoded as UTF-8 (invalid bytes replaced), the encoding of the refer
    toolkit's files.

    Raises:
        BadDataError: the file is not a plain-data pickle (or is truncated).
    """
    try:
        with open(path, "rb") as file:
            return _PlainUnpickler(file, encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise BadDataError(
            f"{path} is not a plain-data pickle: {err}",
            hint="Re-download the file; langseg only reads pickles of lists, dicts, strings and numbers.",
        ) from None


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """``H x W`` bool mask of a COCO ``segmentation``: polygons (list of ``[x0, y0, x1, y1, ...]``),
    uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str | bytes):
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise BadDataError(f"unknown segmentation format {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' Cython decoder predates numpy 2's __array__ copy rules
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
HINT = (
    "Download refcoco.zip / refcoco+.zip / refcocog.zip (refer toolkit) and the COCO train2014 images, "
    f"and lay them out as refer's data folder; see {DOCS}#refcoco-refcoco-refcocog."
)
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class RefCOCO(Dataset):
    """RefCOCO-family referring segmentation: one sample per (ref, sentence) of a split.

    Args:
        root: refer's ``data`` folder (holding ``refcoco/``, ``refcoco+/``, ``refcocog/``) or one dataset
            folder (holding ``refs(...).p`` and ``instances.json``).
        split: refcoco / refcoco+: ``train``, ``val``, ``testA``, ``testB``; refcocog ``umd``: ``train``,
            ``val``, ``test``; refcocog ``google``: ``train``, ``val``.
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog``.
        split_by: ``unc`` (refcoco, refcoco+), ``umd`` (refcocog default) or ``google``.
        image_root: folder of the COCO ``train2014`` images (default: searched under ``root``).
        text_field: ``sent`` (refer's normalised lower-case sentence) or ``raw`` (as typed by annotators).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        dataset: Literal["refcoco", "refcoco+", "refcocog"] = "refcoco",
        split_by: str | None = None,
        image_root: str | os.PathLike | None = None,
        text_field: Literal["sent", "raw"] = "sent",
        transform: Transform | None = None,
    ) -> None:
        split_by = split_by or {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}.get(dataset, "")
        if (dataset, split_by) not in SPLITS:
            valid = ", ".join(f"{d} ({s})" for d, s in SPLITS)
            raise BadConfigError(
                f"unknown dataset/split_by {dataset!r}/{split_by!r}", hint=f"Valid: {valid}."
            )
        if split not in SPLITS[dataset, split_by]:
            valid = ", ".join(SPLITS[dataset, split_by])
            raise BadConfigError(
                f"unknown split {split!r} for {dataset} ({split_by})", hint=f"Valid: {valid}."
            )
        if text_field not in ("sent", "raw"):
            raise BadConfigError(f"unknown text_field {text_field!r}", hint="Use sent or raw.")
        base = check_root(root, HINT)
        folders = [base / dataset, base]
        refs_path = find_file(folders, [f"refs({split_by}).p"], f"{dataset} refs", HINT)
        instances_path = find_file([refs_path.parent], ["instances.json"], f"{dataset} instances", HINT)
        self.image_root = self._find_images(base, image_root)
        self.dataset, self.split, self.text_field, self.transform = dataset, split, text_field, transform

        refs = load_plain_pickle(refs_path)
        if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
            raise BadDataError(f"{refs_path} does not hold a list of refs", hint=HINT)
        instances = self._load_instances(instances_path)
        self.images = {im["id"]: (im["file_name"], im["height"], im["width"]) for im in instances["images"]}
        categories = {c["id"]: c["name"] for c in instances.get("categories", [])}
        wanted = [r for r in refs if r.get("split") == split]
        for ref in wanted:
            missing = [k for k in _REF_KEYS if k not in ref]
            if missing:
                raise BadDataError(f"a ref in {refs_path} lacks {missing[0]!r}: {sorted(ref)}", hint=HINT)
        ann_ids = {r["ann_id"] for r in wanted}
        # Keep only the referred annotations: instances.json also holds every unreferred COCO object.
        self.anns = {a["id"]: a for a in instances["annotations"] if a["id"] in ann_ids}
        self.categories = categories
        self.items: list[tuple[dict, dict]] = []
        for ref in wanted:
            if ref["ann_id"] not in self.anns:
                raise BadDataError(f"ref {ref['ref_id']} names annotation {ref['ann_id']}, not in "
                                   f"{instances_path}", hint=HINT)  # fmt: skip
            if ref["image_id"] not in self.images:
                raise BadDataError(f"ref {ref['ref_id']} names image {ref['image_id']}, not in "
                                   f"{instances_path}", hint=HINT)  # fmt: skip
            self.items.extend((ref, sentence) for sentence in ref["sentences"])

    @staticmethod
    def _find_images(base: Path, image_root: str | os.PathLike | None) -> Path:
        if image_root is not None:
            path = Path(image_root).expanduser()
            if not path.is_dir():
                raise BadDataError(f"image_root {path} is not a folder", hint=HINT)
            return path
        candidates = [
            "images/mscoco/images/train2014",
            "images/train2014",
            "train2014",
            "../images/train2014",
        ]
        for candidate in candidates:
            if (base / candidate).is_dir():
                return base / candidate
        raise BadDataError(
            f"COCO train2014 images not found: expected the folder {base / candidates[0]} "
            f"(or {', '.join(str(base / c) for c in candidates[1:])})",
            hint="Pass image_root=<folder of COCO_train2014_*.jpg>, or lay the images out as in " + DOCS,
        )

    @staticmethod
    def _load_instances(path: Path) -> dict:
        try:
            instances = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadDataError(f"{path} is not valid JSON: {err}", hint=HINT) from None
        for key in ("images", "annotations"):
            if not isinstance(instances, dict) or key not in instances:
                raise BadDataError(f"{path} has no {key!r} list: not a COCO instances file", hint=HINT)
        return instances

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref, sentence = self.items[index]
        file_name, height, width = self.images[ref["image_id"]]
        image = read_rgb(self.image_root / file_name)
        if tuple(image.shape[1:]) != (height, width):
            raise BadDataError(
                f"{self.image_root / file_name} is {image.shape[2]}x{image.shape[1]}, instances.json says "
                f"{width}x{height}",
                hint="image_root must hold the COCO 2014 train images the refs were annotated on.",
            )
        ann = self.anns[ref["ann_id"]]
        mask = torch.from_numpy(decode_segmentation(ann["segmentation"], height, width))
        meta = {
            "dataset": self.dataset,
            "split": self.split,
            "ref_id": ref["ref_id"],
            "sent_id": sentence.get("sent_id"),
            "ann_id": ref["ann_id"],
            "image_id": ref["image_id"],
            "category": self.categories.get(ann.get("category_id"), ""),
            "file": file_name,
        }
        text = str(sentence.get(self.text_field, sentence.get("sent", ""))).strip()
        sample = {"image": image, "mask": mask, "text": text, "meta": meta}
        return self.transform(sample) if self.transform else sample
