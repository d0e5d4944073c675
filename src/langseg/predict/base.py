"""What every predictor shares (the contract of segment-anything's ``SamPredictor``).

A predictor holds a network (``.model``, an ``nn.Module`` in eval mode on ``.device``) and one current
image. ``set_image(image)`` loads and prepares it once (path, PIL image, numpy array or tensor; see
:func:`~langseg.predict.images.load_image`), so that many prompts reuse its encoding;
``reset_image()`` forgets it. A prompt without an image, before any ``set_image``, raises
:class:`~langseg.errors.ImageNotSetError` in every predictor.

``set_image`` is ``set_prepared(prepare(image))``: :meth:`Predictor.prepare` (decode, resize, normalise)
reads no predictor state, so a batch runs it for the next images in other threads while the network
works on the current one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from langseg.errors import BadConfigError, ImageNotSetError, LangsegError
from langseg.predict.images import ImageInput, load_image

DEVICE_HINT = (
    "Use --device auto (the best device here) or --device cpu; in Python device='auto' or 'cpu' "
    "(or a torch.device)."
)


def available_devices() -> list[str]:
    """The devices a model can run on here: ``cpu``, every ``cuda:i`` and ``mps`` when present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | int | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has, else a :class:`BadConfigError` naming it and the
    devices there are.

    Names are case-insensitive and may carry spaces around them (``"CPU"``, ``" cuda:0 "``); an int is a
    CUDA index (torch's convention); ``None`` is torch's default device (normally the CPU). ``"auto"`` is
    resolved by :func:`langseg.api.resolve_device`, not here.
    """
    given = device  # named in messages as the user wrote it
    if device is None:
        device = torch.get_default_device()
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise BadConfigError(
            f"device must be a name such as 'cpu' or 'cuda:0', a torch.device or a CUDA index, "
            f"got {type(device).__name__} {device!r}",
            hint=DEVICE_HINT,
        )
    if isinstance(device, str):
        device = device.strip().lower()  # torch itself refuses "CPU" and " cpu"
        if not device:
            raise BadConfigError("the device name is empty", hint=DEVICE_HINT)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise BadConfigError(
            f"unknown device {given!r} (devices here: {', '.join(available_devices())})", hint=DEVICE_HINT
        ) from err
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        usable = (resolved.index or 0) < count
    elif resolved.type == "mps":
        usable = torch.backends.mps.is_available()
    elif resolved.type == "meta":
        usable = False  # tensors there hold no data: a model would run and return nothing real
    else:  # xpu, xla, hpu, ...: usable if torch can put a tensor there
        try:
            torch.empty(0, device=resolved)
            usable = True
        except Exception:  # each backend fails its own way (RuntimeError, AssertionError, ...)
            usable = False
    if not usable:
        raise BadConfigError(
            f"device {given!r} is not available on this machine (devices here: "
            f"{', '.join(available_devices())})",
            hint=DEVICE_HINT,
        )
    return resolved


def as_list(
    values: Any,
    what: str,
    error: type[LangsegError],
    limit: int,
    hint: str | None = None,
    limit_hint: str | None = None,
) -> list:
    """``values`` (a list, tuple, set, generator, array, ... of items) as a list of at most ``limit``
    items; ``None``, a single string or a non-iterable is an ``error`` (with ``hint``; ``limit_hint``
    when there are too many). Reads at most ``limit + 1`` items, so an endless generator ends in an error
    instead of a hang."""
    if values is None:
        raise error(f"no {what} given (got None)", hint=hint)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise error(
            f"{what} must be a list of strings, got {type(values).__name__} {values!r:.80}", hint=hint
        )
    items = list(itertools.islice(values, limit + 1))
    if len(items) > limit:
        raise error(f"more than {limit} {what} given: over the limit of {limit}", hint=limit_hint or hint)
    return items


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool; a string such as ``"no"`` (which Python reads as true) is a BadConfigError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise BadConfigError(f"{name} must be True or False, got {type(value).__name__} {value!r:.80}")


def check_probability(value: Any, name: str, error: type[LangsegError] = BadConfigError) -> float:
    """``value`` as a float strictly between 0 and 1; a string, NaN or anything outside is an ``error``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(
            f"{name} must be a number in (0, 1), got {type(value).__name__} {value!r:.80}",
            hint=f"Pass a number such as {name}=0.5 (not a string).",
        )
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise error(f"{name} must be in (0, 1), got {value}", hint=f"Pass a number such as {name}=0.5.")
    return float(value)


@dataclass
class PreparedImage:
    """An image made ready for one predictor's network.

    Attributes:
        image: the ``H x W x 3`` uint8 RGB original.
        input: the network's input, ``1 x 3 x h x w`` normalised, on the predictor's device.
        extra: what the predictor needs to map results back (e.g. a letterbox placement).
    """

    image: np.ndarray = field(repr=False)
    input: torch.Tensor = field(repr=False)
    extra: Any = None


class Predictor:
    """Base of :class:`~langseg.predict.Segmenter` and :class:`~langseg.predict.Referrer`.

    Args:
        model: the network; moved to ``device`` and put in eval mode (frozen: predictors never train).
        device: where the model runs (see :func:`check_device`).
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = check_device(device)
        self.model = model.to(self.device).eval()
        self._image: np.ndarray | None = None

    @property
    def is_image_set(self) -> bool:
        """Whether an image is set (by :meth:`set_image` or by the last call that was given one)."""
        return self._image is not None

    @property
    def image(self) -> np.ndarray | None:
        """The current ``H x W x 3`` uint8 RGB image, or ``None``."""
        return self._image

    def set_image(self, image: ImageInput) -> None:
        """Load and prepare ``image``; later calls without an image reuse its encoding."""
        self.set_prepared(self.prepare(image))

    def prepare(self, image: ImageInput) -> PreparedImage:
        """``image`` loaded and turned into the network's input. Reads no predictor state (safe to call
        from other threads while the predictor works)."""
        array = load_image(image)
        with torch.no_grad():  # not inference_mode: the input stays an ordinary tensor for callers
            return self._prepare(array)

    def set_prepared(self, prepared: PreparedImage) -> None:
        """Make ``prepared`` (from :meth:`prepare`) the current image."""
        self.reset_image()
        self._image = prepared.image
        self._set_input(prepared)

    def reset_image(self) -> None:
        """Forget the current image and everything computed from it."""
        self._image = None
        self._forget()

    def _require_image(self) -> np.ndarray:
        if self._image is None:
            raise ImageNotSetError(f"{type(self).__name__} has no image to work on")
        return self._image

    # Subclasses: turn the image into model input (no state) / adopt it / drop what was computed from it.
    def _prepare(self, image: np.ndarray) -> PreparedImage:
        raise NotImplementedError

    def _set_input(self, prepared: PreparedImage) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, device={self.device})"
