"""Training configuration: plain dataclasses, filled from a YAML recipe plus ``key=value`` overrides.

There is no global config tree: a :class:`TrainConfig` holds an :class:`OptimConfig` and one or two
:class:`DataConfig`; a task reads what it needs from it. :func:`load_config` maps YAML onto these classes
strictly: an unknown key or a value of the wrong type raises :class:`~langseg.errors.BadConfigError`
naming the dotted key and listing the valid ones, so that a typo never silently trains with a default.

Value ranges are checked when a config is built, before any work (:data:`LIMITS` holds the upper bounds
that keep a typo such as ``max_steps: 1e12`` or ``crop_size: 100000`` from allocating absurd memory or
running for ever); every float must be finite (YAML reads ``1.0e400`` as infinity).

Free-form dicts (``model_kwargs``, ``data.kwargs``) accept any keys; the task that consumes them checks
them in turn. YAML is read by :mod:`langseg.yamlio` (bounded, no object tags, clean errors).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from langseg.errors import BadConfigError
from langseg.predict.images import CLIP_MEAN, CLIP_STD
from langseg.yamlio import load_yaml, read_yaml_file, short_repr

__all__ = [
    "LIMITS",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]

# Upper bounds of config values (inclusive unless said otherwise), far above any real run.
LIMITS: dict[str, int | float] = {
    "steps": 10**9,  # max_steps, warmup_steps, log_every, checkpoint_every, eval_every
    "epochs": 10**6,
    "grad_accum_steps": 4096,
    "keep_checkpoints": 10**6,
    "batch_size": 65536,
    "num_workers": 512,
    "crop_size": 8192,  # pixels per side, as ShapeWorld's image size
    "scale": 8.0,  # data.scale_range's high end
    "ignore_index": 65535,
    "seed": 2**63 - 1,  # torch.manual_seed's range
}

# CLIP's normalisation (open_clip OPENAI_DATASET_MEAN / STD) is the default for every langseg model;
# the constants are the predictors' own, so training and prediction cannot drift apart.


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``sgd`` (LSeg's recipe) or ``adamw``.
        lr: base learning rate (the backbone's; a task's head gets ``lr * head_lr_mult``).
        momentum, nesterov: SGD only.
        betas, eps: AdamW only.
        weight_decay: decoupled for AdamW, L2 for SGD.
        head_lr_mult: factor on the head's learning rate, passed to the task (LSeg uses 10).
        poly_power: the schedule is ``lr * (1 - t / T) ** poly_power`` over ``T`` optimiser steps.
        warmup_steps: linear warm-up over the first steps, multiplied into the poly factor.
        grad_clip_norm: clip the global gradient norm to this value; ``None`` disables clipping.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    warmup_steps: int = 0
    grad_clip_norm: float | None = None

    def __post_init__(self) -> None:
        _finite(self, "lr", "weight_decay", "head_lr_mult", "poly_power", "momentum", "eps", "grad_clip_norm")
        _finite(self, "betas")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.head_lr_mult > 0, "head_lr_mult", f"must be > 0, got {self.head_lr_mult}")
        _check(self.poly_power >= 0, "poly_power", f"must be >= 0, got {self.poly_power}")
        _in_range(self, "warmup_steps", 0, LIMITS["steps"])
        _check(0 <= self.momentum <= 1, "momentum", f"must be in [0, 1], got {self.momentum}")
        for i, beta in enumerate(self.betas):
            _check(0 <= beta < 1, f"betas[{i}]", f"must be in [0, 1), got {beta}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            "grad_clip_norm",
            f"must be > 0 or null, got {self.grad_clip_norm}",
        )


@dataclass
class DataConfig:
    """One dataset and how it is loaded and augmented.

    Attributes:
        name: a registered dataset (:func:`langseg.data.list_datasets`), e.g. ``shapeworld-semantic``.
        kwargs: the dataset's settings, ``build_dataset(name, kwargs)`` (e.g. ``num_scenes``, ``seed``,
            ``size``, ``granularity``; ``root``, ``split`` for the benchmarks).
        batch_size: samples per micro-batch *per process*.
        num_workers: DataLoader worker processes.
        crop_size: side of the square training crop; ``None`` crops back to each image's own size.
        scale_range: random rescaling factor range before cropping (``(1, 1)`` disables it).
        hflip: random horizontal flips (referring text gets "left" and "right" swapped).
        mean, std: per-channel normalisation of ``[0, 1]`` images (CLIP's by default).
        ignore_index: label of unlabelled pixels in semantic masks (crop padding uses it).
    """

    name: str = "shapeworld-semantic"
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    num_workers: int = 0
    crop_size: int | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    ignore_index: int = 255

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must name a dataset (langseg.data.list_datasets())")
        _in_range(self, "batch_size", 1, LIMITS["batch_size"])
        _in_range(self, "num_workers", 0, LIMITS["num_workers"])
        if self.crop_size is not None:
            _in_range(self, "crop_size", 1, LIMITS["crop_size"])
        _in_range(self, "ignore_index", 0, LIMITS["ignore_index"])
        _finite(self, "scale_range", "mean", "std")
        lo, hi = self.scale_range
        _check(0 < lo <= hi, "scale_range", f"need 0 < low <= high, got {list(self.scale_range)}")
        _check(hi <= LIMITS["scale"], "scale_range", f"high end must be <= {LIMITS['scale']}, got {hi}")
        _check(all(s > 0 for s in self.std), "std", f"must be positive, got {list(self.std)}")


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Attributes:
        task: name of a registered task (:func:`langseg.train.tasks.register_task`), e.g. ``toy-semantic``.
        model: model name the task builds (the task checks it); ``model_kwargs`` go to its builder.
        data, val_data: training and (optional) validation data.
        optim: optimiser and schedule.
        epochs: passes over the training data, unless ``max_steps`` is set.
        max_steps: total optimiser steps; overrides ``epochs`` and sets the schedule's length.
        grad_accum_steps: micro-batches per optimiser step (effective batch =
            ``batch_size * grad_accum_steps * world_size``).
        precision: ``fp32``, or autocast to ``bf16`` / ``fp16`` (with a gradient scaler).
        channels_last: keep the module's 4-D weights and the batches' images channels-last (NHWC in
            memory), which oneDNN's CPU convolutions run faster (a small VLT: 1.3x per step); the same
            arithmetic, so the same loss curve up to rounding.
        seed: seeds model initialisation, data order, augmentation and per-rank RNGs.
        out_dir: checkpoints (``out_dir/checkpoints``) and ``out_dir/metrics.jsonl``.
        log_every: optimiser steps between training log records.
        checkpoint_every: optimiser steps between checkpoints; 0 = end of each epoch only (and the end).
        keep_checkpoints: how many step checkpoints to keep (older ones are deleted); 0 keeps all.
        eval_every: optimiser steps between evaluations; 0 = end of each epoch (and the end).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        progress: show a progress bar on rank 0 (only when stderr is a terminal).
        deterministic: ask torch for deterministic kernels (slower on GPU).
        find_unused_parameters: passed to DistributedDataParallel.
        init_from: weights to start from (fine-tuning): a training checkpoint (``step_*.pt``) or a model
            folder this task exports; the optimiser, schedule and step count start fresh. A resumed run
            ignores it (its checkpoint holds everything).
    """

    task: str = "toy-semantic"
    model: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 1
    max_steps: int | None = None
    grad_accum_steps: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    seed: int = 0
    out_dir: str = "runs/train"
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    eval_every: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    deterministic: bool = False
    find_unused_parameters: bool = False
    init_from: str | None = None

    def __post_init__(self) -> None:
        _in_range(self, "seed", 0, LIMITS["seed"])
        _in_range(self, "epochs", 1, LIMITS["epochs"])
        if self.max_steps is not None:
            _in_range(self, "max_steps", 1, LIMITS["steps"])
        _in_range(self, "grad_accum_steps", 1, LIMITS["grad_accum_steps"])
        _in_range(self, "log_every", 1, LIMITS["steps"])
        _in_range(self, "checkpoint_every", 0, LIMITS["steps"])
        _in_range(self, "eval_every", 0, LIMITS["steps"])
        _in_range(self, "keep_checkpoints", 0, LIMITS["keep_checkpoints"])
        _check(bool(self.out_dir) and "\x00" not in self.out_dir, "out_dir", "must be a folder path")
        _check(self.init_from is None or "\x00" not in self.init_from, "init_from", "must be a path")


class _RangeError(BadConfigError):
    """A value out of range, raised by ``__post_init__``; :func:`_from_dict` adds the section prefix."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"config key {key!r} {detail}", hint="Fix the value in the YAML or override.")
        self.key, self.detail = key, detail


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _RangeError(key, message)


def _in_range(config: Any, key: str, low: float, high: float) -> None:
    """``low <= config.key <= high`` (the value is shown bounded: it may be a 5000-digit integer)."""
    value = getattr(config, key)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(number and low <= value <= high, key, f"must be in [{low}, {high}], got {short_repr(value)}")


def _finite(config: Any, *keys: str) -> None:
    """Every number of ``config.key`` (a number, a tuple of numbers or None) is finite."""
    for key in keys:
        value = getattr(config, key)
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        _check(not bad, key, f"must be a finite number, got {bad[0] if bad else value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and lightly converted to) type ``tp``; ``key`` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[BadConfigError] = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except BadConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # X | None: X's own message and hint say more
            raise errors[0]
        raise _type_error(key, value, _type_name(tp))
    if origin is Literal:
        if value not in args:
            raise BadConfigError(
                f"config key {key!r}: {short_repr(value)} is not one of {', '.join(map(repr, args))}",
                hint=f"Set {key} to one of {', '.join(map(str, args))}.",
            )
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(key, value, f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, "a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, value, "an integer")
        return value
    if tp is float:
        # PyYAML reads "1e-4" (no dot) as a string (YAML 1.1); accept numeric strings for float keys.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _type_error(key, value, "a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise _type_error(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(key, value, "a string")
        return value
    raise TypeError(f"config type {tp!r} of {key!r} is not supported")  # a bug in this file, not user error


def _type_error(key: str, value: Any, expected: str) -> BadConfigError:
    return BadConfigError(
        f"config key {key!r} must be {expected}, got {short_repr(value)} ({type(value).__name__})",
        hint="Fix the value in the YAML file or in the key=value override.",
    )


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys and bad types raise)."""
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise _type_error(prefix or "<config>", data, f"a mapping of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        name = str(unknown[0]) if len(str(unknown[0])) <= 40 else str(unknown[0])[:37] + "..."
        key = f"{prefix}.{name}" if prefix else name
        raise BadConfigError(
            f"unknown config key {key!r}", hint=f"Valid keys at {where}: {', '.join(names)}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except _RangeError as err:
        if not prefix or err.key.startswith(prefix + "."):
            raise
        raise _RangeError(f"{prefix}.{err.key}", err.detail) from None


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain data (as in YAML), checked strictly."""
    return _from_dict(TrainConfig, data)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain data (dicts, lists, numbers, strings) that :func:`config_from_dict` reads back."""

    def plain(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise BadConfigError(
                f"override {short_repr(key)}: {short_repr('.'.join(parts[: i + 1]))} is not a mapping",
                hint="Only keys of sections (optim, data, ...) take dotted paths.",
            )
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` applied in order (values parsed as YAML)."""
    for item in overrides:
        if not isinstance(item, str):
            raise BadConfigError(f"override {short_repr(item)} is not a 'key=value' string")
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise BadConfigError(
                f"override {short_repr(item)} is not of the form key=value",
                hint="Write overrides as dotted.key=value, e.g. optim.lr=0.001 data.batch_size=4.",
            )
        value = load_yaml(text, f"override {short_repr(item, 60)}") if text.strip() else None
        _set_dotted(data, key, value)
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe (or start from defaults when ``path`` is ``None``) and apply overrides.

    Args:
        path: YAML file whose keys mirror :class:`TrainConfig` (nested sections for ``data``, ``optim``).
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``optim.lr=1e-3``,
            ``data.scale_range=[1,1]``, ``val_data=null``).

    Raises:
        BadConfigError: the file is missing or not YAML, an override is malformed, a key is unknown or a
            value has the wrong type or range.
    """
    data: Any = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_file(path)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise BadConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, list(overrides)))
