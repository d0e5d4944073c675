"""Referring segmentation: oIoU, mIoU and Pr@t over expressions (definitions: langseg.metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from langseg.errors import BadConfigError, BadDataError
from langseg.metrics.state import SumState, nan_if_zero


@dataclass(frozen=True)
class ReferringScores:
    """Scores of a referring segmentation evaluation (see the module docstring for definitions).

    Attributes:
        overall_iou: oIoU, sum of intersections / sum of unions over all expressions; NaN if the sum of
            unions is 0 (no expression, or every prediction and target empty).
        mean_iou: mean per-expression IoU (both-empty counts as 1.0); NaN if no expression.
        precision: threshold -> share of expressions with IoU >= threshold; NaN values if no expression.
        count: number of expressions seen.
    """

    overall_iou: float
    mean_iou: float
    precision: dict[float, float]
    count: int

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging: ``oIoU``, ``mIoU`` and ``Pr@<threshold>`` (e.g. ``Pr@0.5``)."""
        out = {"oIoU": self.overall_iou, "mIoU": self.mean_iou}
        out.update({f"Pr@{t:g}": p for t, p in self.precision.items()})
        return out


class ReferringMetrics(SumState):
    """Streaming metrics for referring segmentation: oIoU, mIoU and precision at IoU thresholds.

    Args:
        thresholds: IoU thresholds in ``[0, 1]`` for ``Pr@t``; the standard set is 0.5 to 0.9.

    Raises:
        BadConfigError: no threshold, a repeated one, or one outside ``[0, 1]``.
    """

    def __init__(self, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> None:
        thresholds = tuple(float(t) for t in thresholds)
        if (
            not thresholds
            or len(set(thresholds)) != len(thresholds)
            or not all(0 <= t <= 1 for t in thresholds)
        ):
            raise BadConfigError(f"thresholds must be distinct values in [0, 1], got {thresholds}")
        self.thresholds = thresholds
        self._state = {
            "intersection": torch.zeros((), dtype=torch.int64),
            "union": torch.zeros((), dtype=torch.int64),
            "iou_sum": torch.zeros((), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
            "hits": torch.zeros(len(thresholds), dtype=torch.int64),
        }

    def _config(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds)}

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add one expression (``H x W``) or a batch of expressions (``B x H x W``).

        Args:
            pred: ``H x W`` or ``B x H x W`` predicted mask, bool or any dtype holding only 0 and 1.
            target: ground-truth mask of the same shape and kind.

        Returns:
            ``B`` float64 CPU tensor of per-expression IoUs (``B = 1`` for an ``H x W`` input).

        Raises:
            BadDataError: shapes differ, are not 2-D or 3-D, or a mask holds a value other than 0/1.
        """
        if pred.shape != target.shape:
            raise BadDataError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}",
                hint="Resize predicted masks to the target size (nearest) before scoring.",
            )
        if target.dim() not in (2, 3):
            raise BadDataError(
                f"masks must be H x W or B x H x W, got shape {tuple(target.shape)}",
                hint="Pass one mask per expression, stacked along the first dimension.",
            )
        masks = []
        for name, x in (("prediction", pred), ("target", target)):
            if x.dtype != torch.bool:
                bad = x[(x != 0) & (x != 1)]
                if bad.numel() > 0:
                    raise BadDataError(
                        f"{name} mask holds {bad[0].item()}, expected only 0/1 or booleans",
                        hint="Threshold probabilities or logits first, e.g. pred = logits > 0.",
                    )
            masks.append(x.to(device=target.device, dtype=torch.bool).reshape(-1, *x.shape[-2:]).flatten(1))
        p, g = masks
        # Counts are reduced on the input's device; only B-long vectors move, and the division happens in
        # float64 on the CPU (some accelerators lack float64), so IoUs such as 7/10 are correctly rounded
        # and compare >= to the threshold literal 0.7 as exact arithmetic would.
        inter = (p & g).sum(dim=1).cpu()
        union = (p | g).sum(dim=1).cpu()
        iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 1.0)
        thresholds = torch.tensor(self.thresholds, dtype=torch.float64)
        state = self._state
        state["intersection"] += inter.sum()
        state["union"] += union.sum()
        state["iou_sum"] += iou.sum()
        state["count"] += iou.numel()
        state["hits"] += (iou[:, None] >= thresholds[None, :]).sum(dim=0)
        return iou

    def compute(self) -> ReferringScores:
        """Scores of everything seen since construction or the last :meth:`reset`."""
        state = self._state
        count = int(state["count"])
        return ReferringScores(
            overall_iou=nan_if_zero(float(state["intersection"]), float(state["union"])),
            mean_iou=nan_if_zero(float(state["iou_sum"]), count),
            precision={
                t: nan_if_zero(float(h), count)
                for t, h in zip(self.thresholds, state["hits"].tolist(), strict=True)
            },
            count=count,
        )
