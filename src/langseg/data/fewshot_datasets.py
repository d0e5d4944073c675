"""Few-shot benchmarks as LSeg's zero-shot protocol uses them: PASCAL-5i, COCO-20i and FSS-1000.

Each sample is one (image, class) pair with a binary mask of that class, and the class *name* is all a
zero-shot model gets. LSeg scores each pixel against the two prompts ``["others", name]``, so samples
carry exactly those labels (the semantic sample structure with two classes)::

    {"image": 3 x H x W uint8, "mask": H x W int64 (0 = others, 1 = the class, 255 = ignore),
     "labels": ["others", class name], "meta": {"dataset", "split", "fold", "class_id", "class_name",
     "stem", "protocol"}}

Which (image, class) pairs form a split: the *standard lists* of HSNet (which LSeg's few-shot code
copies), read from ``splits_dir`` in HSNet's ``data/splits`` layout (``pascal/{trn,val}/fold{k}.txt``,
``coco/{trn,val}/fold{k}.pkl``, ``fss/{trn,val,test}.txt``), by default ``root/splits``. They are not
shipped with langseg; see docs/data.md for where they come from. Without them PASCAL-5i and COCO-20i
*derive* the pairs from the annotations (every image where the class covers ``min_pixels``, PFENet's
2 x 32 x 32 filter) with a warning: close to, but not the same as, the published protocol.
``meta["protocol"]`` says which was used.

The classes read the benchmarks as they are by default (original sizes, every pair once, readable
names); ``size``, ``episodes`` and ``label_style`` give the published zero-shot protocol instead, which
the registered names default to (:mod:`langseg.data.fewshot_protocol` says what it is and why).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from langseg.data.annotations import entry_field, read_json, read_text, short
from langseg.data.fewshot_protocol import (
    Episodes,
    check_size,
    episode_count,
    hsnet_coco_episodes,
    resize_square,
)
from langseg.data.refcoco import decode_segmentation, load_plain_pickle
from langseg.data.semantic_datasets import (
    DOCS,
    IGNORE,
    Transform,
    check_root,
    class_names,
    find_dir,
    find_file,
    find_voc,
    read_id_list,
    read_label,
    read_rgb,
    require_all,
)
from langseg.errors import BadConfigError, BadDataError

__all__ = ["BACKGROUND", "FSS1000", "COCO20i", "PASCAL5i", "fold_classes"]

BACKGROUND = "others"  # LSeg's background prompt in its zero-shot few-shot evaluation
MIN_PIXELS = 2 * 32 * 32
LabelStyle = Literal["readable", "lseg"]
# LSeg's few-shot label files use VOC's words for five COCO classes and drop spaces ("trafficlight").
_LSEG_COCO = {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa", "tv": "tvmonitor"}


def fold_classes(benchmark: Literal["pascal-5i", "coco-20i"], fold: int) -> list[int]:
    """1-based class ids of a test fold: PASCAL-5i fold i = VOC classes 5i+1..5i+5; COCO-20i fold i =
    the 80-class indices c with (c - 1) % 4 == i (HSNet's interleaved split, which LSeg's code copies)."""
    if fold not in range(4):
        raise BadConfigError(f"fold must be 0, 1, 2 or 3, got {fold}")
    if benchmark == "pascal-5i":
        return [5 * fold + i for i in range(1, 6)]
    return [c for c in range(1, 81) if (c - 1) % 4 == fold]


_PUBLIC = {"trn": "train", "val": "val", "test": "test", "all": "all"}  # HSNet's names -> ours


def _split_kind(split: str, dataset: str) -> str:
    kinds = {"train": "trn", "trn": "trn", "val": "val", "test": "val"}  # HSNet tests on its val lists
    if split not in kinds:
        raise BadConfigError(f"unknown split {split!r} for {dataset}", hint="Valid splits: train, val, test.")
    return kinds[split]


def _splits_dir(root: Path, splits_dir: str | os.PathLike | None) -> Path | None:
    if splits_dir is not None:
        path = Path(splits_dir).expanduser()
        if not path.is_dir():
            raise BadDataError(f"splits_dir {path} is not a folder", hint=f"See {DOCS}#few-shot-split-lists.")
        return path
    return root / "splits" if (root / "splits").is_dir() else None


def _check_style(label_style: str) -> None:
    if label_style not in ("readable", "lseg"):
        raise BadConfigError(f"unknown label_style {label_style!r}", hint="Use readable or lseg.")


def _derived_warning(dataset: str) -> None:
    warnings.warn(
        f"{dataset}: no standard split lists found (splits_dir or root/splits); deriving (image, class) "
        f"pairs from the annotations. Scores are not directly comparable with published ones; see {DOCS}.",
        stacklevel=3,
    )


class _BinaryDataset(Dataset):
    """Shared ``__getitem__``: subclasses fill ``items`` and ``names`` and implement ``_load``
    (``3 x H x W`` uint8 image, ``H x W`` mask with 0, 1 and 255)."""

    dataset: str
    split: str
    fold: int | None
    protocol: str
    names: list[str]  # display name per 1-based class id - 1
    items: list[tuple[str, int]]  # (image key, 1-based class id)
    transform: Transform | None
    size: int | None = None  # square side every sample is resized to (HSNet's 480), or None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, key: str, class_id: int) -> tuple[torch.Tensor, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, class_id = self.items[index]
        image, mask = self._load(key, class_id)
        if mask.shape != tuple(image.shape[1:]):
            raise BadDataError(
                f"the mask of {key} is {mask.shape[1]}x{mask.shape[0]}, its image "
                f"{image.shape[2]}x{image.shape[1]}",
                hint="The image and annotation files are from different releases; re-extract both.",
            )
        height, width = mask.shape
        if self.size is not None:
            image, mask = resize_square(image, mask, self.size)
        name = self.names[class_id - 1]
        meta = {"dataset": self.dataset, "split": self.split, "fold": self.fold, "class_id": class_id}
        meta.update(class_name=name, stem=Path(key).stem, protocol=self.protocol, image_size=(height, width))
        mask_t = torch.from_numpy(mask.astype(np.int64))
        sample = {"image": image, "mask": mask_t, "labels": [BACKGROUND, name], "meta": meta}
        return self.transform(sample) if self.transform else sample

    @property
    def class_names(self) -> list[str]:
        """Names of the classes that occur in this split, in class-id order."""
        return [self.names[c - 1] for c in sorted({c for _, c in self.items})]


# ----------------------------------------------------------------------------------------------- PASCAL-5i

PASCAL_HINT = (
    "PASCAL-5i uses VOC 2012 (JPEGImages, SegmentationClass or the SBD-augmented SegmentationClassAug) "
    f"and optionally HSNet's split lists in splits/pascal/; see {DOCS}#pascal-5i."
)


class PASCAL5i(_BinaryDataset):
    """PASCAL-5i: fold ``k`` tests VOC classes 5k+1..5k+5; training uses the other 15.

    Masks come from ``SegmentationClassAug`` when present (as HSNet reads them), else
    ``SegmentationClass``; VOC's 255 borders stay 255 (ignored, as HSNet's ``query_ignore_idx``).

    Args:
        root: ``VOCdevkit``, ``VOCdevkit/VOC2012`` or the folder holding them.
        split: ``val`` / ``test`` (the fold's classes) or ``train`` (the other folds' classes).
        fold: 0..3.
        splits_dir: HSNet's ``data/splits`` folder (default ``root/splits`` if present).
        label_style: ``readable`` ("dining table") or ``lseg`` (VOC's "diningtable", LSeg's prompts).
        min_pixels: class-pixel threshold when deriving pairs without standard lists.
        size: resize every image and mask to ``size x size`` (:func:`resize_square`, HSNet's 480);
            ``None`` keeps the original size.
        episodes: ``None``: every pair once; an int ``n``: ``n`` episodes cycling through the pairs in
            list order, as HSNet's test loader does (``idx % len``: with its 1000 episodes and fold 0's
            346 pairs, the first 308 pairs are scored three times, the rest twice); ``"hsnet"``: 1000
            for ``val``/``test``, every pair once for ``train``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        fold: int = 0,
        splits_dir: str | os.PathLike | None = None,
        label_style: LabelStyle = "readable",
        min_pixels: int = MIN_PIXELS,
        transform: Transform | None = None,
        size: int | None = None,
        episodes: Episodes = None,
    ) -> None:
        kind = _split_kind(split, "pascal-5i")
        _check_style(label_style)
        check_size(size)
        count = episode_count(episodes, kind)
        test_classes = fold_classes("pascal-5i", fold)
        classes = test_classes if kind == "val" else [c for c in range(1, 21) if c not in test_classes]
        voc = find_voc(root, "2012", PASCAL_HINT)
        aug = voc / "SegmentationClassAug"
        self.masks = aug if aug.is_dir() else find_dir(voc, ["SegmentationClass"], "VOC masks", PASCAL_HINT)
        self.images = voc / "JPEGImages"
        self.dataset, self.split, self.fold, self.transform = "pascal-5i", _PUBLIC[kind], fold, transform
        self.size = size
        names = class_names("voc-21")[1:]
        self.names = [n.replace(" ", "") for n in names] if label_style == "lseg" else names
        lists = _splits_dir(Path(root).expanduser(), splits_dir)
        if lists is not None:
            folds = [fold] if kind == "val" else [k for k in range(4) if k != fold]
            files = [lists / "pascal" / kind / f"fold{k}.txt" for k in folds]
            self.items = [item for f in files for item in self._read_list(f)]
            self.protocol = "standard"
        else:
            _derived_warning("pascal-5i")
            self.items = self._derive(voc, kind, set(classes), min_pixels)
            self.protocol = "derived"
        if not self.items:
            raise BadDataError(f"pascal-5i {kind} fold {fold} has no (image, class) pairs", hint=PASCAL_HINT)
        if count is not None:
            self.items = [self.items[i % len(self.items)] for i in range(count)]
        require_all(self.images, sorted({f"{s}.jpg" for s, _ in self.items}), "PASCAL-5i images", PASCAL_HINT)
        require_all(self.masks, sorted({f"{s}.png" for s, _ in self.items}), "PASCAL-5i masks", PASCAL_HINT)

    @staticmethod
    def _read_list(path: Path) -> list[tuple[str, int]]:
        """HSNet's ``<image id>__<class id, 2 digits>`` lines."""
        if not path.is_file():
            raise BadDataError(f"split list {path} not found", hint=PASCAL_HINT)
        items = []
        for line in read_text(path, "split list", PASCAL_HINT).split():
            match = re.fullmatch(r"(.+)__(\d+)", line)
            if match is None or not 1 <= int(match[2]) <= 20:
                raise BadDataError(f"{path}: {line!r} is not '<image>__<class 1-20>'", hint=PASCAL_HINT)
            items.append((match[1], int(match[2])))
        return items

    def _derive(self, voc: Path, kind: str, classes: set[int], min_pixels: int) -> list[tuple[str, int]]:
        lists = voc / "ImageSets" / "Segmentation"
        names = ["train_aug.txt", "trainaug.txt", "aug.txt", "train.txt"] if kind == "trn" else ["val.txt"]
        if self.masks.name != "SegmentationClassAug":
            names = [n for n in names if "aug" not in n]
        list_file = find_file([lists, voc, voc.parent], names, "VOC image list", PASCAL_HINT)
        pairs: dict[int, list[str]] = defaultdict(list)
        for stem in read_id_list(list_file):
            counts = np.bincount(read_label(self.masks / f"{stem}.png").ravel(), minlength=256)
            for c in sorted(classes):
                if counts[c] >= min_pixels:
                    pairs[c].append(stem)
        return [(stem, c) for c in sorted(pairs) for stem in pairs[c]]

    def _load(self, key: str, class_id: int) -> tuple[torch.Tensor, np.ndarray]:
        values = read_label(self.masks / f"{key}.png")
        mask = np.where(values == IGNORE, IGNORE, (values == class_id).astype(np.uint8))
        return read_rgb(self.images / f"{key}.jpg"), mask


