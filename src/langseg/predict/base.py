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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from langseg.errors import ImageNotSetError
from langseg.predict.images import ImageInput, load_image


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
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
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
