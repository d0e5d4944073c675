"""Tests for langseg.metrics against hand-worked numbers and slow per-pixel references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from langseg.errors import BadConfigError, BadDataError
from langseg.metrics import FewShotMetrics, ReferringMetrics, SemanticMetrics

IGNORE = 255


def assert_close(actual: float | None, expected: float | None) -> None:
    """Scalar comparison where NaN == NaN (NaN is a defined result here, not a failure)."""
    assert actual is not None and expected is not None
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------------------------------------
# Slow references: plain Python loops over pixels and classes, sharing no code with langseg.metrics.


def reference_semantic(pred: np.ndarray, target: np.ndarray, k: int) -> dict:
    pairs = [(int(t), int(p)) for t, p in zip(target.ravel(), pred.ravel(), strict=True) if t != IGNORE]
    confusion = [[0] * k for _ in range(k)]
    for t, p in pairs:
        confusion[t][p] += 1
    iou, recall = [], []
    for c in range(k):
        inter = sum(1 for t, p in pairs if t == c and p == c)
        union = sum(1 for t, p in pairs if t == c or p == c)
        gt = sum(1 for t, _ in pairs if t == c)
        iou.append(inter / union if union else math.nan)
        if gt:
            recall.append(inter / gt)
    present = [v for v in iou if not math.isnan(v)]
    correct = sum(1 for t, p in pairs if t == p)
    return {
        "confusion": confusion,
        "iou": iou,
        "miou": sum(present) / len(present) if present else math.nan,
        "pixel_accuracy": correct / len(pairs) if pairs else math.nan,
        "mean_accuracy": sum(recall) / len(recall) if recall else math.nan,
    }


def reference_referring(preds: np.ndarray, targets: np.ndarray, thresholds: tuple[float, ...]) -> dict:
    total_i = total_u = 0
    ious = []
    for pred, target in zip(preds, targets, strict=True):
        inter = union = 0
        for p, t in zip(pred.ravel(), target.ravel(), strict=True):
            inter += int(p and t)
            union += int(p or t)
        total_i += inter
        total_u += union
        ious.append(inter / union if union else 1.0)
    n = len(ious)
    return {
        "ious": ious,
        "overall_iou": total_i / total_u if total_u else math.nan,
        "mean_iou": sum(ious) / n,
        "precision": {t: sum(1 for v in ious if v >= t) / n for t in thresholds},
    }


def check_semantic(metrics: SemanticMetrics, ref: dict) -> None:
    scores = metrics.compute()
    assert scores.confusion.tolist() == ref["confusion"]
    np.testing.assert_allclose(scores.iou.numpy(), ref["iou"], rtol=1e-12, equal_nan=True)
    assert_close(scores.miou, ref["miou"])
    assert_close(scores.pixel_accuracy, ref["pixel_accuracy"])
    assert_close(scores.mean_accuracy, ref["mean_accuracy"])


def random_semantic(seed: int, shape: tuple[int, ...], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prediction and target with a rectangular ignore_index region in every image."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, k, shape, generator=g)
    target = torch.randint(0, k, shape, generator=g)
    target[..., : shape[-2] // 3, : shape[-1] // 2] = IGNORE
    return pred, target


def random_referring(seed: int, b: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random masks with rectangles so IoUs spread over [0, 1], plus some empty ones."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2, b, h, w, dtype=torch.bool)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=g))

    for m in masks.view(-1, h, w):
        y0, x0 = randint(0, h), randint(0, w)
        m[y0 : randint(y0, h + 1), x0 : randint(x0, w + 1)] = True
    return masks[0], masks[1]


# --------------------------------------------------------------------------------------------------------
# Semantic: hand-worked examples.


def test_semantic_hand_worked_example_with_absent_class_and_ignore() -> None:
    # 4 classes; class 3 appears in neither target nor prediction. The 255 pixel is ignored although the
    # prediction there (2) would otherwise count.
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    m = SemanticMetrics(4, class_names=["sky", "tree", "car", "boat"])
    m.update(pred, target)
    s = m.compute()
    # Labelled (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0)
    expected_confusion = [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert s.confusion.tolist() == expected_confusion
    # IoU_0 = 1 / (gt 2 + pred 2 - 1) = 1/3; IoU_1 = 2 / (2 + 3 - 2) = 2/3; IoU_2 = 0 / (1 + 0 - 0) = 0;
    # IoU_3 = 0/0 -> NaN, left out of mIoU = (1/3 + 2/3 + 0) / 3 = 1/3.
    np.testing.assert_allclose(s.iou.numpy(), [1 / 3, 2 / 3, 0.0, math.nan], equal_nan=True)
    assert s.iou.dtype == torch.float64
    assert_close(s.miou, 1 / 3)
    # 3 correct of 5 labelled pixels; recalls 1/2, 2/2, 0/1 over the classes in the ground truth.
    assert_close(s.pixel_accuracy, 3 / 5)
    assert_close(s.mean_accuracy, (1 / 2 + 1 + 0) / 3)
    assert s.fb_iou is None
    d = s.as_dict()
    assert set(d) == {"mIoU", "pixAcc", "mAcc", "IoU/sky", "IoU/tree", "IoU/car", "IoU/boat"}
    assert all(type(v) is float for v in d.values())
    assert_close(d["IoU/tree"], 2 / 3)
    assert math.isnan(d["IoU/boat"])


def test_semantic_fb_iou_two_classes() -> None:
    target = torch.tensor([[0, 0], [1, 1]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8)
    m = SemanticMetrics(2)
    m.update(pred, target)
    s = m.compute()
    # confusion [[1, 1], [0, 2]]: background IoU = 1 / (2 + 1 - 1) = 1/2, foreground 2 / (2 + 3 - 2) = 2/3
    assert_close(s.fb_iou, (1 / 2 + 2 / 3) / 2)
    assert set(s.as_dict()) == {"mIoU", "pixAcc", "mAcc", "FB-IoU", "IoU/0", "IoU/1"}


def test_semantic_class_predicted_but_absent_from_ground_truth_counts_as_zero() -> None:
    # Class 2 is only predicted: its union is 1 > 0, IoU 0, so it drags mIoU down: (1 + 1/2 + 0) / 3.
    m = SemanticMetrics(3)
    m.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    s = m.compute()
    np.testing.assert_allclose(s.iou.numpy(), [1.0, 1 / 2, 0.0])
    assert_close(s.miou, 1.5 / 3)
    # ... but it is not part of mean accuracy, which averages recall over classes 0 and 1: (1 + 1/2) / 2.
    assert_close(s.mean_accuracy, 0.75)


# --------------------------------------------------------------------------------------------------------
# Semantic: against the slow reference.


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.integers(1, 4), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
def test_semantic_matches_reference_property(data: st.DataObject, k: int, shape: tuple[int, ...]) -> None:
    target = data.draw(hnp.arrays(np.int64, shape, elements=st.sampled_from([*range(k), IGNORE])))
    pred = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, k - 1)))
    m = SemanticMetrics(k)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    check_semantic(m, reference_semantic(pred, target, k))


def test_semantic_matches_reference_seeded() -> None:
    pred, target = random_semantic(0, (2, 12, 10), 5)
    m = SemanticMetrics(5)
    m.update(pred, target)
    ref = reference_semantic(pred.numpy(), target.numpy(), 5)
    check_semantic(m, ref)
    # The ignore region must not be counted: 2 images x 4 rows x 5 cols are 255.
    assert int(m.compute().confusion.sum()) == 2 * 12 * 10 - 2 * 4 * 5


# --------------------------------------------------------------------------------------------------------
# Semantic: edge cases and errors.


def test_semantic_all_ignore_image_leaves_state_zero() -> None:
    m = SemanticMetrics(3)
    m.update(torch.tensor([[0, 1], [2, 0]]), torch.full((2, 2), IGNORE))
    s = m.compute()
    assert s.confusion.tolist() == [[0] * 3] * 3
    assert math.isnan(s.pixel_accuracy) and math.isnan(s.miou) and math.isnan(s.mean_accuracy)
    assert torch.isnan(s.iou).all()


def test_semantic_custom_ignore_index() -> None:
    m = SemanticMetrics(2, ignore_index=-1)
    m.update(torch.tensor([1, 1, 0]), torch.tensor([1, -1, 0]))
    assert m.compute().confusion.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize(
    ("pred", "target", "bad"),
    [
        ([0, 1, 2], [0, 3, 1], "3"),  # target past the last class
        ([0, 1, 2], [0, -1, 1], "-1"),  # negative target that is not ignore_index
        ([0, 5, 2], [0, 1, 1], "5"),  # prediction past the last class
        ([0, IGNORE, 2], [0, 1, 1], "255"),  # ignore_index is not a valid prediction at a labelled pixel
    ],
)
def test_semantic_out_of_range_raises(pred: list[int], target: list[int], bad: str) -> None:
    m = SemanticMetrics(3)
    with pytest.raises(BadDataError, match=rf"index {bad}\b"):
        m.update(torch.tensor(pred), torch.tensor(target))
    assert int(m.confusion.sum()) == 0  # a rejected batch leaves the state untouched


def test_semantic_prediction_at_ignored_pixel_is_not_checked() -> None:
    m = SemanticMetrics(3)
    m.update(torch.tensor([0, 9]), torch.tensor([0, IGNORE]))
    assert m.compute().confusion.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_semantic_bad_shapes_dtypes_and_settings_raise() -> None:
    m = SemanticMetrics(3)
    with pytest.raises(BadDataError, match="shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(BadDataError, match="float32"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(BadConfigError):
        SemanticMetrics(3, ignore_index=1)
    with pytest.raises(BadConfigError):
        SemanticMetrics(3, class_names=["a", "b"])
    with pytest.raises(BadConfigError):
        SemanticMetrics(0)


# --------------------------------------------------------------------------------------------------------
# Semantic: streaming, merging, state.


def test_semantic_streaming_merge_and_state_dict(tmp_path: Path) -> None:
    pred, target = random_semantic(1, (6, 9, 8), 4)
    whole = SemanticMetrics(4)
    whole.update(pred, target)
    expected = reference_semantic(pred.numpy(), target.numpy(), 4)
    check_semantic(whole, expected)

    chunked = SemanticMetrics(4)
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        chunked.update(pred[lo:hi], target[lo:hi])
    check_semantic(chunked, expected)

    first, second = SemanticMetrics(4), SemanticMetrics(4)
    first.update(pred[:3], target[:3])
    second.update(pred[3:], target[3:])
    assert first.merge(second) is first
    check_semantic(first, expected)

    torch.save(first.state_dict(), tmp_path / "state.pt")
    restored = SemanticMetrics(4)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    check_semantic(restored, expected)

    with pytest.raises(BadDataError, match="num_classes"):
        SemanticMetrics(5).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="settings differ"):
        first.merge(SemanticMetrics(4, ignore_index=-1))

    saved = first.state_dict()
    first.reset()
    assert int(first.confusion.sum()) == 0 and math.isnan(first.compute().miou)
    # The state dict is a copy: resetting (or updating) the metric afterwards must not change it.
    restored = SemanticMetrics(4)
    restored.load_state_dict(saved)
    check_semantic(restored, expected)


# --------------------------------------------------------------------------------------------------------
# Referring.


def test_referring_hand_worked_example() -> None:
    target = torch.zeros(3, 2, 3, dtype=torch.bool)
    pred = torch.zeros(3, 2, 3, dtype=torch.bool)
    # Expression 0: target 3 pixels, prediction 3 pixels sharing 2 -> I = 2, U = 4, IoU = 0.5 exactly.
    target[0, 0, :] = True
    pred[0, 0, 1:] = True
    pred[0, 1, 0] = True
    # Expression 1: both empty -> I = U = 0, IoU defined as 1.
    # Expression 2: empty prediction of a 3-pixel target -> I = 0, U = 3, IoU 0.
    target[2, 1, :] = True
    m = ReferringMetrics()
    ious = m.update(pred, target)
    np.testing.assert_allclose(ious.numpy(), [0.5, 1.0, 0.0])
    s = m.compute()
    assert s.count == 3
    assert_close(s.overall_iou, (2 + 0 + 0) / (4 + 0 + 3))
    assert_close(s.mean_iou, (0.5 + 1.0 + 0.0) / 3)
    # IoU 0.5 counts at the 0.5 threshold (>=); only the both-empty expression clears 0.6 .. 0.9.
    assert s.precision.keys() == {0.5, 0.6, 0.7, 0.8, 0.9}
    assert_close(s.precision[0.5], 2 / 3)
    for t in (0.6, 0.7, 0.8, 0.9):
        assert_close(s.precision[t], 1 / 3)
    d = s.as_dict()
    assert list(d) == ["oIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"]
    assert all(type(v) is float for v in d.values())


def test_referring_iou_exactly_at_each_threshold_counts() -> None:
    # Expression i: target the first a pixels of a 1 x b row, prediction all b -> IoU a/b, exactly the
    # i-th threshold. With >=, expressions i..4 clear threshold i: Pr = (5 - i) / 5 (with > it would be 4-i).
    m = ReferringMetrics()
    for a, b in [(1, 2), (3, 5), (7, 10), (4, 5), (9, 10)]:
        target = torch.zeros(1, 10, dtype=torch.uint8)  # 0/1 integer masks are accepted too
        target[0, :a] = 1
        pred = torch.zeros(1, 10, dtype=torch.uint8)
        pred[0, :b] = 1
        assert m.update(pred, target).shape == (1,)
    precision = m.compute().precision
    for i, t in enumerate((0.5, 0.6, 0.7, 0.8, 0.9)):
        assert_close(precision[t], (5 - i) / 5)


def test_referring_empty_and_nothing_seen() -> None:
    m = ReferringMetrics(thresholds=(0.5,))
    s = m.compute()
    assert s.count == 0 and math.isnan(s.overall_iou) and math.isnan(s.mean_iou)
    assert math.isnan(s.precision[0.5])
    # Only both-empty expressions: each IoU is 1, but sum U = 0 so oIoU stays undefined.
    m.update(torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.bool))
    s = m.compute()
    assert s.count == 2 and math.isnan(s.overall_iou)
    assert_close(s.mean_iou, 1.0)
    assert_close(s.precision[0.5], 1.0)


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
)
def test_referring_matches_reference_property(data: st.DataObject, shape: tuple[int, int, int]) -> None:
    pred = data.draw(hnp.arrays(np.bool_, shape))
    target = data.draw(hnp.arrays(np.bool_, shape))
    thresholds = (0.25, 0.5, 0.75, 1.0)
    m = ReferringMetrics(thresholds)
    ious = m.update(torch.from_numpy(pred), torch.from_numpy(target))
    ref = reference_referring(pred, target, thresholds)
    np.testing.assert_allclose(ious.numpy(), ref["ious"], rtol=1e-12)
    s = m.compute()
    assert s.count == shape[0]
    assert_close(s.overall_iou, ref["overall_iou"])
    assert_close(s.mean_iou, ref["mean_iou"])
    for t in thresholds:
        assert_close(s.precision[t], ref["precision"][t])


def test_referring_streaming_merge_and_state_dict(tmp_path: Path) -> None:
    pred, target = random_referring(2, 12, 7, 6)
    thresholds = (0.5, 0.6, 0.7, 0.8, 0.9)
    ref = reference_referring(pred.numpy(), target.numpy(), thresholds)

    def check(m: ReferringMetrics) -> None:
        s = m.compute()
        assert s.count == 12
        assert_close(s.overall_iou, ref["overall_iou"])
        assert_close(s.mean_iou, ref["mean_iou"])
        for t in thresholds:
            assert_close(s.precision[t], ref["precision"][t])

    whole = ReferringMetrics(thresholds)
    whole.update(pred, target)
    check(whole)
    assert 0.0 < ref["overall_iou"] < 1.0  # the random data must actually exercise partial overlaps

    chunked = ReferringMetrics(thresholds)
    chunked.update(pred[0], target[0])  # a single H x W expression
    chunked.update(pred[1:5], target[1:5])
    chunked.update(pred[5:], target[5:])
    check(chunked)

    first, second = ReferringMetrics(thresholds), ReferringMetrics(thresholds)
    first.update(pred[:7], target[:7])
    second.update(pred[7:], target[7:])
    check(first.merge(second))

    torch.save(first.state_dict(), tmp_path / "state.pt")
    restored = ReferringMetrics(thresholds)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    check(restored)
    with pytest.raises(BadDataError, match="thresholds"):
        ReferringMetrics((0.5,)).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="settings differ"):
        first.merge(ReferringMetrics((0.5,)))
    first.reset()
    assert first.compute().count == 0


def test_referring_bad_input_raises() -> None:
    m = ReferringMetrics()
    with pytest.raises(BadDataError, match="shape"):
        m.update(torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(3, 3, 3, dtype=torch.bool))
    with pytest.raises(BadDataError, match="H x W"):
        m.update(torch.zeros(1, 1, 3, 3, dtype=torch.bool), torch.zeros(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(BadDataError, match="holds 2"):
        m.update(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]))
    with pytest.raises(BadDataError, match=r"holds 0\.7"):
        m.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.7]], dtype=torch.float64))
    assert m.compute().count == 0
    with pytest.raises(BadConfigError):
        ReferringMetrics(thresholds=(0.5, 1.5))
    with pytest.raises(BadConfigError):
        ReferringMetrics(thresholds=())


# --------------------------------------------------------------------------------------------------------
# Few-shot: per-class foreground IoU and pooled FB-IoU.


def fewshot_samples() -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Class 3 has two samples, class 7 one (the pixels of one row each: pred, target)."""
    rows = [
        (3, [1, 1, 0, 0], [1, 0, 0, 0]),
        (3, [1, 1, 1, 0], [1, 1, 255, 0]),
        (7, [0, 0, 0, 0], [0, 0, 1, 1]),
    ]
    return [(c, torch.tensor([p]), torch.tensor([t])) for c, p, t in rows]