# ----------------------------------------------------------------------------------------------- COCO-20i

COCO_HINT = (
    "COCO-20i uses COCO 2014: train2014/, val2014/ and annotations/instances_{train,val}2014.json "
    f"(or HSNet's COCO2014 folder with annotation PNGs), optionally HSNet's splits/coco/ lists; see "
    f"{DOCS}#coco-20i."
)


class COCO20i(_BinaryDataset):
    """COCO-20i: fold ``k`` tests the 20 classes ``c`` (1..80, COCO's category order) with
    ``(c - 1) % 4 == k``; training uses the other 60.

    A class mask is the union of every instance of that class in the image (crowd regions included),
    decoded from ``instances_*2014.json``; with HSNet's converted layout (``annotations/val2014/*.png``
    holding class indices 1..80, no JSON) those PNGs are read instead.

    Args:
        root: folder holding ``train2014/``, ``val2014/``, ``annotations/`` (or ``root/COCO2014``).
        split: ``val`` / ``test`` (on val2014) or ``train`` (on train2014).
        fold: 0..3.
        splits_dir: HSNet's ``data/splits`` (default ``root/splits`` if present).
        label_style: ``readable`` ("traffic light") or ``lseg`` ("trafficlight", "motorbike", ...).
        min_pixels: class area threshold when deriving pairs (annotation areas summed).
        size: resize every image and mask to ``size x size`` (:func:`resize_square`, HSNet's 480);
            ``None`` keeps the original size.
        episodes: ``None``: every pair once; an int ``n``: ``n`` (image, class) pairs drawn as HSNet's
            ``DatasetCOCO.load_frame`` draws them (a class uniformly, then one of its images, each with
            ``np.random.choice(..., 1, replace=False)``) from ``np.random.RandomState(seed)``: with the
            standard lists and ``seed=0`` (``fix_randseed(0)`` in ``test_lseg_zs.py``), the very
            episodes of the published numbers; ``"hsnet"``: 1000 for ``val``/``test``, every pair once
            for ``train``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        fold: int = 0,
        splits_dir: str | os.PathLike | None = None,
        label_style: LabelStyle = "readable",
        min_pixels: int = MIN_PIXELS,
        episodes: Episodes = None,
        seed: int = 0,
        transform: Transform | None = None,
        size: int | None = None,
    ) -> None:
        kind = _split_kind(split, "coco-20i")
        _check_style(label_style)
        check_size(size)
        count = episode_count(episodes, kind)
        test_classes = fold_classes("coco-20i", fold)
        classes = test_classes if kind == "val" else [c for c in range(1, 81) if c not in test_classes]
        base = check_root(root, COCO_HINT)
        base = base / "COCO2014" if (base / "COCO2014").is_dir() else base
        coco_split = "val2014" if kind == "val" else "train2014"
        self.images = find_dir(base, [coco_split, f"images/{coco_split}"], "COCO 2014 images", COCO_HINT)
        self.dataset, self.split, self.fold, self.transform = "coco-20i", _PUBLIC[kind], fold, transform
        self.size = size
        names = class_names("coco-80")
        lseg_names = [_LSEG_COCO.get(n, n).replace(" ", "") for n in names]
        self.names = lseg_names if label_style == "lseg" else names
        json_path = base / "annotations" / f"instances_{coco_split}.json"
        self.png_dir: Path | None = None
        if json_path.is_file():
            pairs = self._index_json(json_path, set(classes), min_pixels)
        elif (base / "annotations" / coco_split).is_dir():
            self.png_dir, pairs = base / "annotations" / coco_split, {}
        else:
            raise BadDataError(
                f"COCO annotations not found: expected the file {json_path} "
                f"(or HSNet's folder {base / 'annotations' / coco_split})",
                hint=COCO_HINT,
            )
        lists = _splits_dir(Path(root).expanduser(), splits_dir)
        if lists is not None:
            pairs = self._read_list(lists / "coco" / kind / f"fold{fold}.pkl", set(classes))
            self.protocol = "standard"
        elif self.png_dir is not None:
            raise BadDataError(
                "HSNet's COCO annotation PNGs need HSNet's split lists (splits/coco/*/fold*.pkl)",
                hint=f"Pass splits_dir=<HSNet data/splits>, or use instances_{coco_split}.json.",
            )
        else:
            _derived_warning("coco-20i")
            self.protocol = "derived"
        self.items = [(name, c) for c in sorted(pairs) for name in pairs[c]]
        if count is not None:
            self.items = hsnet_coco_episodes(pairs, count, seed)
        if not self.items:
            raise BadDataError(f"coco-20i {kind} fold {fold} has no (image, class) pairs", hint=COCO_HINT)
        require_all(self.images, sorted({n for n, _ in self.items}), "COCO-20i images", COCO_HINT)
        unknown = [n for n, _ in self.items if self.png_dir is None and n not in self.sizes]
        if unknown:
            raise BadDataError(f"{unknown[0]} is in the split list but not in {json_path}", hint=COCO_HINT)

    def _index_json(self, path: Path, classes: set[int], min_pixels: int) -> dict[int, list[str]]:
        """Index the class instances of ``classes`` per (file name, class); return derived pairs."""
        data = read_json(path, "COCO instances file", COCO_HINT)
        where = f"{path} (a COCO instances file)"
        categories, image_list, annotations = (
            entry_field(data, key, list, where, COCO_HINT) for key in ("categories", "images", "annotations")
        )
        cat_ids = sorted({entry_field(c, "id", int, f"{path}: categories[{i}]", COCO_HINT)
                          for i, c in enumerate(categories)})  # fmt: skip
        images = {}
        for i, im in enumerate(image_list):
            at = f"{path}: images[{i}]"
            images[entry_field(im, "id", int, at, COCO_HINT)] = (
                entry_field(im, "file_name", str, at, COCO_HINT),
                entry_field(im, "height", int, at, COCO_HINT),
                entry_field(im, "width", int, at, COCO_HINT),
            )
        if len(cat_ids) != 80:
            raise BadDataError(f"{path} has {len(cat_ids)} categories, COCO has 80", hint=COCO_HINT)
        index_of = {cat: i + 1 for i, cat in enumerate(cat_ids)}  # COCO id -> 1..80
        self.segments: dict[tuple[str, int], list[Any]] = defaultdict(list)
        self.sizes = {name: (h, w) for name, h, w in images.values()}
        area: dict[tuple[str, int], float] = defaultdict(float)
        for i, ann in enumerate(annotations):
            at = f"{path}: annotations[{i}]"
            category = entry_field(ann, "category_id", int, at, COCO_HINT)
            image_id = entry_field(ann, "image_id", int, at, COCO_HINT)
            if category not in index_of:
                raise BadDataError(
                    f"{at}: unknown category_id {category} (not in 'categories')", hint=COCO_HINT
                )
            if image_id not in images:
                raise BadDataError(f"{at}: unknown image_id {image_id} (not in 'images')", hint=COCO_HINT)
            c = index_of[category]
            if c in classes:
                key = (images[image_id][0], c)
                self.segments[key].append(entry_field(ann, "segmentation", (list, dict), at, COCO_HINT))
                value = ann.get("area", 0.0)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise BadDataError(f"{at}: 'area' must be a number, got {short(value)}", hint=COCO_HINT)
                area[key] += value
        pairs: dict[int, list[str]] = defaultdict(list)
        for name, c in sorted(area, key=lambda k: (k[1], k[0])):
            if area[name, c] >= min_pixels:
                pairs[c].append(name)
        return pairs

    def _read_list(self, path: Path, classes: set[int]) -> dict[int, list[str]]:
        """HSNet's pickle: {0-based class: ['val2014/COCO_val2014_....jpg', ...]} (plain data only)."""
        if not path.is_file():
            raise BadDataError(f"split list {path} not found", hint=COCO_HINT)
        data = load_plain_pickle(path)
        shape_ok = isinstance(data, dict) and all(
            isinstance(k, int) and not isinstance(k, bool) and isinstance(v, (list, tuple))
            and all(isinstance(n, str) and "\x00" not in n for n in v)
            for k, v in data.items()
        )  # fmt: skip
        if not shape_ok:
            raise BadDataError(
                f"{path} is not a {{class index: [image file name, ...]}} dict", hint=COCO_HINT
            )
        return {k + 1: [Path(n).name for n in v] for k, v in data.items() if k + 1 in classes}

    def _load(self, key: str, class_id: int) -> tuple[torch.Tensor, np.ndarray]:
        image = read_rgb(self.images / key)
        if self.png_dir is not None:
            values = read_label(self.png_dir / f"{Path(key).stem}.png")
            return image, (values == class_id).astype(np.uint8)
        height, width = self.sizes[key]
        mask = np.zeros((height, width), dtype=np.uint8)
        for segmentation in self.segments.get((key, class_id), []):
            mask |= decode_segmentation(
                segmentation, height, width, f"a class {class_id} annotation of {key}"
            )
        return image, mask


