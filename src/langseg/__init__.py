"""langseg: segment images with language.

Public API: :func:`load` (a ready predictor), :func:`create_model` (a bare ``nn.Module``),
:func:`list_models`, the predictors and results in :mod:`langseg.predict`, the errors in
:mod:`langseg.errors`, the metrics in :mod:`langseg.metrics` and the ShapeWorld data in
:mod:`langseg.data`.
"""

from langseg.api import create_model, load
from langseg.errors import LangsegError
from langseg.registry import list_models as _list_models

__version__ = "0.1.0"


def list_models(task: str | None = None, family: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by task (semantic/referring) and family."""
    import langseg.models  # noqa: F401  (registers the models)

    return _list_models(task=task, family=family)


__all__ = ["LangsegError", "__version__", "create_model", "list_models", "load"]
