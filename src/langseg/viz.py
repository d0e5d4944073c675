"""Palettes, overlays, legends and palette PNGs: the one place that wraps imgviz.

Colours are PASCAL VOC's label colormap (``imgviz.label_colormap``), so masks look like the VOC masks
every segmentation tool shows: index 0 is black, 1 dark red, 2 dark green, ... Semantic labels are all
things a user named, so none of them should be black: label ``k`` takes VOC colour ``k + 1``
(:func:`palette`). Referring masks keep VOC's meaning of 0 (nothing referred): expression ``k`` (from 1)
takes VOC colour ``k`` (:func:`voc_colours`). Either way the first thing named is red, the second green.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import imgviz
import numpy as np
from PIL import Image, ImageDraw, ImageFont

LegendItem = tuple[str, Sequence[int]]  # (text, RGB colour)
MIN_FONT, MAX_FONT = 6, 28


def voc_colours(num_colours: int) -> np.ndarray:
    """``num_colours x 3`` uint8 VOC colours (index 0 black); beyond imgviz's 256 the same bit pattern
    continues, so every index up to ``2**24`` keeps its own colour."""
    if num_colours <= 256:
        return np.array(imgviz.label_colormap()[:num_colours])
    # VOC's rule: bit 3j (+1, +2) of the index becomes bit 7 - j of red (green, blue).
    index = np.arange(num_colours)
    colours = np.zeros((num_colours, 3), np.uint8)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= (((index >> (3 * j + channel)) & 1) << (7 - j)).astype(np.uint8)
    return colours


def palette(num_labels: int) -> np.ndarray:
    """``num_labels x 3`` uint8 colours for semantic labels: label ``k`` takes VOC colour ``k + 1``."""
    return voc_colours(num_labels + 1)[1:]


def overlay(
    image: np.ndarray, mask: np.ndarray, colours: np.ndarray | None = None, alpha: float = 0.5
) -> Image.Image:
    """Class map blended over the ``H x W x 3`` uint8 image (``alpha`` is the weight of the colours).

    ``mask`` (``H x W`` ints) indexes ``colours`` (default :func:`palette`). A boolean mask is drawn in
    one colour (``colours[0]``, default red) over the untouched image, as for one referring result.
    """
    if mask.dtype == np.bool_:
        colour = palette(1)[0] if colours is None else np.asarray(colours)[0]
        colormap = np.stack([np.zeros(3, np.uint8), np.asarray(colour, np.uint8)])
        blended = imgviz.label2rgb(mask.astype(np.int32), image, alpha={0: 0.0, 1: alpha}, colormap=colormap)
        return Image.fromarray(blended)
    colours = palette(int(mask.max()) + 1) if colours is None else np.asarray(colours, np.uint8)
    return Image.fromarray(imgviz.label2rgb(mask, image, alpha=alpha, colormap=colours))


def overlay_without(
    image: np.ndarray,
    mask: np.ndarray,
    colours: np.ndarray,
    alpha: float = 0.5,
    skip: int | Sequence[int] = 0,
) -> Image.Image:
    """Like :func:`overlay`, but pixels of the classes ``skip`` (e.g. 0 = nothing referred, or the
    "background" label) stay untouched.

    The same blend as ``imgviz.label2rgb`` (``round((1 - a) * pixel + a * colour)``), computed only on
    the coloured pixels and in float32: a batch run draws one overlay per image, and the general
    function's float64 pass over the whole image (plus its ``np.unique``) cost more than the network.
    """
    colours = np.asarray(colours, np.uint8)
    weights = np.full(len(colours), alpha, np.float32)
    weights[[k for k in ({skip} if isinstance(skip, int) else set(skip)) if 0 <= k < len(colours)]] = 0.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    picture = np.array(image, np.uint8)
    where = weights[mask] > 0
    labels = mask[where]
    weight = weights[labels][:, None]
    blended = (1 - weight) * picture[where] + weight * colours[labels]
    picture[where] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(picture)


# imgviz's legend font: langseg draws its legends itself with one cached font per size, because imgviz
# loads the TrueType file anew for every text it measures or draws (four loads for a two-row legend: the
# largest cost of writing an image's outputs in a batch run).
LEGEND_FONT = Path(imgviz.__file__).parent / "draw" / "fonts" / "DejaVuSansMono.ttf"


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(LEGEND_FONT), size=size)


@lru_cache(maxsize=256)
def _text_size(text: str, size: int) -> tuple[int, int]:
    """(height, width) of one line of ``text`` in the legend font at ``size`` px (imgviz's measure)."""
    width, height = _font(size).getbbox(text or "\n")[2:]
    return int(height), int(width)


def _monospaced(text: str) -> bool:
    """Whether every character of ``text`` takes the font's one advance (ASCII, and the "…" that
    shortened legend texts end with)."""
    return text.isascii() or text.replace("…", "").isascii()


def _text_width(text: str, size: int) -> int:
    """Width of ``text`` at ``size`` px. imgviz's font is monospaced, so ASCII text is a character's
    width times its length: no per-text measuring for texts that change with every image."""
    if _monospaced(text):
        return -(-len(text) * _text_size("M" * 100, size)[1] // 100)  # ceiling
    return _text_size(text, size)[1]


def _legend_size(texts: Sequence[str], size: int) -> tuple[int, int]:
    """(height, width) imgviz's legend takes with its margin ``pad`` on each side (imgviz's layout)."""
    row = _text_size("Mg|", size)[0]
    pad = max(2, size // 6)
    width = max((_text_width(t, size) for t in texts), default=0)
    return row * len(texts) + 3 * pad, width + row + 4 * pad


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: max(1, length - 1)] + "…"


def fit_legend(texts: Sequence[str], width: int, height: int) -> tuple[int, list[str]]:
    """(font size, texts) for a legend inside a ``width x height`` image: the largest font up to ~1/20
    of the short side that fits, then, at the smallest font, texts shortened with "…" and rows dropped
    from the end ("+N more") until it fits."""
    texts = list(texts)
    start = int(np.clip(min(width, height) // 20, MIN_FONT + 4, MAX_FONT))
    # Monospaced ASCII: the longest text is the widest, so the search measures only it.
    widest = [max(texts, key=len)] * len(texts) if texts and all(_monospaced(t) for t in texts) else texts
    for size in range(start, MIN_FONT - 1, -1):
        rows, cols = _legend_size(widest, size)
        if rows <= height and cols <= width:
            return size, texts
    size = MIN_FONT
    row_height = _legend_size(texts[:1], size)[0] - _legend_size([], size)[0] if texts else 0
    fitting = max(1, (height - _legend_size([], size)[0]) // max(row_height, 1))
    if fitting < len(texts):
        texts = [*texts[: fitting - 1], f"+{len(texts) - fitting + 1} more"] if fitting > 1 else texts[:1]
    length = max(len(t) for t in texts)
    while length > 2 and _legend_size([_shorten(t, length) for t in texts], size)[1] > width:
        length -= 1
    return size, [_shorten(t, length) for t in texts]


def draw_legend(picture: Image.Image, items: Sequence[LegendItem], loc: str = "rb") -> Image.Image:
    """``picture`` with a legend (a colour swatch and a text per item) in corner ``loc`` (``lt``, ``rt``,
    ``lb``, ``rb``), sized by :func:`fit_legend` to stay inside the picture."""
    if not items:
        return picture
    size, texts = fit_legend([text for text, _ in items], picture.width, picture.height)
    rows, cols = _legend_size(texts, size)
    if rows > picture.height or cols > picture.width:  # too small for even one short row: no legend
        return picture
    colours = [tuple(int(c) for c in colour) for _, colour in items[: len(texts)]]
    if len(texts) < len(items):  # the "+N more" row has no colour of its own
        colours[-1] = (255, 255, 255)
    _draw_rows(picture := picture.copy(), list(zip(texts, colours, strict=True)), size, loc)
    return picture


def _draw_rows(picture: Image.Image, rows: list[tuple[str, tuple[int, ...]]], size: int, loc: str) -> None:
    """imgviz's corner legend (``imgviz.components.legend``), drawn in place: a box washed half-way to
    white, one colour swatch and one line of text per row (rows as tall as :func:`_legend_size` says)."""
    row, width = _text_size("Mg|", size)[0], max(_text_width(t, size) for t, _ in rows)
    pad = max(2, size // 6)
    box_h, box_w = row * len(rows) + pad, width + row + 2 * pad
    top = pad if loc[1] == "t" else picture.height - pad - box_h
    left = pad if loc[0] == "l" else picture.width - pad - box_w
    region = picture.crop((left, top, left + box_w, top + box_h))
    picture.paste(Image.blend(region, Image.new(region.mode, region.size, (255, 255, 255)), 0.5), (left, top))
    draw, swatch = ImageDraw.Draw(picture), row - 2 * pad
    for i, (text, colour) in enumerate(rows):
        y = top + i * row
        draw.rectangle((left + pad, y + pad, left + pad + swatch, y + pad + swatch), fill=colour)
        _draw_text(picture, draw, (left + row, y), text, size)


def _draw_text(
    picture: Image.Image, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int
) -> None:
    """Black ``text`` at ``xy``. The font is monospaced, so ASCII text is pasted glyph by glyph from a
    cache (FreeType renders each character once per size, not every legend of every image again)."""
    if not _monospaced(text):
        draw.text(xy, text, fill=(0, 0, 0), font=_font(size))
        return
    advance = _text_size("M" * 100, size)[1] / 100
    for i, char in enumerate(text):
        if not char.isspace():
            glyph = _glyph(char, size)
            picture.paste((0, 0, 0), (round(xy[0] + i * advance), xy[1]), glyph)


@lru_cache(maxsize=4096)
def _glyph(char: str, size: int) -> Image.Image:
    """One character as an anti-aliased ``"L"`` mask, one advance wide and one row tall."""
    height, width = _text_size("Mg|", size)[0], _text_size(char, size)[1]
    mask = Image.new("L", (max(width, 1), height), 0)
    ImageDraw.Draw(mask).text((0, 0), char, fill=255, font=_font(size))
    return mask


def palette_image(mask: np.ndarray, colours: np.ndarray) -> Image.Image:
    """``H x W`` class map as a VOC-style palette PNG image: PIL mode ``"P"``, pixel values the class
    indices, ``colours[k]`` the colour of index ``k``. Over 256 classes cannot fit a palette: the
    result is then a 16-bit grayscale image (mode ``"I;16"``) with the same index values."""
    if int(mask.max(initial=0)) > 255 or len(colours) > 256:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(mask.astype(np.uint8))  # mode "L"; putpalette makes it "P"
    table = np.zeros((256, 3), np.uint8)
    table[: len(colours)] = colours
    image.putpalette(table.ravel().tolist())
    return image


def save_palette_png(mask: np.ndarray, colours: np.ndarray, path: str | Path) -> None:
    """Write :func:`palette_image` of ``mask`` as a PNG at ``path``."""
    palette_image(mask, colours).save(path, format="PNG")
