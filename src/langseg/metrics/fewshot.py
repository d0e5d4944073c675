"""Few-shot segmentation (LSeg/HSNet protocol): per-class foreground IoU and FB-IoU (see langseg.metrics)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from langseg.errors import BadConfigError, BadDataError
from langseg.metrics.semantic import SemanticMetrics
from langseg.metrics.state import SumState


@dataclass(frozen=True)
class FewShotScores:
    """Few-shot scores (see the module docstring): ``miou`` (mean foreground IoU over the classes seen,
    NaN if none), ``fb_iou`` (background/foreground IoU of all samples pooled) and ``classes`` seen."""

    miou: float
    fb_iou: float
    classes: int

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging: ``mIoU``, ``FB-IoU`` and ``classes``."""
        return {"mIoU": self.miou, "FB-IoU": self.fb_iou, "classes": float(self.classes)}


class FewShotMetrics(SumState):
    """Streaming few-shot metrics: a 2 x 2 confusion matrix (rows ground truth, columns prediction;
    0 = others, 1 = the class) per class id, so that per-class and pooled IoUs both follow.

    Args:
        max_classes: class ids lie in ``[0, max_classes)`` (the benchmarks' are 1-based, at most 1000).
        ignore_index: target value of unlabelled pixels, skipped by :meth:`update`; not 0 or 1.

    Raises:
        BadConfigError: ``max_classes < 1`` or ``ignore_index`` is 0 or 1.
    """

    def __init__(self, max_classes: int = 1024, ignore_index: int = 255) -> None:
        if max_classes < 1:
            raise BadConfigError(f"max_classes must be at least 1, got {max_classes}")
        self._sample = SemanticMetrics(2, ignore_index)  # checks and counts one sample (and ignore_index)
        self.max_classes, self.ignore_index = max_classes, ignore_index
        self._state = {"confusion": torch.zeros(max_classes, 2, 2, dtype=torch.int64)}

    def _config(self) -> dict[str, Any]:
        return {"max_classes": self.max_classes, "ignore_index": self.ignore_index}

    @property
    def confusion(self) -> torch.Tensor:
        """``max_classes x 2 x 2`` int64 confusion matrices so far, one per class id; a view."""
        return self._state["confusion"]

    def update(self, class_id: int, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one sample: ``pred`` 0/1 or bool and ``target`` 0/1 (or ``ignore_index``), same shape
        (e.g. ``H x W``), for class ``class_id``.

        Raises:
            BadDataError: class id out of range, shapes differ, or a value is not 0/1 (or ignored).
        """
        if not 0 <= class_id < self.max_classes:
            raise BadDataError(
                f"class id {class_id} outside [0, {self.max_classes})",
                hint="Raise max_classes, or check the dataset's meta['class_id'].",
            )
        self._sample.reset()
        self._sample.update(pred, target)
        self._state["confusion"][class_id] += self._sample.confusion

    def compute(self) -> FewShotScores:
        """Scores of everything seen since construction or the last :meth:`reset`."""
        confusion = self._state["confusion"].double()
        seen = confusion.sum(dim=(1, 2)) > 0
        tp = confusion[seen, 1, 1]
        union = confusion[seen, 1, :].sum(dim=1) + confusion[seen, :, 1].sum(dim=1) - tp
        fg = tp[union > 0] / union[union > 0]  # a class with no foreground at all has no IoU
        pooled = SemanticMetrics(2, self.ignore_index)
        pooled.confusion.copy_(self._state["confusion"].sum(dim=0))
        return FewShotScores(
            miou=float(fg.mean()) if fg.numel() else math.nan,
            fb_iou=pooled.compute().fb_iou,  # type: ignore[arg-type]  # always set for two classes
            classes=int(seen.sum()),
        )
