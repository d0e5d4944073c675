"""Semantic benchmark loaders on tiny fixtures written in the real on-disk layouts.

Each ``write_*`` helper lays out a few images and label PNGs exactly as the dataset is distributed and
returns what it wrote, so the tests can assert exact class indices and ignore pixels. The helpers take
sizes and counts so that ``benchmarks/loader_speed.py`` can build realistic fixtures with them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from langseg.data.semantic_datasets import (
    ADE20K,
    COCO_STUFF_UNUSED,
    VOC2012,
    COCOStuff,
    PascalContext,
    class_names,
    lseg_ade_names,
)
from langseg.errors import BadConfigError, BadDataError

SIZE = (24, 32)  # H, W: small, and not square so that a transposed read would show


pytestmark = pytest.mark.usefixtures("one_thread")


def photo(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``H x W x 3`` uint8: smooth gradients plus mild noise (photo-like JPEG sizes and decode times)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 12, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def label_map(values: list[int], size: tuple[int, int]) -> np.ndarray:
    """``H x W`` uint8 with one horizontal band per value (top to bottom), so every value occurs."""
    h, w = size
    rows = np.linspace(0, len(values), h, endpoint=False).astype(int)
    return np.repeat(np.asarray(values, dtype=np.uint8)[rows][:, None], w, axis=1)


def save_pair(
    images: Path, masks: Path, stem: str, rng: np.random.Generator, values: np.ndarray, palette: bool = False
) -> None:
    """``images/<stem>.jpg`` (a photo-like JPEG) and ``masks/<stem>.png`` holding ``values``."""
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(rng, values.shape)).save(images / f"{stem}.jpg", quality=90)
    png = Image.fromarray(values)
    if palette:  # VOC's SegmentationClass PNGs are palette images whose indices are the classes
        png = png.convert("P")
        png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    png.save(masks / f"{stem}.png")


def write_ade20k(root: Path, num: int = 3, size: tuple[int, int] = SIZE, seed: int = 0) -> dict:
    """ADEChallengeData2016 with ``num`` training and ``num`` validation images; returns stem -> values."""
    rng, written = np.random.default_rng(seed), {}
    base = root / "ADEChallengeData2016"
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(1, num + 1):
            stem = f"ADE_{prefix}_{i:08d}"
            values = label_map([0, i, 150, 37 + i], size)
            save_pair(base / "images" / split, base / "annotations" / split, stem, rng, values)
            written[stem] = values
    return written


def write_voc(root: Path, num: int = 4, size: tuple = SIZE, seed: int = 0, aug: bool = True) -> dict:
    """VOCdevkit/VOC2012 with palette masks (values 0, a class, 255 borders), train/val lists and, if
    ``aug``, SBD's SegmentationClassAug (greyscale) plus DeepLab's two-column train_aug.txt."""
    rng, written = np.random.default_rng(seed), {}
    voc = root / "VOCdevkit" / "VOC2012"
    stems = [f"2007_{i:06d}" for i in range(num)]
    for i, stem in enumerate(stems):
        values = label_map([0, i % 20 + 1, 255, 15], size)
        save_pair(voc / "JPEGImages", voc / "SegmentationClass", stem, rng, values, palette=True)
        written[stem] = values
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    half = num // 2
    (lists / "train.txt").write_text("".join(s + "\n" for s in stems[:half]))
    (lists / "val.txt").write_text("".join(s + "\n" for s in stems[half:]))
    (lists / "trainval.txt").write_text("".join(s + "\n" for s in stems))
    if aug:
        sbd = "2008_000002"  # an SBD-only image: no border in its mask
        values = label_map([0, 7], size)
        save_pair(voc / "JPEGImages", voc / "SegmentationClassAug", sbd, rng, values)
        written[sbd] = values
        for stem in stems:
            Image.fromarray(written[stem]).save(voc / "SegmentationClassAug" / f"{stem}.png")
        lines = [f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png\n" for s in [*stems[:half], sbd]]
        (lists / "train_aug.txt").write_text("".join(lines))
    return written


def write_context(root: Path, num: int = 3, size: tuple[int, int] = SIZE, seed: int = 0) -> dict:
    """mmseg's PASCAL Context layout: VOC2010 JPEGs, SegmentationClassContext PNGs with 0..59."""
    rng, written = np.random.default_rng(seed), {}
    voc = root / "VOCdevkit" / "VOC2010"
    stems = [f"2008_{i:06d}" for i in range(num)]
    for i, stem in enumerate(stems):
        values = label_map([0, 1, 59, 10 + i], size)
        save_pair(voc / "JPEGImages", voc / "SegmentationClassContext", stem, rng, values)
        written[stem] = values
    lists = voc / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text(stems[0] + "\n")
    (lists / "val.txt").write_text("".join(s + "\n" for s in stems[1:]))
    return written