def test_fewshot_scores_follow_the_zero_shot_protocol() -> None:
    """Hand-worked: mIoU averages per-class foreground IoUs, FB-IoU pools every sample."""
    metrics = FewShotMetrics()
    for sample in fewshot_samples():
        metrics.update(*sample)
    # class 3: I=1, U=2 then I=2, U=2 (255 ignored); class 7: I=0, U=2.
    scores = metrics.compute()
    # Foreground IoU: class 3 = (1 + 2) / (2 + 2) = 0.75, class 7 = 0 / 2 = 0 -> mIoU 0.375.
    assert scores.miou == pytest.approx(0.375) and scores.classes == 2
    # Pooled confusion over labelled pixels (rows target, cols pred):
    #   bg->bg: sample1 {2,3}=2, sample2 {3}=1, sample3 {0,1}=2 -> 5;  bg->fg: sample1 {1}=1 -> 1
    #   fg->bg: sample3 {2,3}=2 -> 2;  fg->fg: 1 + 2 = 3.  bg IoU = 5 / (5 + 1 + 2) = 0.625, fg = 3 / 6 = 0.5.
    assert scores.fb_iou == pytest.approx((0.625 + 0.5) / 2)
    assert scores.as_dict() == pytest.approx({"mIoU": 0.375, "FB-IoU": 0.5625, "classes": 2.0})
    assert metrics.confusion[3].tolist() == [[3, 1], [0, 3]] and metrics.confusion[7].tolist() == [
        [2, 0],
        [2, 0],
    ]


