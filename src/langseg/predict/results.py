"""What ``segment()`` and ``refer()`` return: masks at the original image size plus what made them.

Every result names the same things the same way: ``mask`` (at the image size), ``scores`` (per-pixel
probabilities, kept only on request), ``image``, ``areas()``, ``overlay()`` (the colours over the image,
with a legend), ``mask_image()`` / ``save_mask()`` (a VOC-style palette PNG: pixel values are indices,
colours visible), ``to_coco_rle()`` and ``to_dict()`` (JSON-able, masks as COCO run-length encodings);
what was asked is ``labels`` for a segmentation and ``text`` for a referring result.
:class:`ReferringSet` holds several expressions' results on one image and offers the same outputs.

Colours (:mod:`langseg.viz`): semantic label ``k`` is VOC colour ``k + 1``; in a referring mask image
0 is nothing (black) and expression ``k`` (from 1) is VOC colour ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from langseg import viz

# Labels that mean "none of the others": uncoloured in overlays, the target of background_threshold.
BACKGROUND_NAMES = ("background", "other")


def to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's run-length encoding of an ``H x W`` boolean mask (``{"size": [H, W], "counts": str}``),
    the format pycocotools and every COCO tool read."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%" if share >= 0.001 else "<0.1%"


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

    def label_scores(self) -> dict[str, float]:
        """Each covering label's mean probability over its own pixels (how sure the model was of the
        pixels it gave that label); empty unless ``scores`` were kept."""
        if self.scores is None:
            return {}
        labels = self.mask.ravel()
        # The probability of each pixel's own label, then its mean per label.
        own = self.scores.reshape(len(self.labels), -1)[labels, np.arange(labels.size)]
        sums = np.bincount(labels, weights=own, minlength=len(self.labels))
        counts = np.bincount(labels, minlength=len(self.labels))
        return {label: float(s / c) for label, s, c in zip(self.labels, sums, counts, strict=True) if c}

    def colours(self) -> np.ndarray:
        """``K x 3`` uint8: the colour of each label (VOC colour ``k + 1`` for label ``k``)."""
        return viz.palette(len(self.labels))

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The label colours blended over the image (labels named background/other left uncoloured), with
        a legend (colour, label, share of the image) for the labels that cover any pixel."""
        # A "background" / "other" label stays uncoloured: painting it would tint the whole image.
        plain = [k for k, label in enumerate(self.labels) if label.lower() in BACKGROUND_NAMES]
        picture = viz.overlay_without(self.image, self.mask, self.colours(), alpha, plain)
        if not legend:
            return picture
        colours, areas = self.colours(), self.areas()
        items = [
            (f"{label} {_percent(areas[label])}", colours[k])
            for k, label in enumerate(self.labels)
            if label in areas
        ]
        return viz.draw_legend(picture, items)

    def mask_image(self) -> Image.Image:
        """The mask as a VOC-style palette image (mode ``"P"``: pixel value = label index, palette =
        :meth:`colours`; 16-bit grayscale over 256 labels)."""
        return viz.palette_image(self.mask, self.colours())

    def save_mask(self, path: str | Path) -> None:
        """Write :meth:`mask_image` as a PNG."""
        self.mask_image().save(path, format="PNG")

    def to_coco_rle(self) -> dict[str, dict[str, Any]]:
        """``{label: COCO RLE}`` for the labels that cover any pixel."""
        return {label: to_coco_rle(self.mask == self.labels.index(label)) for label in self.areas()}

    def to_dict(self) -> dict[str, Any]:
        """``{"labels", "size": [H, W], "segments": [{"index", "label", "area", "mask": COCO RLE}, ...]}``
        for the labels that cover any pixel (``area`` is the share of the image); each segment also has
        ``"score"`` (:meth:`label_scores`) when ``scores`` were kept."""
        areas, scores = self.areas(), self.label_scores()
        segments = []
        for index, label in enumerate(self.labels):
            if label not in areas:
                continue
            segment: dict[str, Any] = {"index": index, "label": label, "area": areas[label]}
            if label in scores:
                segment["score"] = scores[label]
            segment["mask"] = to_coco_rle(self.mask == index)
            segments.append(segment)
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

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The mask in red over the image, with a legend naming the expression and its score."""
        return ReferringSet([self]).overlay(alpha, legend)

    def mask_image(self) -> Image.Image:
        """The mask as a palette image: 0 nothing (black), 1 the referred object (red)."""
        return ReferringSet([self]).mask_image()

    def save_mask(self, path: str | Path) -> None:
        self.mask_image().save(path, format="PNG")

    def to_coco_rle(self) -> dict[str, Any]:
        return to_coco_rle(self.mask)

    def to_dict(self) -> dict[str, Any]:
        """``{"text", "score", "size": [H, W], "area", "mask": COCO RLE}``."""
        return {
            "text": self.text,
            "score": self.score,
            "size": list(self.mask.shape),
            "area": float(self.mask.mean()),
            "mask": to_coco_rle(self.mask),
        }


@dataclass
class ReferringSet:
    """The referring results of several expressions on one image, drawn and saved together.

    ``mask`` is an ``H x W`` index map: 0 where no expression's mask is, ``k`` where expression ``k``
    (counting from 1, in the order given) is. Where masks overlap, the pixel goes to the expression with
    the higher foreground probability there when every result kept its ``scores``, else to the earlier
    expression. :meth:`to_dict` keeps each expression's whole mask, overlaps included.
    """

    results: list[ReferringResult]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.results]

    @property
    def labels(self) -> list[str]:
        """The names of mask indices 1..N (index 0 is nothing)."""
        return self.texts

    @property
    def image(self) -> np.ndarray:
        return self.results[0].image

    @cached_property
    def mask(self) -> np.ndarray:
        masks = np.stack([r.mask for r in self.results])  # N x H x W
        dtype = np.uint8 if len(self.results) < 256 else np.uint16
        if all(r.scores is not None for r in self.results):
            scores = np.stack([r.scores for r in self.results]).astype(np.float32, copy=False)
            probability = np.where(masks, scores, np.float32(-1.0))
            best = probability.argmax(0)  # ties go to the earlier expression
        else:
            best = masks.argmax(0)  # the first True along the expressions
        return np.where(masks.any(0), best + 1, 0).astype(dtype)

    def areas(self) -> dict[str, float]:
        """``{text: share of the image}`` of each expression's whole mask (empty masks left out)."""
        return {r.text: share for r in self.results for share in r.areas().values()}

    def colours(self) -> np.ndarray:
        """``(N + 1) x 3`` uint8: black for nothing, then VOC colour ``k`` for expression ``k``."""
        return viz.voc_colours(len(self.results) + 1)

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """Each expression's mask in its own colour over the image; the legend gives each expression
        (with its share of the image) and the model's score."""
        picture = viz.overlay_without(self.image, self.mask, self.colours(), alpha, skip=0)
        if not legend:
            return picture
        colours = self.colours()
        items = [
            (f"{r.text} ({r.score:.2f}, {_percent(float(r.mask.mean()))})", colours[k])
            for k, r in enumerate(self.results, start=1)
        ]
        return viz.draw_legend(picture, items)

    def mask_image(self) -> Image.Image:
        """:attr:`mask` as a VOC-style palette image (mode ``"P"``, palette :meth:`colours`)."""
        return viz.palette_image(self.mask, self.colours())

    def save_mask(self, path: str | Path) -> None:
        self.mask_image().save(path, format="PNG")

    def to_coco_rle(self) -> list[dict[str, Any]]:
        """One COCO RLE per expression, of its whole mask."""
        return [r.to_coco_rle() for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        """``{"texts", "size": [H, W], "expressions": [{"index", "text", "score", "area", "mask"}, ...]}``
        with ``index`` the expression's value in :attr:`mask` (from 1)."""
        return {
            "texts": self.texts,
            "size": list(self.image.shape[:2]),
            "expressions": [
                {"index": k, **{key: v for key, v in r.to_dict().items() if key != "size"}}
                for k, r in enumerate(self.results, start=1)
            ],
        }
