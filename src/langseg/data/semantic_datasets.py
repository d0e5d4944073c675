"""Semantic segmentation benchmarks read as users download them: ADE20K, PASCAL VOC 2012, PASCAL Context
and COCO-Stuff. No conversion step: each loader maps the label values of the distributed PNGs to class
indices on the fly with a 256-entry lookup table.

Every dataset returns ShapeWorld's semantic sample structure::

    {"image": 3 x H x W uint8 RGB, "mask": H x W int64 class indices (255 = ignore),
     "labels": class names (index = class), "meta": {"dataset", "split", "stem", "image", "mask"}}

Layouts, class conventions and their sources are in docs/data.md. The file helpers here (root
resolution, image and label reading, class-name files) are shared by the few-shot and RefCOCO loaders.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from langseg.data.annotations import read_text
from langseg.errors import BadConfigError, BadDataError

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]
IGNORE = 255
DOCS = "docs/data.md"

__all__ = [
    "ADE20K",
    "VOC2012",
    "COCOStuff",
    "LabelMapDataset",
    "PascalContext",
    "class_names",
    "read_label",
    "read_rgb",
]


# ----------------------------------------------------------------------------------------------- files


def class_names(name: str) -> list[str]:
    """Class names shipped in ``langseg/data/classnames/<name>.txt`` (one per line, index order)."""
    path = resources.files("langseg.data").joinpath("classnames", f"{name}.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def check_root(root: str | os.PathLike, hint: str) -> Path:
    """``root`` as a Path, or BadDataError if it is not an existing folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise BadDataError(f"dataset root {path} does not exist or is not a folder", hint=hint)
    return path


def find_dir(base: Path, candidates: Sequence[str], what: str, hint: str) -> Path:
    """The first ``base / candidate`` that is a folder; otherwise BadDataError naming every candidate."""
    for candidate in candidates:
        if (base / candidate).is_dir():
            return base / candidate
    more = f" (or {', '.join(str(base / c) for c in candidates[1:])})" if len(candidates) > 1 else ""
    raise BadDataError(f"{what} not found: expected the folder {base / candidates[0]}{more}", hint=hint)


def find_file(bases: Sequence[Path], names: Sequence[str], what: str, hint: str) -> Path:
    """The first existing ``base / name`` over every base and name; otherwise BadDataError."""
    for base in bases:
        for name in names:
            if (base / name).is_file():
                return base / name
    tried = [str(b / n) for b in bases for n in names]
    more = f" (or {', '.join(tried[1:])})" if len(tried) > 1 else ""
    raise BadDataError(f"{what} not found: expected the file {tried[0]}{more}", hint=hint)


def read_id_list(path: Path) -> list[str]:
    """Image ids from a list file: one id per line, or DeepLab's ``/JPEGImages/X.jpg /Seg.../X.png``
    pairs (the common ``train_aug.txt``), from which the id ``X`` is taken."""
    ids = []
    for line in read_text(path, "image list", "Re-download or re-extract the list file.").splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    if not ids:
        raise BadDataError(f"{path} lists no images", hint="Re-download or re-extract the list file.")
    return ids


def missing_files(folder: Path, names: Sequence[str]) -> list[str]:
    """Those of ``names`` not in ``folder`` (one directory listing instead of a stat per file)."""
    try:
        present = set(os.listdir(folder))
    except OSError as err:
        raise BadDataError(
            f"cannot list {folder}: {err.strerror or err}", hint="Check its permissions."
        ) from None
    return [n for n in names if n not in present]


def require_all(folder: Path, names: Sequence[str], what: str, hint: str) -> None:
    """BadDataError naming the first missing file if any of ``names`` is not in ``folder``."""
    missing = missing_files(folder, names)
    if missing:
        raise BadDataError(
            f"{len(missing)} of {len(names)} {what} missing, e.g. {folder / missing[0]}", hint=hint
        )