# ----------------------------------------------------------------------------------------------- FSS-1000

FSS_HINT = (
    "FSS-1000: pass the folder of the 1000 class folders (<class>/<n>.jpg + <n>.png), e.g. "
    "fewshot_data/ or FSS-1000/, with HSNet's splits/fss/{trn,val,test}.txt for the standard splits; "
    f"see {DOCS}#fss-1000."
)


class FSS1000(_BinaryDataset):
    """FSS-1000: 1000 classes of 10 images; HSNet's split uses 520 train, 240 val and 240 test classes.

    Masks are thresholded at 128 after greyscale conversion, as HSNet does (the PNGs are anti-aliased).

    Args:
        root: the folder of class folders, or one holding ``FSS-1000/`` or ``fewshot_data/``.
        split: ``test``, ``val`` or ``train`` (needs the split lists) or ``all`` (every class folder).
        splits_dir: HSNet's ``data/splits`` (default ``root/splits`` if present).
        label_style: ``readable`` (folder name, ``_`` -> space) or ``lseg`` (the folder name verbatim).
        size: resize every image and mask to ``size x size`` (:func:`resize_square`, HSNet's 480);
            ``None`` keeps the original size (224 x 224 for FSS-1000 itself).

    Every image of every class is one episode (HSNet's zero-shot test: 240 x 10 = 2400).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        splits_dir: str | os.PathLike | None = None,
        label_style: LabelStyle = "readable",
        transform: Transform | None = None,
        size: int | None = None,
    ) -> None:
        kinds = {"train": "trn", "trn": "trn", "val": "val", "test": "test", "all": "all"}
        if split not in kinds:
            raise BadConfigError(f"unknown split {split!r} for fss1000", hint="Valid: train, val, test, all.")
        _check_style(label_style)
        check_size(size)
        given = check_root(root, FSS_HINT)
        base = next((given / s for s in ("FSS-1000", "fewshot_data") if (given / s).is_dir()), given)
        kind = kinds[split]
        if kind == "all":
            categories = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "splits")
        else:
            lists = _splits_dir(given, splits_dir)
            list_file = (lists or given / "splits") / "fss" / f"{kind}.txt"
            if not list_file.is_file():
                raise BadDataError(f"FSS-1000 split list {list_file} not found", hint=FSS_HINT)
            text = read_text(list_file, "FSS-1000 split list", FSS_HINT)
            categories = sorted(line.strip() for line in text.splitlines() if line.strip())
        if not categories:
            raise BadDataError(f"no FSS-1000 class folders under {base}", hint=FSS_HINT)
        require_all(base, categories, "FSS-1000 class folders", FSS_HINT)
        self.base, self.dataset, self.split, self.transform = base, "fss1000", _PUBLIC[kind], transform
        self.fold, self.size = None, size
        self.protocol = "all" if kind == "all" else "standard"
        self.names = categories if label_style == "lseg" else [c.replace("_", " ") for c in categories]
        self.items = []
        for c, category in enumerate(categories, start=1):
            stems = sorted((p.stem for p in (base / category).glob("*.jpg")), key=_natural)
            require_all(base / category, [f"{s}.png" for s in stems], f"masks of {category}", FSS_HINT)
            self.items.extend((f"{category}/{s}", c) for s in stems)

    def _load(self, key: str, class_id: int) -> tuple[torch.Tensor, np.ndarray]:
        path = self.base / f"{key}.png"
        try:
            with Image.open(path) as image:
                grey = np.asarray(image.convert("L"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BadDataError(f"cannot read mask {path}: {err}", hint=FSS_HINT) from None
        return read_rgb(self.base / f"{key}.jpg"), (grey >= 128).astype(np.uint8)


def _natural(stem: str) -> tuple[int, str]:
    """Sort ``1, 2, ..., 10`` numerically (file names are image numbers)."""
    return (int(stem), "") if stem.isdigit() else (1 << 30, stem)
