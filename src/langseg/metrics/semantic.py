"""Semantic segmentation: a confusion matrix, mIoU, pixel accuracy, FB-IoU (definitions: langseg.metrics)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from langseg.errors import BadConfigError, BadDataError
from langseg.metrics.state import SumState, check_integer, nan_if_zero


@dataclass(frozen=True, eq=False)
class SemanticScores:
    """Scores of a semantic segmentation evaluation (see the module docstring for definitions).

    Attributes:
        iou: ``K`` float64, per-class IoU; NaN for classes absent from both ground truth and prediction.
        miou: mean IoU over the classes with union > 0; NaN if there is none.
        pixel_accuracy: correct / labelled pixels; NaN when no pixel was labelled.
        mean_accuracy: mean per-class recall over the classes present in the ground truth; NaN if none.
        fb_iou: mean of background (class 0) and foreground (class 1) IoU when ``K == 2``, ignoring a NaN
            one; ``None`` for other ``K``.
        confusion: ``K x K`` int64 confusion matrix, rows = ground truth, columns = prediction.
        class_names: names of the ``K`` classes, if given to the metric.
    """

    iou: torch.Tensor
    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    fb_iou: float | None
    confusion: torch.Tensor
    class_names: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging: ``mIoU``, ``pixAcc``, ``mAcc``, ``FB-IoU`` (two classes only) and
        ``IoU/<class name or index>`` per class."""
        out = {"mIoU": self.miou, "pixAcc": self.pixel_accuracy, "mAcc": self.mean_accuracy}
        if self.fb_iou is not None:
            out["FB-IoU"] = self.fb_iou
        names = self.class_names or tuple(str(k) for k in range(len(self.iou)))
        out.update({f"IoU/{name}": float(v) for name, v in zip(names, self.iou.tolist(), strict=True)})
        return out


class SemanticMetrics(SumState):
    """Streaming confusion-matrix metrics for semantic segmentation: mIoU, pixel accuracy, FB-IoU.

    Args:
        num_classes: ``K``, the number of classes; valid labels are ``0 .. K-1``.
        ignore_index: target value of unlabelled pixels, skipped by :meth:`update`; must lie outside
            ``[0, K)``.
        class_names: optional ``K`` names used as keys by :meth:`SemanticScores.as_dict`.

    Raises:
        BadConfigError: ``num_classes < 1``, ``ignore_index`` is a valid class, or the number of names is
            not ``num_classes``.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise BadConfigError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise BadConfigError(
                f"ignore_index={ignore_index} is one of the {num_classes} classes",
                hint="Use a value outside [0, num_classes), e.g. 255 or -1.",
            )
        if class_names is not None and len(class_names) != num_classes:
            raise BadConfigError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else None
        self._state = {"confusion": torch.zeros(num_classes, num_classes, dtype=torch.int64)}

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    @property
    def confusion(self) -> torch.Tensor:
        """``K x K`` int64 confusion matrix so far (rows = ground truth, columns = prediction); a view."""
        return self._state["confusion"]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predictions.

        Args:
            pred: ``*`` integer (or bool) predicted class indices, any shape, e.g. ``B x H x W``.
            target: ``*`` integer ground-truth class indices of the same shape; ``ignore_index`` marks
                unlabelled pixels.

        The counting runs on ``target``'s device; only the ``K x K`` counts travel to the CPU state.
        Predictions are only checked where the target is labelled, since they are discarded elsewhere.

        Raises:
            BadDataError: shapes differ, a tensor is floating point, a target is neither a class nor
                ``ignore_index``, or a prediction at a labelled pixel is not a class.
        """
        if pred.shape != target.shape:
            raise BadDataError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}",
                hint="Resize predictions to the target size (nearest) before scoring.",
            )
        check_integer("prediction", pred)
        check_integer("target", target)
        k = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.to(target.device).reshape(-1).long()
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        for name, values in (("target", target), ("prediction", pred)):
            bad = values[(values < 0) | (values >= k)]
            if bad.numel() > 0:
                raise BadDataError(
                    f"{name} holds class index {int(bad[0])}, outside [0, {k})"
                    + (f" and not ignore_index={self.ignore_index}" if name == "target" else ""),
                    hint=f"Check the label mapping: classes are 0..{k - 1}, unlabelled {self.ignore_index}.",
                )
        # One bincount over the flattened (gt, pred) pair index fills the whole matrix in a single pass.
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self._state["confusion"] += counts.cpu()

    def compute(self) -> SemanticScores:
        """Scores of everything seen since construction or the last :meth:`reset`."""
        conf = self._state["confusion"]
        c = conf.double()
        tp = c.diagonal()
        gt = c.sum(dim=1)
        predicted = c.sum(dim=0)
        union = gt + predicted - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        present = union > 0
        miou = float(iou[present].mean()) if present.any() else math.nan
        mean_accuracy = float(recall[gt > 0].mean()) if (gt > 0).any() else math.nan
        fb_iou = None
        if self.num_classes == 2:
            # With one of the two classes absent everywhere, FB-IoU falls back to the other class's IoU.
            fb_iou = float(iou[present].mean()) if present.any() else math.nan
        return SemanticScores(
            iou=iou,
            miou=miou,
            pixel_accuracy=nan_if_zero(float(tp.sum()), float(c.sum())),
            mean_accuracy=mean_accuracy,
            fb_iou=fb_iou,
            confusion=conf.clone(),
            class_names=self.class_names,
        )
