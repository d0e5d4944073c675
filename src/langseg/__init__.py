"""langseg: segment images with language."""

__version__ = "0.1.0"