def write_coco_stuff(root: Path, num: int = 2, size: tuple[int, int] = SIZE, seed: int = 0) -> dict:
    """train2017/ + val2017/ + stuffthingmaps_trainval2017/{train2017,val2017}/ with raw 0..181 ids."""
    rng, written = np.random.default_rng(seed), {}
    for split in ("train2017", "val2017"):
        for i in range(num):
            stem = f"{i + (0 if split == 'train2017' else 500):012d}"
            values = label_map([0, 11, 12, 91, 181, 255, 90 + i], size)
            save_pair(root / split, root / "stuffthingmaps_trainval2017" / split, stem, rng, values)
            written[stem] = values
    return written


def expected(values: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Reference mapping written out value by value (255 where ``mapping`` has no entry)."""
    out = np.full(values.shape, 255, dtype=np.int64)
    for value, index in mapping.items():
        out[values == value] = index
    return out


def test_ade20k_maps_zero_to_ignore_and_shifts_classes(tmp_path: Path) -> None:
    written = write_ade20k(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):  # the folder or its parent
        data = ADE20K(root, "val")
        assert len(data) == 3
        sample = data[1]
        values = written["ADE_val_00000002"]
        assert sample["meta"]["stem"] == "ADE_val_00000002"
        assert sample["image"].shape == (3, *SIZE) and sample["image"].dtype == torch.uint8
        assert sample["mask"].dtype == torch.int64
        assert torch.equal(
            sample["mask"], torch.from_numpy(expected(values, {k: k - 1 for k in range(1, 151)}))
        )
        assert sorted(sample["mask"].unique().tolist()) == [1, 38, 149, 255]
        assert (
            sample["labels"][0] == "wall" and sample["labels"][149] == "flag" and len(sample["labels"]) == 150
        )
        reference = np.asarray(Image.open(sample["meta"]["image"]).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(sample["image"].numpy(), reference)
    assert len(ADE20K(tmp_path, "training")) == 3


def test_ade20k_lseg_names_keep_first_word(tmp_path: Path) -> None:
    write_ade20k(tmp_path, num=1)
    readable = ADE20K(tmp_path, "val").labels
    lseg = ADE20K(tmp_path, "val", label_style="lseg").labels
    assert readable[44] == "chest of drawers" and lseg[44] == "chest"
    assert readable[136] == "traffic light" and lseg[136] == "traffic"
    assert lseg == lseg_ade_names(readable) and sum(a != b for a, b in zip(readable, lseg, strict=True)) == 15


def test_voc_keeps_background_and_border(tmp_path: Path) -> None:
    written = write_voc(tmp_path)
    data = VOC2012(tmp_path / "VOCdevkit", "val")
    assert [data[i]["meta"]["stem"] for i in range(len(data))] == ["2007_000002", "2007_000003"]
    sample = data[0]
    assert torch.equal(sample["mask"], torch.from_numpy(written["2007_000002"].astype(np.int64)))
    assert sorted(sample["mask"].unique().tolist()) == [0, 3, 15, 255]
    assert sample["labels"][15] == "person" and len(sample["labels"]) == 21
    no_bg = VOC2012(tmp_path, "val", background=False)[0]
    assert sorted(no_bg["mask"].unique().tolist()) == [2, 14, 255] and no_bg["labels"][14] == "person"
    assert len(VOC2012(tmp_path / "VOCdevkit" / "VOC2012", "trainval")) == 4


def test_voc_train_aug_reads_sbd_masks_and_deeplab_list(tmp_path: Path) -> None:
    written = write_voc(tmp_path)
    data = VOC2012(tmp_path, "train_aug")
    assert [data[i]["meta"]["stem"] for i in range(len(data))] == [
        "2007_000000",
        "2007_000001",
        "2008_000002",
    ]
    sbd = data[2]
    assert sbd["meta"]["mask"].endswith("SegmentationClassAug/2008_000002.png")
    assert torch.equal(sbd["mask"], torch.from_numpy(written["2008_000002"].astype(np.int64)))


@pytest.mark.parametrize("num_classes", [59, 60])
def test_pascal_context(tmp_path: Path, num_classes: int) -> None:
    written = write_context(tmp_path)
    data = PascalContext(tmp_path, "val", num_classes=num_classes)
    assert len(data) == 2 and len(data.labels) == num_classes
    values = written[data[1]["meta"]["stem"]]
    if num_classes == 59:
        want = expected(values, {k: k - 1 for k in range(1, 60)})
        assert data.labels[0] == "aeroplane" and data.labels[58] == "wood"
        assert sorted(data[1]["mask"].unique().tolist()) == [0, 11, 58, 255]
    else:
        want = values.astype(np.int64)
        assert data.labels[0] == "background" and data.labels[59] == "wood"
    assert torch.equal(data[1]["mask"], torch.from_numpy(want))
    assert len(PascalContext(tmp_path, "train", num_classes=num_classes)) == 1


def test_coco_stuff_maps_182_ids_to_171_classes(tmp_path: Path) -> None:
    written = write_coco_stuff(tmp_path)
    data = COCOStuff(tmp_path, "val")
    assert len(data) == 2 and len(data.labels) == 171
    sample = data[0]
    assert sample["meta"]["stem"] == "000000000500"
    # 0 person -> 0; 11 (unused id 12) -> ignore; 12 stop sign -> 11; 91 banner -> 80; 181 wood -> 170;
    # 255 unlabelled -> ignore; 90 (unused id 91) -> ignore.
    assert sorted(sample["mask"].unique().tolist()) == [0, 11, 80, 170, 255]
    mapping = {v: i for i, v in enumerate(v for v in range(182) if v not in COCO_STUFF_UNUSED)}
    assert torch.equal(sample["mask"], torch.from_numpy(expected(written["000000000500"], mapping)))
    assert [data.labels[i] for i in (0, 11, 80, 170)] == ["person", "stop sign", "banner", "wood"]
    assert data[1]["mask"][-1, 0] == 80  # value 91 in the last band of the second image -> banner


def test_class_name_files() -> None:
    sizes = {"ade20k-150": 150, "voc-21": 21, "pascal-context-59": 59, "coco-80": 80, "coco-stuff-171": 171}
    for name, size in sizes.items():
        names = class_names(name)
        assert len(names) == size and len(set(names)) == size, name
    assert class_names("coco-stuff-171")[:80] == class_names("coco-80")


def test_missing_root_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(BadDataError, match="does not exist") as info:
        ADE20K(tmp_path / "nowhere")
    assert "ADEChallengeData2016" in info.value.hint and "docs/data.md" in info.value.hint


def test_wrong_layout_names_expected_paths(tmp_path: Path) -> None:
    (tmp_path / "something").mkdir()
    with pytest.raises(BadDataError, match=r"images/validation"):
        ADE20K(tmp_path)
    with pytest.raises(BadDataError, match=r"VOCdevkit/VOC2012/JPEGImages"):
        VOC2012(tmp_path)
    with pytest.raises(BadDataError, match=r"stuffthingmaps_trainval2017/val2017"):
        (tmp_path / "val2017").mkdir()
        COCOStuff(tmp_path)


def test_incomplete_root_names_the_missing_file(tmp_path: Path) -> None:
    write_ade20k(tmp_path)
    missing = tmp_path / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    missing.unlink()
    with pytest.raises(BadDataError, match=r"ADE_val_00000002\.png"):
        ADE20K(tmp_path)
    write_voc(tmp_path / "v", aug=False)
    with pytest.raises(BadDataError, match=r"VOC2012/SegmentationClassAug") as info:
        VOC2012(tmp_path / "v", "train_aug")
    assert "train_aug.txt" in info.value.hint
    (tmp_path / "v" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").mkdir()
    with pytest.raises(BadDataError, match=r"ImageSets/Segmentation/train_aug.txt"):
        VOC2012(tmp_path / "v", "train_aug")
    write_context(tmp_path / "c")
    (tmp_path / "c" / "VOCdevkit" / "VOC2010" / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(BadDataError, match=r"SegmentationContext/val.txt"):
        PascalContext(tmp_path / "c")


def test_colour_mask_and_size_mismatch_are_bad_data(tmp_path: Path) -> None:
    write_voc(tmp_path, aug=False)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    Image.new("RGB", (SIZE[1], SIZE[0])).save(voc / "SegmentationClass" / "2007_000002.png")
    with pytest.raises(BadDataError, match="RGB image, expected an 8-bit label PNG"):
        VOC2012(tmp_path)[0]
    Image.new("L", (5, 5)).save(voc / "SegmentationClass" / "2007_000003.png")
    with pytest.raises(BadDataError, match=r"different releases|is 5x5"):
        VOC2012(tmp_path)[1]


def test_bad_split_and_style_are_config_errors(tmp_path: Path) -> None:
    write_ade20k(tmp_path, num=1)
    with pytest.raises(BadConfigError, match="unknown split 'test'"):
        ADE20K(tmp_path, "test")
    with pytest.raises(BadConfigError, match="label_style"):
        ADE20K(tmp_path, label_style="fancy")  # type: ignore[arg-type]
