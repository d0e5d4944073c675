"""The registered few-shot benchmarks follow LSeg's published zero-shot protocol (``test_lseg_zs.py`` on
HSNet's loaders), checked against references written from isl-org/lang-seg's ``fewshot_data`` code:

- ``FSSDataset``'s transform: torchvision ``Resize((480, 480))`` on the PIL image, the mask through
  ``F.interpolate(..., mode="nearest")`` (the reference indexes rows and columns by hand);
- ``DatasetPASCAL.__len__`` / ``__getitem__``: 1000 test episodes, ``idx % len(img_metadata)``;
- ``DatasetCOCO.load_frame`` after ``fix_randseed(0)``: ``np.random.choice`` of a class, then of an image;
- ``Evaluator.classify_prediction`` and ``AverageMeter.compute_iou``: ``torch.histc`` counts per episode,
  PASCAL's boundary set to 255 in both prediction and target, sums per class, fold mIoU and FB-IoU.

The fixtures are test_data_fewshot.py's tiny real-layout folders.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from langseg.data import build_dataset
from langseg.data.fewshot_protocol import resize_square
from langseg.errors import BadConfigError
from langseg.evaluate import evaluate
from tests.test_data_fewshot import write_coco2014, write_hsnet_pascal_lists, write_pascal

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ references from the official code
def ref_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """torch's ``nearest`` (legacy) resampling spelt out: output row ``i`` reads input row
    ``floor(i * (H / size))``, likewise for columns, in float32 as ATen's CPU kernel computes it (float64
    picks another row at a few hundred boundaries of a 520 -> 480 resize)."""
    rows, cols = (
        np.floor(np.arange(size, dtype=np.float32) * (np.float32(n) / np.float32(size))).astype(int)
        for n in mask.shape
    )
    return mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]


def hsnet_scores(
    episodes: list[tuple[int, torch.Tensor, torch.Tensor]], class_ids: list[int]
) -> tuple[float, float]:
    """(fold mIoU, FB-IoU) as HSNet's ``Evaluator`` and ``AverageMeter`` compute them, in [0, 1].

    ``episodes``: (0-based class id, ``H x W`` 0/1 prediction, ``H x W`` target 0/1 with 255 = PASCAL's
    boundary). ``class_ids``: the classes averaged over (HSNet: the fold's; here the ones present).
    """
    inter_buf, union_buf = torch.zeros(2, 1000), torch.zeros(2, 1000)
    for class_id, pred, target in episodes:
        gt = (target == 1).float()
        ignore = (target == 255).float()  # extract_ignore_idx: floor(mask / 255)
        pred = pred.float().clone()
        gt = gt + ignore * 255
        pred[gt == 255] = 255
        inter = pred[pred == gt]
        area_inter = torch.histc(inter, bins=2, min=0, max=1) if inter.numel() else torch.zeros(2)
        area_pred = torch.histc(pred, bins=2, min=0, max=1)
        area_gt = torch.histc(gt, bins=2, min=0, max=1)
        inter_buf[:, class_id] += area_inter
        union_buf[:, class_id] += area_pred + area_gt - area_inter
    iou = inter_buf / torch.max(torch.stack([union_buf, torch.ones_like(union_buf)]), dim=0)[0]
    ids = torch.tensor(class_ids)
    miou = iou.index_select(1, ids)[1].mean()
    fb_iou = (inter_buf.index_select(1, ids).sum(1) / union_buf.index_select(1, ids).sum(1)).mean()
    return float(miou), float(fb_iou)


@dataclass
class Result:
    mask: np.ndarray


class RedPredictor:
    """``segment(image, ["others", name])``: the class where the red channel is below 100 (the fixture
    photos' left part: a mask that depends on each image, so that every count of the scoring matters)."""

    def segment(self, image: np.ndarray, labels: list[str]) -> Result:
        assert labels[0] == "others" and image.dtype == np.uint8
        return Result((image[..., 0] < 100).astype(np.int64))


# ------------------------------------------------------------------------------------------ tests
def test_resize_square_is_hsnets_transform() -> None:
    """Images as torchvision's Resize((S, S)) on a PIL image (PIL bilinear, antialiased when shrinking),
    masks by nearest neighbour, both when enlarging (37 x 53) and shrinking (600 x 520) to 480."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for height, width in ((37, 53), (600, 520)):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 1, 255], np.uint8), size=(height, width))
        image, resized_mask = resize_square(torch.from_numpy(array).permute(2, 0, 1), mask, 480)
        expected = np.asarray(transforms.Resize(size=(480, 480))(Image.fromarray(array)))
        assert image.shape == (3, 480, 480) and image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
        np.testing.assert_array_equal(resized_mask, ref_nearest(mask, 480))


def test_registered_pascal5i_is_hsnets_test_loader(tmp_path: Path) -> None:
    """1000 episodes cycling through the fold list, 480 x 480, LSeg's label words, boundaries kept."""
    root = tmp_path / "voc"
    values = write_pascal(root)
    write_hsnet_pascal_lists(root / "splits")
    dataset = build_dataset("pascal-5i", {"root": str(root), "fold": 0})
    listed = [("2007_000001", 1), ("2007_000002", 3)]  # HSNet's fold-0 list of the fixture
    assert len(dataset) == 1000 and dataset.items == [listed[i % 2] for i in range(1000)]
    assert dataset.names[10] == "diningtable" and dataset.names[19] == "tvmonitor"  # label_files words
    sample = dataset[2]
    assert sample["image"].shape == (3, 480, 480) and sample["meta"]["image_size"] == (24, 32)
    raw = values["2007_000001"]
    binary = np.where(raw == 255, 255, (raw == 1).astype(np.uint8))
    np.testing.assert_array_equal(sample["mask"].numpy(), ref_nearest(binary, 480))
    assert sample["labels"] == ["others", "aeroplane"]
    raw_reading = build_dataset("pascal-5i", {"root": str(root), "size": None, "episodes": None})
    assert len(raw_reading) == 2 and raw_reading[0]["image"].shape == (3, 24, 32)
    with pytest.raises(BadConfigError, match="episodes must be"):
        build_dataset("pascal-5i", {"root": str(root), "episodes": 0})
    with pytest.raises(BadConfigError, match="size must be"):
        build_dataset("pascal-5i", {"root": str(root), "size": "big"})


def test_registered_coco20i_replays_hsnets_episodes(tmp_path: Path) -> None:
    """HSNet's COCO-20i episodes after fix_randseed(0), literally: the same 1000 (image, class) pairs."""
    write_coco2014(tmp_path)
    names = ["val2014/COCO_val2014_000000000001.jpg", "val2014/COCO_val2014_000000000002.jpg"]
    fold = 1
    # Every class of the fold with one or both images, in varying orders (HSNet needs none empty).
    classwise = {k: [] for k in range(80)}
    for v in range(20):
        k = fold + 4 * v
        classwise[k] = [names[v % 2]] if v % 3 == 0 else [names[(v + 1) % 2], names[v % 2]]
    lists = tmp_path / "splits" / "coco" / "val"
    lists.mkdir(parents=True)
    (lists / f"fold{fold}.pkl").write_bytes(pickle.dumps(classwise, protocol=2))
    dataset = build_dataset("coco-20i", {"root": str(tmp_path), "fold": fold})

    np.random.seed(0)  # utils.fix_randseed(0)
    class_ids = [fold + 4 * v for v in range(20)]  # DatasetCOCO.build_class_ids, split "val"
    expected = []
    for _ in range(1000):  # load_frame, shot 0
        class_sample = np.random.choice(class_ids, 1, replace=False)[0]
        query_name = np.random.choice(classwise[class_sample], 1, replace=False)[0]
        expected.append((Path(query_name).name, int(class_sample) + 1))
    assert dataset.items == expected
    assert len({c for _, c in expected}) == 20 and dataset.names[9] == "trafficlight"
    assert dataset[0]["image"].shape == (3, 480, 480)


def test_protocol_scores_are_hsnets(tmp_path: Path) -> None:
    """``langseg eval``'s few-shot scores on the registered PASCAL-5i (7 episodes: cycling, so one pair
    counts twice as often as the other; 480 x 480; boundaries ignored) against HSNet's Evaluator and
    AverageMeter run on the same masks. HSNet averages the fold mIoU over the fold's five class ids;
    the fixture holds two of them, so the reference averages over those two (langseg's "classes
    seen"), as a full run would, where every class of the fold occurs."""
    root = tmp_path / "voc"
    write_pascal(root)
    write_hsnet_pascal_lists(root / "splits")
    dataset = build_dataset("pascal-5i", {"root": str(root), "fold": 0, "episodes": 7})
    scores = evaluate(RedPredictor(), dataset, progress=False)
    episodes = []
    for i in range(len(dataset)):
        sample = dataset[i]
        pred = RedPredictor().segment(sample["image"].permute(1, 2, 0).numpy(), sample["labels"]).mask
        episodes.append((sample["meta"]["class_id"] - 1, torch.from_numpy(pred), sample["mask"]))
    miou, fb_iou = hsnet_scores(episodes, class_ids=[0, 2])
    assert 0.05 < miou < 0.95 and 0.05 < fb_iou < 0.95  # neither trivial nor perfect
    assert scores["classes"] == 2
    assert scores["mIoU"] == pytest.approx(miou, abs=1e-6)
    assert scores["FB-IoU"] == pytest.approx(fb_iou, abs=1e-6)
