"""What ``segment()`` and ``refer()`` return: masks at the original image size plus what made them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from langseg import viz


@dataclass
class SegmentationResult:
    """Open-vocabulary segmentation of one image.

    Attributes:
        mask: ``H x W`` int64, each pixel the index of its label in ``labels``.
        labels: the label names, in the order the user gave them.
        scores: ``K x H x W`` float32 per-label probabilities (softmax over labels), or ``None`` when the
            predictor was asked not to keep them (they are large for big images and many labels).
        image: the ``H x W x 3`` uint8 RGB image that was segmented.
    """

    mask: np.ndarray
    labels: list[str]
    image: np.ndarray = field(repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)

    def areas(self) -> dict[str, float]:
        """Share of the image each label covers, for labels that cover any pixel."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.labels))
        return {label: float(c) / self.mask.size for label, c in zip(self.labels, counts, strict=True) if c}

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The label colours blended over the image."""
        return viz.overlay(self.image, self.mask, viz.palette(len(self.labels)), alpha)

    def legend(self) -> Image.Image:
        return viz.legend(self.labels)


@dataclass
class ReferringResult:
    """Referring segmentation of one image for one expression.

    Attributes:
        mask: ``H x W`` bool, the referred object.
        score: the model's confidence that the mask is right, in [0, 1].
        text: the expression.
        probability: ``H x W`` float32 per-pixel foreground probability.
        image: the ``H x W x 3`` uint8 RGB image.
    """

    mask: np.ndarray
    score: float
    text: str
    image: np.ndarray = field(repr=False)
    probability: np.ndarray | None = field(default=None, repr=False)

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        return viz.overlay(self.image, self.mask, alpha=alpha)