def read_rgb(path: Path) -> torch.Tensor:
    """``3 x H x W`` uint8 RGB. EXIF orientation is deliberately not applied: every benchmark's masks
    are drawn on the stored pixel grid. torchvision's libjpeg-turbo decoder writes channels-first
    directly, about twice as fast as PIL plus a transpose; PIL is the fallback for what it cannot read.
    """
    if not path.is_file():
        raise BadDataError(f"image {path} not found", hint=f"Check the dataset layout against {DOCS}.")
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file

        # torchvision 0.29 deprecates its decoders in favour of torchcodec (warning on every call); they
        # remain the fastest here, and once removed the ImportError below falls back to PIL.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (ImportError, AttributeError, RuntimeError, ValueError):
        pass
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadDataError(f"cannot read image {path}: {err}", hint="Re-download the file.") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_label(path: Path) -> np.ndarray:
    """``H x W`` uint8 label values of an 8-bit (palette or greyscale) label PNG.

    A palette PNG read this way gives palette *indices*, which is what VOC's class values are; an RGB
    rendering of a mask would give colours, so it is refused rather than silently mis-read.
    """
    if not path.is_file():
        raise BadDataError(f"label map {path} not found", hint=f"Check the dataset layout against {DOCS}.")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise BadDataError(
                    f"{path} is a {image.mode} image, expected an 8-bit label PNG (palette or greyscale)",
                    hint=f"Use the label maps as distributed, not colour renderings; see {DOCS}.",
                )
            return np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadDataError(f"cannot read label map {path}: {err}", hint="Re-download the file.") from None


def lut_from(pairs: dict[int, int]) -> np.ndarray:
    """256-entry int64 lookup table: ``lut[v] = pairs[v]``, every other value -> 255 (ignore)."""
    lut = np.full(256, IGNORE, dtype=np.int64)
    for value, index in pairs.items():
        lut[value] = index
    return lut


def normalise_split(split: str, aliases: dict[str, str], dataset: str) -> str:
    if split not in aliases:
        valid = ", ".join(sorted(aliases))
        raise BadConfigError(f"unknown split {split!r} for {dataset}", hint=f"Valid splits: {valid}.")
    return aliases[split]


# ----------------------------------------------------------------------------------------------- base


