"""What gets scored and how: the evaluators, and the one loop behind ``langseg eval`` and validation.

An *evaluator* has one contract, ``evaluator(predict, batches) -> metric``:

- ``batches``: collated sample dicts (``image`` ``B x 3 x H x W``, ``mask`` ``B x H x W``, and lists
  ``labels`` / ``text`` / ``meta`` of length ``B``; see :mod:`langseg.data`), this rank's share only;
- ``predict(batch) -> B x H x W`` tensor: class indices (semantic and few-shot) or bool masks (referring);
- ``metric``: an un-reduced :class:`~langseg.metrics.SemanticMetrics`, :class:`~langseg.metrics.
  FewShotMetrics` or :class:`~langseg.metrics.ReferringMetrics` (``update``, ``all_reduce()``,
  ``compute().as_dict()``).

:func:`run_evaluator` runs one and sums its metric over the ``torch.distributed`` ranks. Two callers:

- :func:`evaluate` (``langseg eval``): a per-image predictor (``Segmenter`` / ``Referrer``) on a raw
  dataset, one sample at a time at the size the dataset gives (the original image for the semantic and
  referring benchmarks; 480 x 480 for the few-shot ones, as LSeg's zero-shot protocol squashes every
  query, see :mod:`langseg.data.fewshot_protocol`), as the papers evaluate; each ``torchrun`` rank
  takes every ``world_size``-th sample, so N processes give exactly the single-process scores;
- :func:`langseg.train.engine.evaluate`: a train module's ``predict`` on DataLoader batches (periodic
  validation).

Which evaluator a dataset needs (:func:`evaluator_for`): semantic datasets (a ``labels`` attribute) are
scored with mIoU / pixAcc; few-shot ones, whose samples carry their own ``["others", class]`` labels
and ``meta["class_id"]`` (PASCAL-5i, COCO-20i, FSS-1000), as LSeg's zero-shot protocol does: mIoU over
the classes of the foreground IoU, and FB-IoU; referring ones (samples with ``text``) with overall IoU,
mean IoU and Prec@0.5-0.9.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import Dataset

from langseg.distributed import ShardedSampler, init_distributed, shutdown_distributed
from langseg.errors import BadConfigError, BadDataError
from langseg.metrics import FewShotMetrics, ReferringMetrics, SemanticMetrics

__all__ = [
    "Evaluator",
    "FewShotEvaluator",
    "Predict",
    "ReferringEvaluator",
    "SemanticEvaluator",
    "evaluate",
    "evaluator_for",
    "json_safe",
    "predict_fn",
    "run_evaluator",
    "scores_json",
]

Batch = dict[str, Any]
Predict = Callable[[Batch], torch.Tensor]


class Metric(Protocol):
    def all_reduce(self) -> Any: ...
    def compute(self) -> Any: ...


Evaluator = Callable[[Predict, Iterable[Batch]], Metric]


class SemanticEvaluator:
    """Scores ``predict(batch)`` (``B x H x W`` class indices) against ``batch["mask"]`` with
    :class:`~langseg.metrics.SemanticMetrics` over the ``num_classes`` classes ``class_names``."""

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255
    ) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else None

    def __call__(self, predict: Predict, batches: Iterable[Batch]) -> SemanticMetrics:
        metrics = SemanticMetrics(self.num_classes, self.ignore_index, self.class_names)
        for batch in batches:
            metrics.update(predict(batch), batch["mask"])
        return metrics


class FewShotEvaluator:
    """Scores ``predict(batch)`` (``B x H x W``, 1 = the sample's class, 0 = others) against
    ``batch["mask"]`` per ``meta["class_id"]`` with :class:`~langseg.metrics.FewShotMetrics`."""

    def __init__(self, max_classes: int = 1024, ignore_index: int = 255) -> None:
        self.max_classes, self.ignore_index = max_classes, ignore_index

    def __call__(self, predict: Predict, batches: Iterable[Batch]) -> FewShotMetrics:
        metrics = FewShotMetrics(self.max_classes, self.ignore_index)
        for batch in batches:
            preds = predict(batch)
            for meta, pred, target in zip(batch["meta"], preds, batch["mask"], strict=True):
                metrics.update(int(meta["class_id"]), pred, target)
        return metrics


class ReferringEvaluator:
    """Scores ``predict(batch)`` (``B x H x W`` bool) against ``batch["mask"]`` with
    :class:`~langseg.metrics.ReferringMetrics`."""

    def __call__(self, predict: Predict, batches: Iterable[Batch]) -> ReferringMetrics:
        metrics = ReferringMetrics()
        for batch in batches:
            metrics.update(predict(batch), batch["mask"])
        return metrics


def run_evaluator(evaluator: Evaluator, predict: Predict, batches: Iterable[Batch]) -> Any:
    """``evaluator(predict, batches)``, summed over every ``torch.distributed`` rank, then computed.

    Every rank must call this together, each with its own share of the batches (one process: no group
    needed). Returns the metric's ``compute()`` (e.g. :class:`~langseg.metrics.SemanticScores`), the
    same on every rank; ``.as_dict()`` gives plain floats.
    """
    metric = evaluator(predict, batches)
    metric.all_reduce()
    return metric.compute()


_KINDS_HINT = (
    "Evaluate semantic models (segment(): LSeg, dense CLIP) on semantic or few-shot datasets (ade20k, "
    "pascal-5i, shapeworld-semantic, ...) and referring models (refer(): VLT) on referring ones "
    "(refcoco, shapeworld-referring, ...)."
)


def evaluator_for(dataset: Dataset) -> SemanticEvaluator | FewShotEvaluator | ReferringEvaluator:
    """The evaluator ``dataset`` is scored with, judged from its first sample and its ``labels``.

    Raises:
        BadDataError: the dataset is neither semantic, few-shot nor referring (or is empty and has no
            ``labels``).
    """
    sample = dataset[0] if len(dataset) > 0 else {}  # type: ignore[arg-type]
    # Text first: a ShapeWorld folder read as referring still has the world's class ``labels``.
    if "text" in sample:
        return ReferringEvaluator()
    if "labels" in sample and "class_id" in sample.get("meta", {}):
        return FewShotEvaluator()
    labels = list(getattr(dataset, "labels", None) or [])
    if labels:
        return SemanticEvaluator(len(labels), labels)
    raise BadDataError(
        f"cannot tell how to score a {type(dataset).__name__}: it has no class labels, its samples "
        "neither per-sample labels with meta['class_id'] nor text",
        hint="Use a registered dataset (langseg.data.list_datasets()), or give yours a `labels` attribute "
        "(semantic), per-sample `labels` and meta['class_id'] (few-shot) or per-sample `text` (referring).",
    )


def _image_array(image: torch.Tensor) -> np.ndarray:
    """``H x W x 3`` uint8 array from a dataset's ``3 x H x W`` uint8 image tensor."""
    return image.permute(1, 2, 0).contiguous().cpu().numpy()


def predict_fn(predictor: Any, evaluator: Evaluator) -> Predict:
    """``predict(batch)`` of a per-image predictor, for the batches ``evaluator`` consumes.

    Semantic: ``predictor.segment(image, labels).mask`` with the evaluator's class names; few-shot: the
    same with each sample's own ``["others", class]``; referring: ``predictor.refer(image, text).mask``.
    Images are the datasets' ``uint8`` ones, at the size the dataset gives; masks come back at that size.

    Raises:
        BadConfigError: the predictor cannot do what the dataset asks (no ``segment`` / ``refer``).
    """
    # Duck typing, not isinstance: any object with segment()/refer() returning ``.mask`` can be scored.
    method = "refer" if isinstance(evaluator, ReferringEvaluator) else "segment"
    if not callable(getattr(predictor, method, None)):
        kind = "referring" if method == "refer" else "semantic"
        raise BadConfigError(
            f"a {type(predictor).__name__} has no {method}() for a {kind} dataset", _KINDS_HINT
        )
    fixed = evaluator.class_names if isinstance(evaluator, SemanticEvaluator) else None

    def predict(batch: Batch) -> torch.Tensor:
        masks = []
        for b, image in enumerate(batch["image"]):
            if method == "refer":
                result = predictor.refer(_image_array(image), batch["text"][b])
            else:
                result = predictor.segment(_image_array(image), fixed or batch["labels"][b])
            masks.append(torch.from_numpy(np.asarray(result.mask)))
        return torch.stack(masks)

    return predict


def _one_sample_batch(sample: dict[str, Any]) -> Batch:
    """A batch of one: ``image`` ``1 x 3 x H x W``, ``mask`` ``1 x H x W``, other keys one-item lists."""
    return {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v] for k, v in sample.items()}


