"""What every predictor shares (the contract of segment-anything's ``SamPredictor``).

A predictor holds a network (``.model``, an ``nn.Module`` in eval mode on ``.device``) and one current
image. ``set_image(image)`` loads and prepares it once (path, PIL image, numpy array or tensor; see
:func:`~langseg.predict.images.load_image`), so that many prompts reuse its encoding;
``reset_image()`` forgets it. A prompt without an image, before any ``set_image``, raises
:class:`~langseg.errors.ImageNotSetError` in every predictor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from langseg.errors import ImageNotSetError
from langseg.predict.images import ImageInput, load_image


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
        array = load_image(image)
        self.reset_image()
        self._image = array
        self._prepare(array)

    def reset_image(self) -> None:
        """Forget the current image and everything computed from it."""
        self._image = None
        self._forget()

    def _require_image(self) -> np.ndarray:
        if self._image is None:
            raise ImageNotSetError(f"{type(self).__name__} has no image to work on")
        return self._image

    # Subclasses: turn the image into model input / drop what was computed from it.
    def _prepare(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, device={self.device})"
