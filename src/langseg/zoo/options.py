"""Option checks shared by the families' options dataclasses."""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn

from langseg.errors import BadConfigError
from langseg.hub import clean_message

M = TypeVar("M", bound=nn.Module)

# Weight dtypes a predictor can run in, by the names the CLI's --dtype takes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def as_float_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``torch.bfloat16``) -> ``torch.bfloat16``; anything else that is not a float
    dtype is a :class:`BadConfigError` listing the names."""
    if isinstance(value, str):
        value = value.strip().lower()  # "Float16" and " bfloat16" mean what they say
        if value not in DTYPES:
            raise BadConfigError(f"unknown dtype {value!r:.80}", hint=f"Use one of {', '.join(DTYPES)}.")
        return DTYPES[value]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BadConfigError(
            f"dtype must be a float dtype such as torch.bfloat16, got {value!r:.80}",
            hint=f"Use one of {', '.join(DTYPES)} (or the torch dtype of that name).",
        )
    return value


def check_int(value: object, name: str, minimum: int | None = None, optional: bool = False) -> None:
    """A :class:`BadConfigError` unless ``value`` is an int (not a bool) ``>= minimum`` (or ``None`` when
    ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r:.80}")
    if minimum is not None and value < minimum:
        raise BadConfigError(f"{name} must be at least {minimum}, got {value}")


def check_number(value: object, name: str, positive: bool = False, optional: bool = False) -> None:
    """A :class:`BadConfigError` unless ``value`` is a finite real number (``> 0`` with ``positive``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadConfigError(f"{name} must be a finite number, got {type(value).__name__} {value!r:.80}")
    if positive and not value > 0:
        raise BadConfigError(f"{name} must be positive, got {value}")


def check_type(value: object, name: str, kind: type | tuple[type, ...], what: str) -> None:
    """A :class:`BadConfigError` unless ``value`` is ``None`` or a ``kind`` (``what`` names it)."""
    if value is not None and not isinstance(value, kind):
        raise BadConfigError(f"{name} must be {what}, got {type(value).__name__} {value!r:.80}")


def refit(name: str, loaded: nn.Module, rebuilt: M, kwargs: dict[str, object]) -> M:
    """``rebuilt`` (the network built again with ``create_model``'s keyword arguments) holding the weights
    of ``loaded``; a :class:`BadConfigError` when the arguments changed a tensor's shape."""
    try:
        rebuilt.load_state_dict(loaded.state_dict())
    except RuntimeError as err:
        raise BadConfigError(
            f"create_model({name!r}, ...): the keyword arguments {sorted(kwargs)} change the network, "
            f"so the checkpoint's weights no longer fit ({clean_message(err, 200)})",
            hint="Pass only arguments that keep the shapes (e.g. dropout), or pretrained=False.",
        ) from None
    return rebuilt
