"""Streaming, mergeable segmentation metrics.

Both metric classes keep their state as *sums* (``int64`` counts and ``float64`` totals on the CPU), so
that a dataset can be scored in any number of batches, on any number of processes, and the pieces added
together (:meth:`merge` in one process, :meth:`all_reduce` across ``torch.distributed`` ranks) give
exactly the scores of one pass over all the data.

Semantic segmentation (:class:`SemanticMetrics`), from a ``K x K`` confusion matrix ``C`` over the
labelled pixels (rows = ground truth, columns = prediction):

- ``IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k])``, i.e. TP / (TP + FP + FN). A class
  absent from both ground truth and prediction has union 0 and IoU NaN.
- ``mIoU``: mean of ``IoU_k`` over the classes with union > 0 (present in the ground truth *or* the
  prediction); a class predicted but absent from the ground truth counts with IoU 0.
- pixel accuracy: ``trace(C) / sum(C)``, correctly labelled pixels over labelled pixels.
- mean accuracy: mean over the classes present in the ground truth of the per-class recall
  ``C[k, k] / sum_j C[k, j]``.
- FB-IoU (two-class problems, e.g. few-shot segmentation): mean of background and foreground IoU.

Pixels whose target equals ``ignore_index`` are skipped entirely, whatever was predicted there.

Referring segmentation (:class:`ReferringMetrics`), one binary mask per expression:

- per-expression ``IoU = |P & G| / |P | G|``, defined as 1.0 when both masks are empty (the model
  correctly predicted nothing, as for the no-target expressions of gRefCOCO);
- ``oIoU`` (overall or cumulative IoU): ``sum |P & G| / sum |P | G|`` over the whole set, which weights
  large objects more;
- ``mIoU``: mean of the per-expression IoUs;
- ``Pr@t``: share of expressions with IoU >= t (so an IoU of exactly 0.5 counts towards ``Pr@0.5``).

Few-shot segmentation (:class:`FewShotMetrics`), LSeg's and HSNet's protocol: each sample is one image
with a binary mask of one class (0 = others, 1 = the class), and the class changes from sample to sample:

- ``mIoU``: mean over the classes seen of the *foreground* IoU, each accumulated over all of that class's
  samples (sum of intersections / sum of unions);
- ``FB-IoU``: mean of background and foreground IoU over all samples pooled.

Scores with nothing to average over (no labelled pixel, no expression) are NaN rather than 0, so that an
empty evaluation cannot pass for a bad one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from langseg.errors import BadConfigError, BadDataError

__all__ = [
    "FewShotMetrics",
    "FewShotScores",
    "ReferringMetrics",
    "ReferringScores",
    "SemanticMetrics",
    "SemanticScores",
]


_S = TypeVar("_S", bound="_SumState")


def _nan_if_zero(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


class _SumState:
    """State made of named CPU tensors that combine by addition (shared by both metric classes)."""

    _state: dict[str, torch.Tensor]

    def _config(self) -> dict[str, Any]:
        """Settings two states must share to be added (and that a state dict records)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Zero the state, e.g. before a new evaluation pass."""
        for tensor in self._state.values():
            tensor.zero_()

    def merge(self: _S, other: _S) -> _S:
        """Add ``other``'s state to this one (in place) and return ``self``.

        Raises:
            ValueError: ``other`` is a different metric or has different settings.
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(other).__name__}({other._config()}) into "
                f"{type(self).__name__}({self._config()}): settings differ"
            )
        for name, tensor in self._state.items():
            tensor.add_(other._state[name])
        return self

    def all_reduce(self: _S, group: dist.ProcessGroup | None = None) -> _S:
        """Sum the state over all ranks of ``group`` (in place) and return ``self``.

        Every rank must call this, once, after its last :meth:`update` and before :meth:`compute`;
        afterwards each rank holds the global sums (calling it twice would count the data twice). A no-op
        when ``torch.distributed`` is unavailable or not initialised, so single-process code can call it
        unconditionally.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        # NCCL only reduces CUDA tensors; the state lives on the CPU so that it never costs GPU memory and
        # can be read without synchronising, hence the round trip.
        device = torch.device("cpu")
        if dist.get_backend(group) == dist.Backend.NCCL:
            device = torch.device("cuda", torch.cuda.current_device())
        for tensor in self._state.values():
            buffer = tensor.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(buffer)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The settings and a copy of the sums; loadable with ``torch.load(..., weights_only=True)``."""
        return {**self._config(), **{name: t.clone() for name, t in self._state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the sums with those of ``state`` (from :meth:`state_dict` of a like-configured metric).

        Raises:
            BadDataError: the settings, a key, a shape or a dtype in ``state`` does not match.
        """
        for key, value in self._config().items():
            if state.get(key) != value:
                raise BadDataError(
                    f"metric state has {key}={state.get(key)!r}, expected {value!r}",
                    hint="Load a state saved by a metric built with the same settings.",
                )
        for name, tensor in self._state.items():
            value = state.get(name)
            if (
                not isinstance(value, torch.Tensor)
                or value.shape != tensor.shape
                or value.dtype != tensor.dtype
            ):
                raise BadDataError(
                    f"metric state entry {name!r} is missing or not a {tensor.dtype} tensor of shape "
                    f"{tuple(tensor.shape)}",
                    hint="Load a state saved by a metric built with the same settings.",
                )
        for name, tensor in self._state.items():
            tensor.copy_(state[name])


def _check_integer(name: str, x: torch.Tensor) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise BadDataError(
            f"{name} must hold integer class indices, got dtype {x.dtype}",
            hint="Take argmax over the class dimension and pass a long/uint8 tensor of class indices.",
        )


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


class SemanticMetrics(_SumState):
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
        _check_integer("prediction", pred)
        _check_integer("target", target)
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
            pixel_accuracy=_nan_if_zero(float(tp.sum()), float(c.sum())),
            mean_accuracy=mean_accuracy,
            fb_iou=fb_iou,
            confusion=conf.clone(),
            class_names=self.class_names,
        )


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


class ReferringMetrics(_SumState):
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
            overall_iou=_nan_if_zero(float(state["intersection"]), float(state["union"])),
            mean_iou=_nan_if_zero(float(state["iou_sum"]), count),
            precision={
                t: _nan_if_zero(float(h), count)
                for t, h in zip(self.thresholds, state["hits"].tolist(), strict=True)
            },
            count=count,
        )


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


class FewShotMetrics(_SumState):
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
