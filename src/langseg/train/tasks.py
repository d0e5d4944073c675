"""Task and dataset registries, evaluators, and the built-in ``toy-semantic`` task.

A *task* turns a :class:`~langseg.train.config.TrainConfig` into what the engine trains::

    def build_my_task(config: TrainConfig) -> TaskParts:
        return TaskParts(module, train_dataset, val_dataset_or_None, evaluate_fn_or_None)

    register_task("my-task", build_my_task)      # at import of the task's module

The *train module* is an ``nn.Module`` with

- ``forward(batch: dict) -> dict`` returning at least ``{"loss": scalar tensor}`` (plus e.g. ``"logits"``);
  ``batch`` is a collated batch on the training device with ``batch["image"]`` a normalised float
  ``B x 3 x H x W`` tensor, ``batch["mask"]`` ``B x H x W`` (int64 semantic / bool referring) and lists
  for ``labels`` / ``text`` / ``meta``;
- ``param_groups(base_lr) -> list[dict]`` (optional): optimiser groups, e.g. the head at
  ``base_lr * config.optim.head_lr_mult`` (see :func:`langseg.train.optim.head_backbone_groups`);
- ``predict(batch) -> tensor``: ``B x H x W`` class indices (semantic) or bool masks (referring), used by
  the evaluators below in ``eval()`` mode under ``torch.no_grad()``.

``evaluate_fn(module, batches) -> metric`` consumes an iterable of batches (this rank's shard) and returns
an un-reduced :class:`~langseg.metrics.SemanticMetrics` / :class:`~langseg.metrics.ReferringMetrics`
(anything with ``all_reduce()`` and ``compute().as_dict()``); the engine sums it across ranks.

Datasets are built by name from a :class:`~langseg.train.config.DataConfig` (``register_dataset``);
built in: ``shapeworld-semantic``, ``shapeworld-referring`` and ``shapeworld-folder``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from langseg.data.shapes import ShapeWorldConfig
from langseg.data.shapes_datasets import ShapeWorldFolder, ShapeWorldReferring, ShapeWorldSemantic
from langseg.errors import BadConfigError
from langseg.metrics import ReferringMetrics, SemanticMetrics
from langseg.train.config import DataConfig, TrainConfig
from langseg.train.losses import cross_entropy
from langseg.train.optim import head_backbone_groups

__all__ = [
    "ReferringEvaluator",
    "SemanticEvaluator",
    "TaskParts",
    "ToySegmenter",
    "build_dataset",
    "get_task",
    "list_datasets",
    "list_tasks",
    "register_dataset",
    "register_task",
]

Batch = dict[str, Any]


class Metric(Protocol):
    def all_reduce(self) -> Any: ...
    def compute(self) -> Any: ...


EvaluateFn = Callable[[nn.Module, Iterable[Batch]], Metric]


class TaskParts(NamedTuple):
    """What a task builder returns (a tuple, so ``module, train, val, evaluate = parts`` works)."""

    module: nn.Module
    train_dataset: Dataset
    val_dataset: Dataset | None = None
    evaluate: EvaluateFn | None = None


TaskBuilder = Callable[[TrainConfig], TaskParts]
DatasetBuilder = Callable[..., Dataset]

_TASKS: dict[str, TaskBuilder] = {}
_DATASETS: dict[str, DatasetBuilder] = {}


def register_task(name: str, builder: TaskBuilder, *, overwrite: bool = False) -> TaskBuilder:
    """Register ``builder`` under ``name`` (returns it, so it also works as a plain call at import)."""
    if name in _TASKS and _TASKS[name] is not builder and not overwrite:
        raise ValueError(f"task {name!r} is already registered")
    _TASKS[name] = builder
    return builder


def get_task(name: str) -> TaskBuilder:
    """The builder registered as ``name``.

    Raises:
        BadConfigError: unknown name (the hint lists the registered ones).
    """
    if name not in _TASKS:
        raise BadConfigError(f"unknown task {name!r}", hint=f"Registered tasks: {', '.join(list_tasks())}.")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def register_dataset(name: str, builder: DatasetBuilder, *, overwrite: bool = False) -> DatasetBuilder:
    """Register ``builder(**data_config.kwargs) -> Dataset`` under ``name``."""
    if name in _DATASETS and _DATASETS[name] is not builder and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered")
    _DATASETS[name] = builder
    return builder


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def build_dataset(config: DataConfig) -> Dataset:
    """The dataset ``config.name`` built with ``config.kwargs`` (no augmentation: the engine adds it).

    Raises:
        BadConfigError: unknown dataset name or keyword (the hint lists the valid ones).
    """
    if config.name not in _DATASETS:
        raise BadConfigError(
            f"unknown dataset {config.name!r}", hint=f"Registered datasets: {', '.join(list_datasets())}."
        )
    builder = _DATASETS[config.name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in config.kwargs if k not in params]
        if unknown:
            raise BadConfigError(
                f"unknown keyword {unknown[0]!r} for dataset {config.name!r}",
                hint=f"Valid data.kwargs for {config.name}: {', '.join(params)}.",
            )
    try:
        return builder(**config.kwargs)
    except TypeError as err:  # a wrongly typed keyword reaching the dataset
        raise BadConfigError(f"bad data.kwargs for dataset {config.name!r}: {err}") from None


_WORLD_FIELDS = [f.name for f in dataclasses.fields(ShapeWorldConfig)]


def _world_config(kwargs: dict[str, Any]) -> ShapeWorldConfig:
    unknown = [k for k in kwargs if k not in _WORLD_FIELDS]
    if unknown:
        raise BadConfigError(
            f"unknown ShapeWorld setting {unknown[0]!r} in data.kwargs",
            hint=f"Valid: num_scenes, seed and the ShapeWorldConfig fields {', '.join(_WORLD_FIELDS)}.",
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists
    if "exclude_pairs" in kwargs:
        kwargs["exclude_pairs"] = tuple(tuple(pair) for pair in kwargs["exclude_pairs"])
    return ShapeWorldConfig(**kwargs)


def _shapeworld_semantic(
    num_scenes: int = 200, seed: int = 0, granularity: str = "colour_shape", **world: Any
) -> Dataset:
    return ShapeWorldSemantic(num_scenes, seed, _world_config(world), granularity)  # type: ignore[arg-type]


def _shapeworld_referring(num_scenes: int = 200, seed: int = 0, per_object: int = 3, **world: Any) -> Dataset:
    return ShapeWorldReferring(num_scenes, seed, _world_config(world), per_object)


def _shapeworld_folder(root: str, task: str = "semantic") -> Dataset:
    return ShapeWorldFolder(root, task)


register_dataset("shapeworld-semantic", _shapeworld_semantic)
register_dataset("shapeworld-referring", _shapeworld_referring)
register_dataset("shapeworld-folder", _shapeworld_folder)


class SemanticEvaluator:
    """``evaluate_fn`` for semantic tasks: ``module.predict(batch)`` (``B x H x W`` class indices)
    scored against ``batch["mask"]`` with :class:`~langseg.metrics.SemanticMetrics`."""

    def __init__(
        self, num_classes: int, class_names: list[str] | None = None, ignore_index: int = 255
    ) -> None:
        self.num_classes, self.class_names, self.ignore_index = num_classes, class_names, ignore_index

    def __call__(self, module: nn.Module, batches: Iterable[Batch]) -> SemanticMetrics:
        metrics = SemanticMetrics(self.num_classes, self.ignore_index, self.class_names)
        for batch in batches:
            metrics.update(module.predict(batch), batch["mask"])
        return metrics


class ReferringEvaluator:
    """``evaluate_fn`` for referring tasks: ``module.predict(batch)`` (``B x H x W`` bool) scored
    against ``batch["mask"]`` with :class:`~langseg.metrics.ReferringMetrics`."""

    def __call__(self, module: nn.Module, batches: Iterable[Batch]) -> ReferringMetrics:
        metrics = ReferringMetrics()
        for batch in batches:
            metrics.update(module.predict(batch), batch["mask"])
        return metrics


class ToySegmenter(nn.Module):
    """A small fully convolutional segmentation net: the ``toy-semantic`` task's train module.

    Three 3x3 conv blocks (the second dilated, for context) with GroupNorm (per sample, so the loss of
    a batch does not depend on how it is split into micro-batches), then channel dropout and a 1x1
    classifier over the features *and the input pixels* (a U-Net-like skip: with it the net leaves the
    "all background" plateau within tens of steps rather than hundreds).

    Args:
        num_classes: ``K``.
        width: channels of the hidden layers.
        dropout: channel dropout before the classifier (also exercises RNG restore on resume).
        head_lr_mult: the classifier's learning-rate factor in :meth:`param_groups`.
        ignore_index: unlabelled target value.
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 16,
        dropout: float = 0.1,
        head_lr_mult: float = 10.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()

        def block(c_in: int, dilation: int) -> nn.Sequential:
            conv = nn.Conv2d(c_in, width, 3, padding=dilation, dilation=dilation, bias=False)
            return nn.Sequential(conv, nn.GroupNorm(4 if width % 4 == 0 else 1, width), nn.ReLU())

        self.backbone = nn.Sequential(block(3, 1), block(width, 2), block(width, 1))
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(width + 3, num_classes, 1)
        self.head_lr_mult, self.ignore_index = head_lr_mult, ignore_index

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` normalised image -> ``B x K x H x W`` class scores."""
        return self.head(torch.cat([self.dropout(self.backbone(image)), image], dim=1))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, "logits": B x K x H x W}`` for a batch with ``image`` and ``mask``."""
        logits = self.logits(batch["image"])
        return {"loss": cross_entropy(logits, batch["mask"], self.ignore_index), "logits": logits}

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """``B x H x W`` int64 class indices."""
        return self.logits(batch["image"]).argmax(dim=1)

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        return head_backbone_groups(
            self.backbone.parameters(), self.head.parameters(), base_lr, self.head_lr_mult
        )


def build_toy_semantic(config: TrainConfig) -> TaskParts:
    """``toy-semantic``: :class:`ToySegmenter` on a semantic dataset (ShapeWorld by default).

    ``config.model`` must be empty or ``toy-convnet``; ``config.model_kwargs`` go to the net
    (``width``, ``dropout``).
    """
    if config.model not in ("", "toy-convnet"):
        raise BadConfigError(
            f"task toy-semantic trains model 'toy-convnet', not {config.model!r}",
            hint="Set model: toy-convnet (or leave it empty).",
        )
    allowed = {"width", "dropout"}
    unknown = sorted(set(config.model_kwargs) - allowed)
    if unknown:
        raise BadConfigError(
            f"unknown model_kwargs key {unknown[0]!r} for toy-convnet", hint="Valid: width, dropout."
        )
    train = build_dataset(config.data)
    val = build_dataset(config.val_data) if config.val_data is not None else None
    labels = list(getattr(train, "labels", []))
    if not labels:
        raise BadConfigError(
            f"dataset {config.data.name!r} has no class labels", hint="Use a semantic dataset."
        )
    module = ToySegmenter(
        len(labels),
        head_lr_mult=config.optim.head_lr_mult,
        ignore_index=config.data.ignore_index,
        **config.model_kwargs,
    )
    evaluate = SemanticEvaluator(len(labels), labels, config.data.ignore_index)
    return TaskParts(module, train, val, evaluate)


register_task("toy-semantic", build_toy_semantic)

# Last, so that register_dataset exists when it runs (it imports this module back).
import langseg.data.registry  # noqa: E402, F401  registers the benchmark datasets
