"""Few-shot loaders (PASCAL-5i, COCO-20i, FSS-1000) on tiny fixtures in the real layouts: which (image,
class) pairs a fold holds, with standard (HSNet) and derived lists, and the exact binary masks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from langseg.data.fewshot_datasets import BACKGROUND, FSS1000, COCO20i, PASCAL5i, fold_classes
from langseg.errors import BadConfigError, BadDataError
from tests.test_data_semantic import photo

# COCO's 80 category ids (1..90 with gaps): index k of this list is class k + 1 of the 80.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
H, W = 24, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def box(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ----------------------------------------------------------------------------------------------- PASCAL-5i


def write_pascal(root: Path, size: tuple[int, int] = (H, W), seed: int = 0) -> dict[str, np.ndarray]:
    """VOC2012 with SegmentationClassAug masks and val/train_aug lists; returns stem -> label values."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    values = {}
    a = np.zeros(size, np.uint8)
    a[:, : size[1] // 2] = 1  # aeroplane, left half
    a[size[0] // 2 :, size[1] // 2 :] = 15  # person, bottom right
    a[0, :] = 255  # border
    b = np.zeros(size, np.uint8)
    b[:1, :5] = 3  # 5 bird pixels: below min_pixels=10
    b[-4:, :] = 7  # car
    c = np.full(size, 2, np.uint8)  # bicycle everywhere
    d = np.zeros(size, np.uint8)
    d[2:8, 2:8] = 11  # dining table (a training class of fold 0)
    for stem, mask in {"2007_000001": a, "2007_000002": b, "2007_000003": c, "2008_000004": d}.items():
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (voc / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(rng, size)).save(voc / "JPEGImages" / f"{stem}.jpg", quality=90)
        Image.fromarray(mask).save(voc / "SegmentationClassAug" / f"{stem}.png")
        values[stem] = mask
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2007_000001\n2007_000002\n2007_000003\n")
    (lists / "train_aug.txt").write_text(
        "/JPEGImages/2008_000004.jpg /SegmentationClassAug/2008_000004.png\n"
    )
    return values


def write_hsnet_pascal_lists(splits: Path) -> None:
    for kind, folds in {
        "val": {0: ["2007_000001__01", "2007_000002__03"]},
        "trn": {1: [], 2: [], 3: []},
    }.items():
        (splits / "pascal" / kind).mkdir(parents=True, exist_ok=True)
        for fold, lines in folds.items():
            (splits / "pascal" / kind / f"fold{fold}.txt").write_text("".join(f"{x}\n" for x in lines))
    (splits / "pascal" / "trn" / "fold2.txt").write_text("2008_000004__11\n")


def test_fold_classes() -> None:
    assert fold_classes("pascal-5i", 0) == [1, 2, 3, 4, 5] and fold_classes("pascal-5i", 3) == [
        16,
        17,
        18,
        19,
        20,
    ]
    assert fold_classes("coco-20i", 0)[:3] == [1, 5, 9] and fold_classes("coco-20i", 3)[-1] == 80
    assert sorted(c for k in range(4) for c in fold_classes("coco-20i", k)) == list(range(1, 81))
    with pytest.raises(BadConfigError, match="fold"):
        fold_classes("coco-20i", 4)


def test_pascal5i_derived_pairs_and_binary_mask(tmp_path: Path) -> None:
    values = write_pascal(tmp_path)
    with pytest.warns(UserWarning, match="deriving"):
        data = PASCAL5i(tmp_path, "val", fold=0, min_pixels=10)
    # aeroplane in 000001, bicycle in 000003; the 5 bird pixels of 000002 are under min_pixels.
    assert data.items == [("2007_000001", 1), ("2007_000003", 2)] and data.protocol == "derived"
    sample = data[0]
    assert sample["labels"] == [BACKGROUND, "aeroplane"] and BACKGROUND == "others"
    want = np.where(values["2007_000001"] == 255, 255, values["2007_000001"] == 1).astype(np.int64)
    assert torch.equal(sample["mask"], torch.from_numpy(want))
    assert sorted(sample["mask"].unique().tolist()) == [0, 1, 255]
    assert (
        sample["meta"]["class_id"] == 1 and sample["meta"]["fold"] == 0 and sample["image"].shape == (3, H, W)
    )
    with pytest.warns(UserWarning):
        train = PASCAL5i(tmp_path, "train", fold=0, min_pixels=10, label_style="lseg")
    assert train.items == [("2008_000004", 11)] and train[0]["labels"] == ["others", "diningtable"]


def test_pascal5i_standard_lists(tmp_path: Path) -> None:
    write_pascal(tmp_path)
    write_hsnet_pascal_lists(tmp_path / "splits")
    data = PASCAL5i(tmp_path, "test", fold=0)  # root/splits found; HSNet tests on the val lists
    assert data.protocol == "standard" and data.items == [("2007_000001", 1), ("2007_000002", 3)]
    bird = data[1]
    assert bird["labels"][1] == "bird" and int(bird["mask"].sum()) == 5
    train = PASCAL5i(tmp_path, "train", fold=0, splits_dir=tmp_path / "splits")
    assert train.items == [("2008_000004", 11)] and train.class_names == ["dining table"]
    (tmp_path / "splits" / "pascal" / "trn" / "fold3.txt").unlink()
    with pytest.raises(BadDataError, match=r"pascal/trn/fold3.txt"):
        PASCAL5i(tmp_path, "train", fold=0)


def test_pascal5i_missing_image_is_named(tmp_path: Path) -> None:
    write_pascal(tmp_path)
    write_hsnet_pascal_lists(tmp_path / "splits")
    (tmp_path / "VOC2012" / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(BadDataError, match=r"2007_000002.jpg"):
        PASCAL5i(tmp_path, "val", fold=0)


# ----------------------------------------------------------------------------------------------- COCO-20i


def polygon(y0: int, y1: int, x0: int, x1: int) -> list[list[float]]:
    """A rectangle polygon; pycocotools fills exactly rows y0..y1-1 and columns x0..x1-1 of it."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: alternating run lengths, column-major, starting with background."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE as JSON holds it (``counts`` a string)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def annotation(ann_id: int, image_id: int, category: int, segmentation, area: float = 0.0, iscrowd: int = 0):
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
            "area": area, "iscrowd": iscrowd}  # fmt: skip


def write_coco2014(root: Path, size: tuple[int, int] = (H, W), seed: int = 0) -> dict:
    """COCO 2014 layout with instances_val2014.json; returns expected (file, class) -> bool mask."""
    rng = np.random.default_rng(seed)
    files = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
    (root / "val2014").mkdir(parents=True)
    (root / "train2014").mkdir()
    for name in files:
        Image.fromarray(photo(rng, size)).save(root / "val2014" / name, quality=90)
    crowd = box(10, 20, 20, 30, size)
    plane = box(0, 6, 0, 10, size)
    anns = [
        annotation(1, 1, 1, polygon(2, 8, 12, 20), area=48.0),
        annotation(2, 1, 1, uncompressed_rle(crowd), area=100.0, iscrowd=1),
        annotation(3, 1, 5, compressed_rle(plane), area=60.0),
        annotation(4, 1, 3, polygon(0, 4, 28, 32), area=16.0),
        annotation(5, 2, 1, polygon(0, 2, 0, 2), area=4.0),
    ]
    instances = {
        "images": [
            {"id": i + 1, "file_name": n, "height": size[0], "width": size[1]} for i, n in enumerate(files)
        ],
        "annotations": anns,
        "categories": [{"id": cid, "name": f"c{cid}", "supercategory": "x"} for cid in COCO_IDS],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(instances))
    return {
        (files[0], 1): box(2, 8, 12, 20, size) | crowd,
        (files[0], 5): plane,
        (files[0], 3): box(0, 4, 28, 32, size),
    }


def test_coco20i_derived_pairs_and_union_masks(tmp_path: Path) -> None:
    want = write_coco2014(tmp_path)
    with pytest.warns(UserWarning, match="deriving"):
        data = COCO20i(tmp_path, "val", fold=0, min_pixels=20)
    name = "COCO_val2014_000000000001.jpg"
    # Fold 0 = classes 1, 5, 9, ...: person and airplane of image 1; image 2's 4-pixel person is filtered,
    # the car (class 3) is in fold 2.
    assert data.items == [(name, 1), (name, 5)] and data.class_names == ["person", "airplane"]
    person = data[0]
    assert person["labels"] == ["others", "person"]
    assert torch.equal(person["mask"], torch.from_numpy(want[name, 1].astype(np.int64)))
    assert torch.equal(data[1]["mask"], torch.from_numpy(want[name, 5].astype(np.int64)))
    with pytest.warns(UserWarning):
        fold2 = COCO20i(tmp_path, "val", fold=2, min_pixels=1, label_style="lseg")
    assert fold2.items == [(name, 3)] and torch.equal(fold2[0]["mask"], torch.from_numpy(want[name, 3] * 1))
    with pytest.warns(UserWarning):
        lseg = COCO20i(tmp_path, "val", fold=0, min_pixels=20, label_style="lseg")
    assert lseg[1]["labels"] == ["others", "aeroplane"] and lseg.names[9] == "trafficlight"


def test_coco20i_standard_pickle_lists_and_episodes(tmp_path: Path) -> None:
    write_coco2014(tmp_path)
    lists = tmp_path / "hsnet_splits" / "coco" / "val"
    lists.mkdir(parents=True)
    one, two = "val2014/COCO_val2014_000000000001.jpg", "val2014/COCO_val2014_000000000002.jpg"
    # HSNet's fold pickles: {0-based class: [image paths]}, every class key present, most lists empty.
    with open(lists / "fold0.pkl", "wb") as file:
        pickle.dump(
            {k: ([one, two] if k == 0 else [one] if k == 4 else []) for k in range(80)}, file, protocol=2
        )
    data = COCO20i(tmp_path, "val", fold=0, splits_dir=tmp_path / "hsnet_splits")
    assert data.protocol == "standard"
    assert data.items == [(Path(one).name, 1), (Path(two).name, 1), (Path(one).name, 5)]
    assert int(data[1]["mask"].sum()) == 4  # image 2's small person, kept by the standard list
    episodes = COCO20i(tmp_path, "val", fold=0, splits_dir=tmp_path / "hsnet_splits", episodes=6, seed=3)
    again = COCO20i(tmp_path, "val", fold=0, splits_dir=tmp_path / "hsnet_splits", episodes=6, seed=3)
    assert len(episodes) == 6 and episodes.items == again.items and set(episodes.items) <= set(data.items)


def test_coco20i_hsnet_png_layout(tmp_path: Path) -> None:
    base = tmp_path / "COCO2014"
    (base / "val2014").mkdir(parents=True)
    (base / "annotations" / "val2014").mkdir(parents=True)
    name = "COCO_val2014_000000000007.jpg"
    Image.fromarray(photo(np.random.default_rng(0), (H, W))).save(base / "val2014" / name)
    values = np.zeros((H, W), np.uint8)
    values[:5] = 5  # airplane (class 5 of 80)
    values[5:9] = 1  # person
    Image.fromarray(values).save(base / "annotations" / "val2014" / name.replace(".jpg", ".png"))
    with pytest.raises(BadDataError, match="need HSNet's split lists"):
        COCO20i(tmp_path, "val", fold=0)
    (tmp_path / "splits" / "coco" / "val").mkdir(parents=True)
    with open(tmp_path / "splits" / "coco" / "val" / "fold0.pkl", "wb") as file:
        pickle.dump({4: [f"val2014/{name}"], 0: []}, file)
    data = COCO20i(tmp_path, "val", fold=0)
    assert data.items == [(name, 5)] and torch.equal(data[0]["mask"], torch.from_numpy((values == 5) * 1))


def test_coco20i_missing_annotations_named(tmp_path: Path) -> None:
    (tmp_path / "val2014").mkdir()
    with pytest.raises(BadDataError, match=r"annotations/instances_val2014.json"):
        COCO20i(tmp_path, "val")


# ----------------------------------------------------------------------------------------------- FSS-1000


def write_fss(root: Path, classes: list[str], images: int = 3, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """``root/<class>/<n>.jpg + <n>.png``; masks are anti-aliased RGB (0, 127, 128, 255 columns)."""
    rng = np.random.default_rng(0)
    grey = np.zeros(size, np.uint8)
    grey[:, 8:16], grey[:, 16:24], grey[:, 24:] = 127, 128, 255
    for name in classes:
        (root / name).mkdir(parents=True)
        for n in [*range(1, images + 1), 10]:
            Image.fromarray(photo(rng, size)).save(root / name / f"{n}.jpg", quality=90)
            Image.fromarray(grey).convert("RGB").save(root / name / f"{n}.png")
    return grey


def test_fss1000_split_lists_threshold_and_names(tmp_path: Path) -> None:
    grey = write_fss(tmp_path / "fewshot_data", ["ab_wheel", "bus", "zebra"])
    (tmp_path / "splits" / "fss").mkdir(parents=True)
    (tmp_path / "splits" / "fss" / "test.txt").write_text("zebra\nab_wheel\n")
    data = FSS1000(tmp_path, "test")
    assert data.class_names == ["ab wheel", "zebra"]  # sorted, as HSNet sorts them
    assert [k for k, _ in data.items[:4]] == ["ab_wheel/1", "ab_wheel/2", "ab_wheel/3", "ab_wheel/10"]
    sample = data[5]
    assert sample["labels"] == ["others", "zebra"] and sample["meta"]["stem"] == "2"
    assert torch.equal(sample["mask"], torch.from_numpy((grey >= 128).astype(np.int64)))
    assert FSS1000(tmp_path, "test", label_style="lseg")[0]["labels"][1] == "ab_wheel"
    assert len(FSS1000(tmp_path / "fewshot_data", "all")) == 12
    with pytest.raises(BadDataError, match=r"splits/fss/val.txt"):
        FSS1000(tmp_path, "val")
    (tmp_path / "splits" / "fss" / "val.txt").write_text("bus\nkoala\n")
    with pytest.raises(BadDataError, match=r"fewshot_data/koala"):
        FSS1000(tmp_path, "val")
    (tmp_path / "fewshot_data" / "bus" / "2.png").unlink()
    with pytest.raises(BadDataError, match=r"bus/2.png"):
        FSS1000(tmp_path, "all")