def json_safe(value: Any) -> Any:
    """``value`` (scores: dicts, lists, numbers) with every NaN or infinite float as ``None`` and numpy
    scalars as Python numbers, so that it is valid JSON (``json.dumps`` would write bare ``NaN``)."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)) and np.size(value) == 1:
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def scores_json(scores: dict[str, Any]) -> str:
    """The JSON text ``langseg eval --out`` writes: NaN and infinite scores (e.g. the IoU of a class that
    never occurs) become ``null``; raises ``ValueError`` on anything JSON cannot hold."""
    return json.dumps(json_safe(scores), indent=2, allow_nan=False) + "\n"


def evaluate(
    predictor: Any, dataset: Dataset, limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Scores of ``predictor`` (a ``Segmenter`` or ``Referrer``) on ``dataset`` (its first ``limit``
    samples), over every ``torchrun`` rank.

    Returns ``compute().as_dict()`` of the metric (plain floats), the same on every rank.

    Raises:
        BadDataError: the dataset is of no kind :func:`evaluator_for` knows.
        BadConfigError: the predictor does not fit the dataset (a referring model on semantic data...).
    """
    evaluator = evaluator_for(dataset)
    predict = predict_fn(predictor, evaluator)
    info = init_distributed("cpu")
    try:
        count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
        shard = ShardedSampler(count, info.rank, info.world_size, shuffle=False, even=False)
        with Progress(disable=not (progress and info.is_main), transient=True) as bar:
            task = bar.add_task("evaluating", total=len(shard))

            def batches() -> Iterator[Batch]:
                for i in shard:
                    yield _one_sample_batch(dataset[i])
                    bar.advance(task)

            scores = run_evaluator(evaluator, predict, batches())
    except BaseException:
        shutdown_distributed(info, barrier=False)  # the other ranks will not reach a barrier now
        raise
    shutdown_distributed(info)
    return scores.as_dict()