def test_fewshot_class_without_foreground_has_no_iou_and_bool_predictions_count() -> None:
    metrics = FewShotMetrics(max_classes=10)
    metrics.update(1, torch.tensor([[True, False]]), torch.tensor([[1, 0]]))  # fg IoU 1
    metrics.update(2, torch.tensor([[False, False]]), torch.tensor([[0, 0]]))  # no foreground anywhere
    scores = metrics.compute()
    assert scores.miou == pytest.approx(1.0) and scores.classes == 2
    # Pooled: bg 3 of 3 right, fg 1 of 1 -> FB-IoU 1.
    assert scores.fb_iou == pytest.approx(1.0)
    empty = FewShotMetrics().compute()
    assert math.isnan(empty.miou) and math.isnan(empty.fb_iou) and empty.classes == 0


def test_fewshot_streaming_state_and_bad_input(tmp_path: Path) -> None:
    samples = fewshot_samples()
    first, second = FewShotMetrics(), FewShotMetrics()
    first.update(*samples[0])
    for sample in samples[1:]:
        second.update(*sample)
    assert first.merge(second).compute().miou == pytest.approx(0.375)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    restored = FewShotMetrics()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.compute().fb_iou == pytest.approx(0.5625)
    with pytest.raises(BadDataError, match="max_classes"):
        FewShotMetrics(max_classes=8).load_state_dict(first.state_dict())
    with pytest.raises(BadDataError, match="class id 1024 outside"):
        first.update(1024, *samples[0][1:])
    with pytest.raises(BadDataError, match="class index 2"):
        first.update(1, torch.tensor([[2, 0]]), torch.tensor([[1, 0]]))
    with pytest.raises(BadDataError, match="differs from target shape"):
        first.update(1, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(BadConfigError, match="ignore_index=1"):
        FewShotMetrics(ignore_index=1)


# --------------------------------------------------------------------------------------------------------
# torch.distributed: two gloo ranks, each seeing half of the data, must agree with one process seeing all.


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pred, target = random_semantic(3, (4, 8, 8), 3)
        semantic = SemanticMetrics(3)
        semantic.update(pred[rank::world_size], target[rank::world_size])
        rpred, rtarget = random_referring(4, 6, 5, 5)
        referring = ReferringMetrics()
        referring.update(rpred[rank::world_size], rtarget[rank::world_size])
        fewshot = FewShotMetrics()
        for sample in fewshot_samples()[rank::world_size]:
            fewshot.update(*sample)
        semantic.all_reduce()
        referring.all_reduce()
        fewshot.all_reduce()
        states = {"semantic": semantic, "referring": referring, "fewshot": fewshot}
        torch.save({k: m.state_dict() for k, m in states.items()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_equals_single_process(tmp_path: Path) -> None:
    # Without an initialised process group all_reduce is a no-op.
    single_sem = SemanticMetrics(3)
    pred, target = random_semantic(3, (4, 8, 8), 3)
    single_sem.update(pred, target)
    before = single_sem.confusion.clone()
    assert single_sem.all_reduce() is single_sem
    assert torch.equal(single_sem.confusion, before)
    single_ref = ReferringMetrics()
    single_ref.update(*random_referring(4, 6, 5, 5))

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    expected_sem = single_sem.compute()
    expected_ref = single_ref.compute()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        sem, ref, few = SemanticMetrics(3), ReferringMetrics(), FewShotMetrics()
        sem.load_state_dict(state["semantic"])
        ref.load_state_dict(state["referring"])
        few.load_state_dict(state["fewshot"])
        assert few.compute().as_dict() == pytest.approx({"mIoU": 0.375, "FB-IoU": 0.5625, "classes": 2.0})
        got_sem, got_ref = sem.compute(), ref.compute()
        assert torch.equal(got_sem.confusion, expected_sem.confusion)
        assert_close(got_sem.miou, expected_sem.miou)
        assert got_ref.count == 6
        for key, value in expected_ref.as_dict().items():
            assert_close(got_ref.as_dict()[key], value)
