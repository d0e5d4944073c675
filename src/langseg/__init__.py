"""langseg: segment images with language.

Public API (grows with the models): :func:`list_models`, the error types in :mod:`langseg.errors`,
the metrics in :mod:`langseg.metrics` and the ShapeWorld data in :mod:`langseg.data`.
"""

from langseg.errors import LangsegError
from langseg.registry import list_models

__version__ = "0.1.0"

__all__ = ["LangsegError", "__version__", "list_models"]