class LabelMapDataset(Dataset):
    """(image, label PNG) pairs whose 8-bit label values map to class indices through ``lut``.

    Args:
        dataset: registry name, recorded in ``meta``.
        split: split name, recorded in ``meta``.
        items: ``(stem, image path, label PNG path)`` per sample.
        labels: ``K`` class names; the mask holds ``0..K-1`` and 255.
        lut: ``256`` int64 entries, label value -> class index (255 = ignore).
        transform: applied to each sample dict (augmentation is the engine's job; this is for users).
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        items: list[tuple[str, Path, Path]],
        labels: list[str],
        lut: np.ndarray,
        transform: Transform | None = None,
    ) -> None:
        self.dataset, self.split, self.items = dataset, split, items
        self.labels, self.lut, self.transform = labels, lut, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        stem, image_path, mask_path = self.items[index]
        image = read_rgb(image_path)
        values = read_label(mask_path)
        if values.shape != tuple(image.shape[1:]):
            raise BadDataError(
                f"{mask_path} is {values.shape[1]}x{values.shape[0]} but its image {image_path} is "
                f"{image.shape[2]}x{image.shape[1]}",
                hint="The image and label folders are from different releases; re-extract both.",
            )
        meta = {"dataset": self.dataset, "split": self.split, "stem": stem}
        meta.update(image=str(image_path), mask=str(mask_path))
        # np.take is ~5x faster than fancy indexing lut[values] for a 256-entry table.
        mask = torch.from_numpy(np.take(self.lut, values))
        sample = {"image": image, "mask": mask, "labels": self.labels, "meta": meta}
        return self.transform(sample) if self.transform else sample


def _pairs(stems: list[str], images: Path, masks: Path, image_ext: str, hint: str) -> list:
    require_all(images, [s + image_ext for s in stems], f"images of {images}", hint)
    require_all(masks, [s + ".png" for s in stems], f"label maps of {masks}", hint)
    return [(s, images / f"{s}{image_ext}", masks / f"{s}.png") for s in stems]


# ----------------------------------------------------------------------------------------------- ADE20K

ADE_HINT = (
    "Download ADEChallengeData2016.zip (MIT Scene Parsing Benchmark), unzip it and pass the "
    f"ADEChallengeData2016 folder or its parent as root; see {DOCS}#ade20k."
)


def lseg_ade_names(names: list[str]) -> list[str]:
    """LSeg's ADE20K prompts: its label file joins words with ';' and keeps the first token, so every
    multi-word name is cut to its first word ("chest of drawers" -> "chest", "traffic light" -> "traffic").
    """
    return [name.split()[0] for name in names]


class ADE20K(LabelMapDataset):
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes.

    Label PNG values: 0 = "other" (ignored), ``k`` in 1..150 -> class ``k - 1``.

    Args:
        root: ``ADEChallengeData2016`` or the folder that contains it.
        split: ``train`` / ``training`` (20,210 images) or ``val`` / ``validation`` (2,000).
        label_style: ``readable`` (first name of each objectInfo150 row, e.g. "chest of drawers") or
            ``lseg`` (LSeg's truncated first words, to reproduce its numbers).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        label_style: Literal["readable", "lseg"] = "readable",
        transform: Transform | None = None,
    ) -> None:
        sub = normalise_split(
            split,
            {"train": "training", "training": "training", "val": "validation", "validation": "validation"},
            "ade20k",
        )
        base = check_root(root, ADE_HINT)
        if not (base / "images").is_dir() and (base / "ADEChallengeData2016").is_dir():
            base = base / "ADEChallengeData2016"
        images = find_dir(base, [f"images/{sub}"], "ADE20K images", ADE_HINT)
        masks = find_dir(base, [f"annotations/{sub}"], "ADE20K annotations", ADE_HINT)
        stems = sorted(p.stem for p in images.glob("*.jpg"))
        if not stems:
            raise BadDataError(f"no .jpg images in {images}", hint=ADE_HINT)
        names = class_names("ade20k-150")
        if label_style not in ("readable", "lseg"):
            raise BadConfigError(f"unknown label_style {label_style!r}", hint="Use readable or lseg.")
        labels = lseg_ade_names(names) if label_style == "lseg" else names
        lut = lut_from({k: k - 1 for k in range(1, 151)})
        super().__init__(
            "ade20k", sub, _pairs(stems, images, masks, ".jpg", ADE_HINT), labels, lut, transform
        )


# ----------------------------------------------------------------------------------------------- VOC

VOC_HINT = (
    "Download VOCtrainval_11-May-2012.tar (PASCAL VOC 2012) and pass VOCdevkit or VOCdevkit/VOC2012 "
    "as root; for split train_aug add SegmentationClassAug/ and train_aug.txt (SBD, as distributed for "
    f"DeepLab); see {DOCS}#pascal-voc-2012."
)
VOC_SPLITS = {
    "train": "train",
    "val": "val",
    "trainval": "trainval",
    "train_aug": "train_aug",
    "trainaug": "train_aug",
    "aug": "train_aug",
}


def find_voc(root: str | os.PathLike, year: str, hint: str) -> Path:
    """The ``VOC<year>`` folder: ``root`` itself, ``root/VOC<year>`` or ``root/VOCdevkit/VOC<year>``."""
    base = check_root(root, hint)
    for candidate in (base, base / f"VOC{year}", base / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise BadDataError(
        f"no VOC{year} folder under {base}: expected {base / 'VOCdevkit' / f'VOC{year}' / 'JPEGImages'} "
        f"(or {base / f'VOC{year}' / 'JPEGImages'}, {base / 'JPEGImages'})",
        hint=hint,
    )


class VOC2012(LabelMapDataset):
    """PASCAL VOC 2012 segmentation: 20 classes plus background.

    Label PNG values: 0 = background, 1..20 = classes, 255 = object borders and difficult regions
    (ignored). With ``background=False`` (the 20-class setting of training-free papers) background is
    ignored too and classes become 0..19.

    Args:
        root: ``VOCdevkit``, ``VOCdevkit/VOC2012`` or the folder holding ``VOCdevkit``.
        split: ``train`` (1,464), ``val`` (1,449), ``trainval``, or ``train_aug`` (10,582: SBD-augmented
            list ``train_aug.txt`` with masks from ``SegmentationClassAug``).
        background: keep background as class 0.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        background: bool = True,
        transform: Transform | None = None,
    ) -> None:
        split = normalise_split(split, VOC_SPLITS, "voc2012")
        voc = find_voc(root, "2012", VOC_HINT)
        if split == "train_aug":
            masks = find_dir(voc, ["SegmentationClassAug"], "SBD masks", VOC_HINT)
            names = ["train_aug.txt", "trainaug.txt", "aug.txt"]
            list_file = find_file(
                [voc / "ImageSets/Segmentation", voc, voc.parent], names, "SBD list", VOC_HINT
            )
        else:
            masks = find_dir(voc, ["SegmentationClass"], "VOC masks", VOC_HINT)
            lists = voc / "ImageSets" / "Segmentation"
            list_file = find_file([lists], [f"{split}.txt"], f"VOC {split} list", VOC_HINT)
        stems = read_id_list(list_file)
        names = class_names("voc-21")
        if background:
            labels, lut = names, lut_from({k: k for k in range(21)})
        else:
            labels, lut = names[1:], lut_from({k: k - 1 for k in range(1, 21)})
        items = _pairs(stems, voc / "JPEGImages", masks, ".jpg", VOC_HINT)
        super().__init__("voc2012", split, items, labels, lut, transform)


# ----------------------------------------------------------------------------------------------- Context

