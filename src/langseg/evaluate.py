"""Evaluate a predictor on a dataset with the papers' metrics, sharded across ``torchrun`` ranks.

Semantic models (``Segmenter``) are scored with mIoU / pixAcc through their own test-time plan (single
scale, or the LSeg paper's multi-scale + flip + sliding window), one image at a time at its original
size, as the papers evaluate. Referring models (``Referrer``) are scored with overall IoU, mean IoU and
Prec@0.5-0.9. Under ``torchrun`` each rank takes every ``world_size``-th sample and the metric sums are
all-reduced, so N processes give exactly the single-process result.
"""

from __future__ import annotations

from collections.abc import Callable
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
