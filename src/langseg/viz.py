"""Palettes, overlays and legends for segmentation results."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw


def palette(num_colours: int) -> np.ndarray:
    """``num_colours x 3`` uint8 colours, well separated and the same for every call.

    Hues follow the golden-angle sequence (neighbouring indices get distant hues) at alternating
    saturation/value, so even a few hundred labels stay distinguishable from their neighbours.
    """
    colours = np.zeros((num_colours, 3), dtype=np.uint8)
    for i in range(num_colours):
        hue = (i * 0.618033988749895) % 1.0
        saturation = (0.85, 0.55, 0.95)[i % 3]
        value = (0.95, 0.75, 0.6)[(i // 3) % 3]
        colours[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colours


def colourise(mask: np.ndarray, colours: np.ndarray | None = None) -> np.ndarray:
    """``H x W x 3`` uint8 picture of an ``H x W`` class map (classes index ``colours``)."""
    colours = palette(int(mask.max()) + 1) if colours is None else colours
    return colours[mask]


def overlay(
    image: np.ndarray, mask: np.ndarray, colours: np.ndarray | None = None, alpha: float = 0.5
) -> Image.Image:
    """Class map blended over the ``H x W x 3`` uint8 image; ``alpha`` is the weight of the colours.

    A boolean mask is drawn in one colour over the untouched image, as for a referring result.
    """
    base = image.astype(np.float32)
    if mask.dtype == np.bool_:
        colour = np.array([255, 40, 40] if colours is None else colours[0], dtype=np.float32)
        out = base.copy()
        out[mask] = (1 - alpha) * base[mask] + alpha * colour
    else:
        out = (1 - alpha) * base + alpha * colourise(mask, colours).astype(np.float32)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def legend(labels: list[str], colours: np.ndarray | None = None, row_height: int = 18) -> Image.Image:
    """A small image listing each label next to its colour swatch."""
    colours = palette(len(labels)) if colours is None else colours
    width = 24 + 7 * max((len(label) for label in labels), default=1)
    canvas = Image.new("RGB", (width, row_height * max(len(labels), 1) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        top = 2 + i * row_height
        draw.rectangle((2, top + 2, 16, top + row_height - 3), fill=tuple(int(c) for c in colours[i]))
        draw.text((22, top + 3), label, fill="black")
    return canvas
