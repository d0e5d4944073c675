"""Evaluate a predictor on a dataset with the papers' metrics, sharded across ``torchrun`` ranks.

Semantic models (``Segmenter``) are scored with mIoU / pixAcc through their own test-time plan (single
scale, or the LSeg paper's multi-scale + flip + sliding window), one image at a time at its original
size, as the papers evaluate. Referring models (``Referrer``) are scored with overall IoU, mean IoU and
Prec@0.5-0.9. Few-shot datasets, whose label set changes per sample (``["others", class]``), are scored
as LSeg's zero-shot protocol does: mIoU over the fold's classes of the foreground IoU, and FB-IoU.
Under ``torchrun`` each rank takes every ``world_size``-th sample and the metric sums are all-reduced,
so N processes give exactly the single-process result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import Dataset

from langseg.errors import BadConfigError, BadDataError
from langseg.metrics import ReferringMetrics, SemanticMetrics
from langseg.predict.referrer import Referrer
from langseg.predict.segmenter import Segmenter
from langseg.train.distributed import init_distributed, shutdown_distributed


def _image_array(image: torch.Tensor) -> np.ndarray:
    """``H x W x 3`` uint8 array from a dataset's ``3 x H x W`` uint8 image tensor."""
    return image.permute(1, 2, 0).contiguous().numpy()


def evaluate_segmenter(
    segmenter: Segmenter,
    dataset: Dataset,
    indices: range | list[int],
    on_sample: Callable[[], None] | None = None,
) -> SemanticMetrics:
    """Un-reduced semantic metrics of ``segmenter`` over ``dataset[i]`` for ``i`` in ``indices``.

    The label set is the dataset's ``labels`` (class ``k`` of the masks is ``labels[k]``).
    """
    labels = list(getattr(dataset, "labels", []))
    if not labels:
        raise BadDataError(
            "the dataset has no class labels", hint="Evaluate a semantic model on a semantic dataset."
        )
    metrics = SemanticMetrics(len(labels), class_names=labels)
    for i in indices:
        sample = dataset[i]
        result = segmenter.segment(_image_array(sample["image"]), labels)
        metrics.update(torch.from_numpy(result.mask), sample["mask"])
        if on_sample:
            on_sample()
    return metrics


def evaluate_fewshot(
    segmenter: Segmenter,
    dataset: Dataset,
    indices: range | list[int],
    on_sample: Callable[[], None] | None = None,
) -> FewShotMetrics:
    """Un-reduced few-shot metrics over samples whose labels change per sample (PASCAL-5i, COCO-20i,
    FSS-1000: ``labels = ["others", class name]``, binary masks, ``meta["class_id"]``)."""
    metrics = FewShotMetrics()
    for i in indices:
        sample = dataset[i]
        result = segmenter.segment(_image_array(sample["image"]), sample["labels"])
        metrics.update(int(sample["meta"]["class_id"]), torch.from_numpy(result.mask), sample["mask"])
        if on_sample:
            on_sample()
    return metrics


class FewShotMetrics:
    """LSeg/HSNet few-shot scores, streaming and all-reducible like :mod:`langseg.metrics`.

    One two-class confusion matrix per class id (0 = others, 1 = the class), so that

    - ``mIoU`` is the mean over classes of the *foreground* IoU, each accumulated over all of that
      class's samples (sum of intersections / sum of unions), as LSeg and HSNet report it;
    - ``FB-IoU`` is the mean of background and foreground IoU over all samples together.
    """

    def __init__(self, max_classes: int = 1024) -> None:
        # 2 * max_classes can exceed 255, so ignored pixels are marked -1 inside this metric.
        self.per_class = SemanticMetrics(2 * max_classes, ignore_index=-1)
        self.max_classes = max_classes

    def update(self, class_id: int, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: ``H x W`` 0/1 (target may hold 255 = ignore) for class ``class_id``."""
        if not 0 <= class_id < self.max_classes:
            raise BadDataError(f"class id {class_id} outside 0..{self.max_classes - 1}")
        offset = 2 * class_id  # class c's confusion lives in rows/cols 2c (others) and 2c + 1 (class)
        shifted = torch.where(target == 255, -1, target.long() + offset)
        self.per_class.update(pred.long() + offset, shifted)

    def all_reduce(self) -> FewShotMetrics:
        self.per_class.all_reduce()
        return self

    def compute(self) -> FewShotScores:
        confusion = self.per_class.confusion.double()
        fg_ious, totals = [], torch.zeros(2, 2, dtype=torch.float64)
        for c in range(self.max_classes):
            block = confusion[2 * c : 2 * c + 2, 2 * c : 2 * c + 2]
            if block.sum() == 0:
                continue
            totals += block
            fg_ious.append(_iou(block, 1))
        return FewShotScores(
            miou=float(torch.tensor(fg_ious).nanmean()) if fg_ious else math.nan,
            fb_iou=float(torch.tensor([_iou(totals, 0), _iou(totals, 1)]).nanmean()),
            classes=len(fg_ious),
        )


def _iou(confusion: torch.Tensor, k: int) -> float:
    union = confusion[k, :].sum() + confusion[:, k].sum() - confusion[k, k]
    return float(confusion[k, k] / union) if union > 0 else math.nan


@dataclass(frozen=True)
class FewShotScores:
    miou: float
    fb_iou: float
    classes: int

    def as_dict(self) -> dict[str, float]:
        return {"mIoU": self.miou, "FB-IoU": self.fb_iou, "classes": float(self.classes)}


def evaluate_referrer(
    referrer: Referrer,
    dataset: Dataset,
    indices: range | list[int],
    on_sample: Callable[[], None] | None = None,
) -> ReferringMetrics:
    """Un-reduced referring metrics of ``referrer`` over ``dataset[i]`` for ``i`` in ``indices``."""
    metrics = ReferringMetrics()
    for i in indices:
        sample = dataset[i]
        result = referrer.refer(_image_array(sample["image"]), sample["text"])
        metrics.update(torch.from_numpy(result.mask), sample["mask"])
        if on_sample:
            on_sample()
    return metrics


def evaluate(
    predictor: Segmenter | Referrer, dataset: Dataset, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Scores of ``predictor`` on ``dataset`` (the first ``limit`` samples), over every ``torchrun`` rank.

    Returns ``as_dict()`` of the metrics (plain floats) on every rank.
    """
    info = init_distributed("cpu")
    try:
        count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
        indices = range(info.rank, count, info.world_size)
        with Progress(disable=not (progress and info.is_main), transient=True) as bar:
            task = bar.add_task("evaluating", total=len(indices))

            def tick() -> None:
                bar.advance(task)

            if isinstance(predictor, Segmenter):
                metrics: SemanticMetrics | ReferringMetrics = evaluate_segmenter(
                    predictor, dataset, indices, tick
                )
            elif isinstance(predictor, Referrer):
                metrics = evaluate_referrer(predictor, dataset, indices, tick)
            else:
                raise BadConfigError(f"cannot evaluate a {type(predictor).__name__}")
        metrics.all_reduce()
        return metrics.compute().as_dict()
    finally:
        shutdown_distributed(info)
