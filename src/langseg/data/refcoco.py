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
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from langseg.data.annotations import check_segmentation, entry_field, read_json, short
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
    except OSError as err:
        raise BadDataError(f"cannot read {path}: {err.strerror or err}", hint="Check the file.") from None
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
        MemoryError, RecursionError, OverflowError,
    ) as err:  # fmt: skip
        raise BadDataError(
            f"{path} is not a plain-data pickle: {err}",
            hint="Re-download the file; langseg only reads pickles of lists, dicts, strings and numbers.",
        ) from None


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "annotation") -> np.ndarray:
    """``H x W`` bool mask of a COCO ``segmentation``: polygons (list of ``[x0, y0, x1, y1, ...]``),
    uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string).

    Raises:
        BadDataError: malformed (checked before pycocotools, whose decoder can loop for ever on bad
            input); ``where`` names the file and entry in the message.
    """
    check_segmentation(segmentation, height, width, where, hint=HINT)
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str | bytes):
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:  # pragma: no cover - check_segmentation refused it
        raise BadDataError(f"{where}: unknown segmentation format {type(segmentation).__name__}", hint=HINT)
    try:
        with warnings.catch_warnings():  # pycocotools' Cython decoder predates numpy 2's __array__ rules
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except Exception as err:
        raise BadDataError(f"{where}: cannot decode the segmentation: {err}", hint=HINT) from None


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
_REF_TYPES: dict[str, type | tuple[type, ...]] = {
    "ref_id": int, "ann_id": int, "image_id": int, "split": str, "sentences": list,
}  # fmt: skip


def _image_table(images: list, path: Path) -> dict[int, tuple[str, int, int]]:
    """``{image id: (file name, height, width)}`` of a COCO ``images`` list, each entry checked."""
    table = {}
    for i, image in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = entry_field(image, "id", int, where, HINT)
        name = entry_field(image, "file_name", str, where, HINT)
        height, width = (entry_field(image, k, int, where, HINT) for k in ("height", "width"))
        if not (0 < height <= 65535 and 0 < width <= 65535) or "\x00" in name or Path(name).is_absolute():
            raise BadDataError(f"{where}: bad file_name or size {short(image)}", hint=HINT)
        table[image_id] = (name, height, width)
    return table


def _category_table(categories: Any, path: Path) -> dict[int, str]:
    if not isinstance(categories, list):
        raise BadDataError(f"{path}: 'categories' must be a list, got {short(categories)}", hint=HINT)
    return {
        entry_field(c, "id", int, f"{path}: categories[{i}]", HINT): entry_field(
            c, "name", str, f"{path}: categories[{i}]", HINT
        )
        for i, c in enumerate(categories)
    }


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
        self.images = _image_table(instances["images"], instances_path)
        categories = _category_table(instances.get("categories", []), instances_path)
        wanted = [r for r in refs if r.get("split") == split]
        for i, ref in enumerate(wanted):
            where = f"{refs_path}: ref {i} of split {split}"
            for key, types in _REF_TYPES.items():
                entry_field(ref, key, types, where, HINT)
            for j, sentence in enumerate(ref["sentences"]):
                text = sentence.get(text_field, sentence.get("sent")) if isinstance(sentence, dict) else None
                if not isinstance(text, str):
                    raise BadDataError(
                        f"{where}: sentence {j} has no {text_field!r} (or 'sent') text: {short(sentence)}",
                        hint=HINT,
                    )
        ann_ids = {r["ann_id"] for r in wanted}
        # Keep only the referred annotations: instances.json also holds every unreferred COCO object.
        self.anns = {}
        for i, ann in enumerate(instances["annotations"]):
            ann_id = entry_field(ann, "id", int, f"{instances_path}: annotation {i}", HINT)
            if ann_id in ann_ids:
                entry_field(
                    ann, "segmentation", (list, dict), f"{instances_path}: annotation id {ann_id}", HINT
                )
                self.anns[ann_id] = ann
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
        instances = read_json(path, "COCO instances file", HINT)
        for key in ("images", "annotations"):
            entry_field(instances, key, list, f"{path} (a COCO instances file)", HINT)
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
        where = f"annotation {ref['ann_id']} of {self.dataset} (ref {ref['ref_id']})"
        mask = torch.from_numpy(decode_segmentation(ann["segmentation"], height, width, where))
        category = ann.get("category_id")
        meta = {
            "dataset": self.dataset,
            "split": self.split,
            "ref_id": ref["ref_id"],
            "sent_id": sentence.get("sent_id"),
            "ann_id": ref["ann_id"],
            "image_id": ref["image_id"],
            "category": self.categories.get(category, "") if isinstance(category, int) else "",
            "file": file_name,
        }
        text = sentence.get(self.text_field, sentence.get("sent", "")).strip()
        sample = {"image": image, "mask": mask, "text": text, "meta": meta}
        return self.transform(sample) if self.transform else sample
