"""What ``segment()`` and ``refer()`` return: masks at the original image size plus what made them.

Both results name the same things the same way: ``mask`` (at the image size), ``scores`` (per-pixel
probabilities, kept only on request), ``image``, ``areas()``, ``overlay()`` and ``to_dict()`` (JSON-able,
masks as COCO run-length encodings); what was asked is ``labels`` for a segmentation and ``text`` for a
referring result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from langseg import viz


def to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's run-length encoding of an ``H x W`` boolean mask (``{"size": [H, W], "counts": str}``),
    the format pycocotools and every COCO tool read."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


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

    def to_dict(self) -> dict[str, Any]:
        """``{"labels", "size": [H, W], "segments": [{"label", "area", "mask": COCO RLE}, ...]}`` for the
        labels that cover any pixel (``area`` is the share of the image)."""
        areas = self.areas()
        segments = [
            {"label": label, "area": areas[label], "mask": to_coco_rle(self.mask == index)}
            for index, label in enumerate(self.labels)
            if label in areas
        ]
        return {"labels": list(self.labels), "size": list(self.mask.shape), "segments": segments}


@dataclass
class ReferringResult:
    """Referring segmentation of one image for one expression.

    Attributes:
        mask: ``H x W`` bool, the referred object.
        score: the model's confidence that the mask is right, in [0, 1].
        text: the expression.
        image: the ``H x W x 3`` uint8 RGB image.
        scores: ``H x W`` float32 per-pixel foreground probability, or ``None`` unless kept on request.
    """

    mask: np.ndarray
    score: float
    text: str
    image: np.ndarray = field(repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)

    def areas(self) -> dict[str, float]:
        """``{text: share of the image the mask covers}`` (empty when the mask is)."""
        share = float(self.mask.mean())
        return {self.text: share} if share > 0 else {}

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        return viz.overlay(self.image, self.mask, alpha=alpha)

    def to_dict(self) -> dict[str, Any]:
        """``{"text", "score", "size": [H, W], "area", "mask": COCO RLE}``."""
        return {
            "text": self.text,
            "score": self.score,
            "size": list(self.mask.shape),
            "area": float(self.mask.mean()),
            "mask": to_coco_rle(self.mask),
        }
