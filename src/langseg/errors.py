"""Errors a user can cause.

Every error that bad input, a bad file or a missing resource can trigger is a :class:`LangsegError`
subclass carrying a ``hint``: what to do next. The CLI prints message and hint without a traceback and
exits with status 2. Each subclass also derives from the matching builtin (``ValueError``,
``FileNotFoundError``, ...) so that callers who catch builtins keep working.
"""

from __future__ import annotations


class LangsegError(Exception):
    """Base of every user-facing langseg error.

    Args:
        message: what went wrong, in one sentence.
        hint: what the user can do about it; subclasses provide a default.
    """

    default_hint: str = "See `langseg --help` or the README."

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class BadImageError(LangsegError, ValueError):
    """The image cannot be read or has a shape/mode we cannot turn into RGB."""

    default_hint = (
        "Pass an RGB or grayscale image file (PNG, JPEG, ...), a PIL image or an HxWx3 uint8 array."
    )


class ImageNotSetError(LangsegError, RuntimeError):
    """A predictor was asked for a result before it was given an image."""

    default_hint = "Pass the image to segment()/refer(), or call set_image(image) first."


class BadLabelsError(LangsegError, ValueError):
    """The label set for semantic segmentation is empty, duplicated or too large."""

    default_hint = 'Pass one or more distinct, non-empty labels, e.g. labels=["cat", "sofa", "other"].'


class BadExpressionError(LangsegError, ValueError):
    """A referring expression is empty or cannot be tokenised."""

    default_hint = 'Pass a sentence that names one object, e.g. "the large circle on the left".'


class MissingWeightsError(LangsegError, FileNotFoundError):
    """Model weights are neither at the given path, nor in the cache, nor downloadable."""

    default_hint = "Pass a local checkpoint path, or connect to the network once to fill the cache."


class BadConfigError(LangsegError, ValueError):
    """A configuration file, override or option value is invalid."""

    default_hint = "Check the option or config key against `langseg --help` and configs/."


class UnknownModelError(LangsegError, LookupError):
    """A model name is not in the registry."""

    default_hint = "Run `langseg models` to list the registered names."


class BadDataError(LangsegError, ValueError):
    """A dataset folder, annotation or target tensor is missing, incomplete or malformed."""

    default_hint = "Check the dataset root and its layout against docs/data.md."


class OutputError(LangsegError, OSError):
    """An output location cannot be created or written."""

    default_hint = "Choose an output folder you can write to (or fix its permissions)."


class ServiceBusyError(LangsegError, RuntimeError):
    """A server's inference queue is full, or a request did not finish within its time limit."""

    default_hint = "Retry in a few seconds, or start the server with more workers or a larger queue."


class RequestTooLargeError(LangsegError, ValueError):
    """A request to a server is over one of its limits (body size, image pixels)."""

    default_hint = "Send a smaller image (resize it), or start the server with a higher limit."


__all__ = [
    "BadConfigError",
    "BadDataError",
    "BadExpressionError",
    "BadImageError",
    "BadLabelsError",
    "ImageNotSetError",
    "LangsegError",
    "MissingWeightsError",
    "OutputError",
    "RequestTooLargeError",
    "ServiceBusyError",
    "UnknownModelError",
]
