"""Option checks shared by the families' options dataclasses."""

from __future__ import annotations

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
        if value not in DTYPES:
            raise BadConfigError(f"unknown dtype {value!r}", hint=f"Use one of {', '.join(DTYPES)}.")
        return DTYPES[value]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BadConfigError(f"dtype must be a float dtype such as torch.bfloat16, got {value!r}")
    return value
