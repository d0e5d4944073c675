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

import math
from collections.abc import Callable, Iterator
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
from langseg.yamlio import short_repr

__all__ = [
    "TaskBuilder",
    "TaskParts",
    "ToySegmenter",
    "build_toy_semantic",
    "check_model_kwargs",
    "get_task",
    "list_tasks",
    "network_errors",
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


# --- model_kwargs checks, shared by every task ---------------------------------------------------------

# Sizes of a network (channels, heads, layers, token positions ...): positive integers, bounded so that a
# typo cannot ask torch for terabytes (an 8192-wide 3x3 convolution already holds 600M weights).
_SIZE_KEYS = {
    "width", "widths", "features", "embed_dim", "hidden_dim", "fusion_dim", "ffn_dim", "word_dim",
    "num_heads", "heads", "layers", "depth", "encoder_layers", "decoder_layers", "num_queries",
    "input_size", "img_size", "patch_size", "context_length", "spatial_reg_depth", "out_stride",
    "min_count", "max_size", "max_tokens",
}  # fmt: skip
MAX_MODEL_SIZE = 8192
MAX_VOCAB = 1_000_000


def _leaves(value: Any, key: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted key, leaf name, value) of every scalar in nested dicts and lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, key.rsplit(".", 1)[-1].split("[")[0], value


def check_model_kwargs(kwargs: dict[str, Any], prefix: str = "model_kwargs") -> None:
    """BadConfigError naming the dotted key of the first ``model_kwargs`` value out of range: sizes
    (widths, dims, heads, layers, ...) must be integers in ``[1, 8192]`` (``vocab_size`` up to 10**6),
    dropouts in ``[0, 1)``, ``logit_scale`` > 0, and every number finite and of sane magnitude."""
    for key, name, value in _leaves(kwargs, prefix):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        problem = None
        if isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number"
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**31:
            problem = "is absurdly large"
        elif name in _SIZE_KEYS or name == "vocab_size":
            high = MAX_VOCAB if name == "vocab_size" else MAX_MODEL_SIZE
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high
            ):
                problem = f"must be an integer in [1, {high}]"
        elif "dropout" in name or name.endswith("drop_rate") or name == "drop_path_rate":
            if not number or not 0 <= value < 1:
                problem = "must be a number in [0, 1)"
        elif name == "logit_scale" and (not number or value <= 0):
            problem = "must be a number > 0"
        if problem:
            raise BadConfigError(
                f"config key {key!r} {problem}, got {short_repr(value)}",
                hint="Fix the value in the YAML or the override.",
            )


# What a network constructor raises when a model_kwargs value of the right type still cannot build it
# (e.g. a width torch cannot allocate): translated to BadConfigError by the tasks.
network_errors = (TypeError, ValueError, RuntimeError, OverflowError, AssertionError, KeyError, MemoryError)


def network_error(err: Exception, model: str) -> BadConfigError:
    """The BadConfigError for ``err`` raised while building ``model`` from ``model_kwargs``."""
    return BadConfigError(
        f"cannot build {model} from model_kwargs: {short_repr(str(err), 160).strip(chr(39))}",
        hint="Check the names, types and sizes in model_kwargs against the model's builder.",
    )


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
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_MODEL_SIZE:
            raise BadConfigError(
                f"ToySegmenter width must be an integer in [1, {MAX_MODEL_SIZE}], got {width!r}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise BadConfigError(f"ToySegmenter dropout must be in [0, 1), got {dropout!r}")

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
    check_model_kwargs(config.model_kwargs)
    dropout = config.model_kwargs.get("dropout", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise BadConfigError(f"config key 'model_kwargs.dropout' must be a number in [0, 1), got {dropout!r}")
    train = build_dataset(config.data.name, config.data.kwargs)
    val = build_dataset(config.val_data.name, config.val_data.kwargs) if config.val_data is not None else None
    labels = list(getattr(train, "labels", []))
    if not labels:
        raise BadConfigError(
            f"dataset {config.data.name!r} has no class labels", hint="Use a semantic dataset."
        )
    try:
        module = ToySegmenter(
            len(labels),
            head_lr_mult=config.optim.head_lr_mult,
            ignore_index=config.data.ignore_index,
            **config.model_kwargs,
        )
    except network_errors as err:
        raise network_error(err, "toy-convnet") from None
    evaluate = SemanticEvaluator(len(labels), labels, config.data.ignore_index)
    return TaskParts(module, train, val, evaluate)


register_task("toy-semantic", build_toy_semantic)
