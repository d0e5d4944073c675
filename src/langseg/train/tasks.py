"""The task registry and the built-in ``toy-semantic`` task.

A *task* turns a :class:`~langseg.train.config.TrainConfig` into what the engine trains::

    def build_my_task(config: TrainConfig) -> TaskParts:
        return TaskParts(module, train_dataset, val_dataset_or_None, evaluator_or_None)

    register_task("my-task", build_my_task)      # at import of the task's module

The *train module* is an ``nn.Module`` with

- ``forward(batch: dict) -> dict`` returning at least ``{"loss": scalar tensor}`` (plus e.g. ``"logits"``);
  ``batch`` is a collated batch on the training device with ``batch["image"]`` a normalised float
  ``B x 3 x H x W`` tensor, ``batch["mask"]`` ``B x H x W`` (int64 semantic / bool referring) and lists
  for ``labels`` / ``text`` / ``meta``;
- ``param_groups(base_lr) -> list[dict]`` (optional): optimiser groups, e.g. the head at
  ``base_lr * config.optim.head_lr_mult`` (see :func:`langseg.train.optim.head_backbone_groups`);
- ``predict(batch) -> tensor``: ``B x H x W`` class indices (semantic) or bool masks (referring), what
  the evaluator scores, called in ``eval()`` mode under ``torch.no_grad()``.

The evaluator is one of :mod:`langseg.evaluate`'s (``evaluator(module.predict, batches) -> metric``,
e.g. :class:`~langseg.evaluate.SemanticEvaluator`); the engine sums its metric across ranks. Datasets
come from :func:`langseg.data.build_dataset` by the name and keywords of a
:class:`~langseg.train.config.DataConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from langseg.data import build_dataset
from langseg.errors import BadConfigError
from langseg.evaluate import Evaluator, SemanticEvaluator
from langseg.train.config import TrainConfig
from langseg.train.losses import cross_entropy
from langseg.train.optim import head_backbone_groups

__all__ = [
    "TaskBuilder",
    "TaskParts",
    "ToySegmenter",
    "build_toy_semantic",
    "get_task",
    "list_tasks",
    "register_task",
]

Batch = dict[str, Any]


class TaskParts(NamedTuple):
    """What a task builder returns (a tuple, so ``module, train, val, evaluate = parts`` works)."""

    module: nn.Module
    train_dataset: Dataset
    val_dataset: Dataset | None = None
    evaluate: Evaluator | None = None


TaskBuilder = Callable[[TrainConfig], TaskParts]

_TASKS: dict[str, TaskBuilder] = {}


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
    train = build_dataset(config.data.name, config.data.kwargs)
    val = build_dataset(config.val_data.name, config.val_data.kwargs) if config.val_data is not None else None
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
