"""langseg: segment images with language.

Public API: :func:`load` (a ready predictor), :func:`create_model` (a bare ``nn.Module``),
:func:`list_models`, the predictors :class:`Segmenter` and :class:`Referrer` and their results
:class:`SegmentationResult` and :class:`ReferringResult`, the errors in :mod:`langseg.errors`, the metrics
in :mod:`langseg.metrics` and the data in :mod:`langseg.data`.

Everything but the errors is imported on first use (PEP 562), so ``import langseg`` and
``langseg --help`` do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langseg.errors import LangsegError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load": "langseg.api",
    "create_model": "langseg.api",
    "list_models": "langseg.api",
    "Segmenter": "langseg.predict.segmenter",
    "Referrer": "langseg.predict.referrer",
    "SegmentationResult": "langseg.predict.results",
    "ReferringResult": "langseg.predict.results",
}

if TYPE_CHECKING:
    from langseg.api import create_model, list_models, load
    from langseg.predict.referrer import Referrer
    from langseg.predict.results import ReferringResult, SegmentationResult
    from langseg.predict.segmenter import Segmenter


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'langseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "LangsegError",
    "Referrer",
    "ReferringResult",
    "SegmentationResult",
    "Segmenter",
    "__version__",
    "create_model",
    "list_models",
    "load",
]
