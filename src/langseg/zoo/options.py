"""Option checks shared by the families' options dataclasses."""

from __future__ import annotations

import math

import torch

from langseg.errors import BadConfigError

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