CONTEXT_HINT = (
    "PASCAL Context needs VOC2010 images (VOCtrainval_03-May-2010.tar) and the 59-class label PNGs in "
    "VOC2010/SegmentationClassContext with ImageSets/SegmentationContext/{train,val}.txt, the layout that "
    f"mmsegmentation's pascal_context.py writes from trainval_merged.json; see {DOCS}#pascal-context."
)


class PascalContext(LabelMapDataset):
    """PASCAL Context (VOC 2010 images), the 59 most frequent classes.

    Label PNG values: 0 = background (everything outside the 59 classes), ``k`` in 1..59 = the classes in
    alphabetical order. ``num_classes=59`` ignores background and maps ``k -> k - 1`` (the standard
    59-class protocol); ``num_classes=60`` keeps background as class 0.

    Args:
        root: ``VOCdevkit``, ``VOCdevkit/VOC2010`` or the folder holding ``VOCdevkit``.
        split: ``train`` (4,996) or ``val`` (5,104).
        num_classes: 59 or 60.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        num_classes: int = 59,
        transform: Transform | None = None,
    ) -> None:
        split = normalise_split(split, {"train": "train", "val": "val"}, f"pascal-context-{num_classes}")
        if num_classes not in (59, 60):
            raise BadConfigError(f"num_classes must be 59 or 60, got {num_classes}")
        voc = find_voc(root, "2010", CONTEXT_HINT)
        masks = find_dir(voc, ["SegmentationClassContext"], "PASCAL Context label maps", CONTEXT_HINT)
        list_file = find_file(
            [voc / "ImageSets" / "SegmentationContext"], [f"{split}.txt"], "PASCAL Context list", CONTEXT_HINT
        )
        names = class_names("pascal-context-59")
        if num_classes == 59:
            labels, lut = names, lut_from({k: k - 1 for k in range(1, 60)})
        else:
            labels, lut = ["background", *names], lut_from({k: k for k in range(60)})
        items = _pairs(read_id_list(list_file), voc / "JPEGImages", masks, ".jpg", CONTEXT_HINT)
        super().__init__(f"pascal-context-{num_classes}", split, items, labels, lut, transform)


# ----------------------------------------------------------------------------------------------- COCO-Stuff

COCO_STUFF_HINT = (
    "Download COCO 2017 images (train2017.zip, val2017.zip) and stuffthingmaps_trainval2017.zip "
    "(COCO-Stuff), unzip them side by side and pass that folder as root; see "
    f"{DOCS}#coco-stuff."
)
# stuffthingmaps values are COCO-Stuff ids minus one (0..181). These 11 are thing ids that COCO never
# used (category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91); dropping them leaves the 171 classes.
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_IDS = [v for v in range(182) if v not in COCO_STUFF_UNUSED]


class COCOStuff(LabelMapDataset):
    """COCO-Stuff 164k, 171 classes (80 things, 91 stuff), from the raw ``stuffthingmaps`` PNGs.

    Label PNG values: 0..181 = COCO-Stuff id - 1 (things 0..90, stuff 91..181), 255 = unlabelled. The
    171 used ids map to 0..170 in id order, as mmsegmentation's ``_labelTrainIds`` conversion does; the
    11 unused ids and 255 are ignored.

    Args:
        root: folder holding ``{train2017,val2017}`` (or ``images/{...}``) and
            ``stuffthingmaps_trainval2017/{train2017,val2017}`` (or mmseg's ``annotations/{...}``).
        split: ``train`` (118k) or ``val`` (5,000).
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "val", transform: Transform | None = None
    ) -> None:
        split = normalise_split(
            split,
            {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"},
            "coco-stuff-171",
        )
        base = check_root(root, COCO_STUFF_HINT)
        images = find_dir(base, [split, f"images/{split}"], "COCO images", COCO_STUFF_HINT)
        masks = find_dir(
            base,
            [f"stuffthingmaps_trainval2017/{split}", f"annotations/{split}"],
            "stuffthingmaps",
            COCO_STUFF_HINT,
        )
        # The label maps define the split (the image folder may hold more, e.g. a shared images/ tree).
        stems = sorted(p.stem for p in masks.glob("*.png") if not p.stem.endswith("_labelTrainIds"))
        if not stems:
            raise BadDataError(f"no label PNGs in {masks}", hint=COCO_STUFF_HINT)
        lut = lut_from({value: index for index, value in enumerate(COCO_STUFF_IDS)})
        items = _pairs(stems, images, masks, ".jpg", COCO_STUFF_HINT)
        super().__init__("coco-stuff-171", split, items, class_names("coco-stuff-171"), lut, transform)
