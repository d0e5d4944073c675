"""Image loading, test-time plans and visualisation, against independent references."""

from __future__ import annotations

import io
from pathlib import Path

import imgviz
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from langseg.errors import BadImageError
from langseg.predict import (
    InferencePlan,
    ReferringResult,
    ReferringSet,
    SegmentationResult,
    load_image,
    run_plan,
    sliding_window,
    upsample_argmax,
)
from langseg.predict.tta import window_starts
from langseg.viz import draw_legend, fit_legend, overlay, overlay_without, palette, palette_image, voc_colours

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


# ---------------------------------------------------------------- images


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgb_from_every_input_kind(tmp_path: Path) -> None:
    pil = Image.fromarray(RGB)
    for source in (
        RGB,
        pil,
        save(pil, tmp_path / "a.png"),
        str(save(pil, tmp_path / "b.png")),
        torch.from_numpy(RGB).permute(2, 0, 1),
        torch.from_numpy(RGB).permute(2, 0, 1).float() / 255,
        RGB.astype(np.float64) / 255,
    ):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        assert np.array_equal(out, RGB)


def test_grayscale_16bit_cmyk_and_alpha(tmp_path: Path) -> None:
    gray = RGB[..., 0]
    assert np.array_equal(
        load_image(save(Image.fromarray(gray), tmp_path / "g.png")), np.stack([gray] * 3, -1)
    )

    deep = (gray.astype(np.uint16) * 257).astype(np.uint16)  # 16-bit gray: v * 257 maps back to v
    path = save(Image.fromarray(deep), tmp_path / "d.png")
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(load_image(path)[..., 0], gray)

    cmyk = Image.fromarray(RGB).convert("CMYK")
    path = save(cmyk, tmp_path / "c.jpg", quality=100)
    assert np.abs(load_image(path).astype(int) - np.asarray(Image.open(path).convert("RGB"))).max() == 0

    rgba = np.concatenate([RGB, np.zeros((20, 30, 1), np.uint8)], -1)
    rgba[:10, :, 3] = 255  # top half opaque, bottom half fully transparent -> white
    out = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert np.array_equal(out[:10], RGB[:10]) and (out[10:] == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.shape == (30, 20, 3)
    expected = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(
    "source",
    [
        "no/such/file.png",
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.full((4, 4, 3), 2.0),
        np.full((4, 4, 3), np.nan),
        torch.zeros(3, 4, 3),
        42,
    ],
)
def test_bad_images_are_clear_errors(source) -> None:
    with pytest.raises(BadImageError) as info:
        load_image(source)
    assert info.value.hint


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(BadImageError, match=r"cut\.png"):
        load_image(path)


def test_image_file_bytes_load_like_the_file(tmp_path: Path) -> None:
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: bytes are turned upright as files are
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif, quality=100)
    data = path.read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        assert np.array_equal(load_image(source), load_image(path))
    for bad, message in ((b"", "empty"), (b"not an image", "no image format"), (data[:300], "readable")):
        with pytest.raises(BadImageError, match=message) as info:
            load_image(bad)
        assert info.value.hint


def test_image_bytes_over_the_pixel_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels: over twice the limit
    with pytest.raises(BadImageError, match="too large to decode safely"):
        load_image(buffer.getvalue())


# ---------------------------------------------------------------- test-time plans


def test_window_starts_cover_and_end_flush() -> None:
    assert window_starts(10, 10, 3) == [0]
    assert window_starts(5, 10, 3) == [0]
    assert window_starts(20, 8, 5) == [0, 5, 10, 12]
    for length, crop, stride in [(97, 32, 21), (64, 32, 32), (33, 32, 21)]:
        starts = window_starts(length, crop, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + crop] = True
        assert covered.all() and starts[-1] + crop == length


def pointwise_fn(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'model': output depends only on the pixel, so windows cannot change the result."""
    return torch.cat([x.sum(1, keepdim=True), (x[:, :1] * x[:, 1:2])], dim=1)


def test_sliding_window_of_a_pointwise_model_equals_one_pass() -> None:
    image = torch.randn(1, 3, 37, 53, dtype=torch.float64)
    out = sliding_window(pointwise_fn, image, crop=16, stride=11, batch_size=3)
    assert torch.allclose(out, pointwise_fn(image))
    small = torch.randn(1, 3, 5, 7, dtype=torch.float64)  # smaller than a window: padded and cropped back
    assert torch.allclose(sliding_window(pointwise_fn, small, crop=16, stride=11), pointwise_fn(small))


def test_sliding_window_averages_overlapping_windows() -> None:
    def window_mean(x: torch.Tensor) -> torch.Tensor:
        """Each window's mean everywhere in the window."""
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])

    # Every row of the 12 x 12 image is 0..11, so a window's mean is the mean of its columns.
    image = torch.arange(12, dtype=torch.float64).repeat(12, 1)[None, None].expand(1, 3, 12, 12).contiguous()
    out = sliding_window(window_mean, image, crop=6, stride=3)
    # Column windows start at 0, 3, 6 with means 2.5, 5.5, 8.5; column c averages the windows covering it.
    col_means = {0: 2.5, 3: 5.5, 6: 8.5}
    expected = [np.mean([m for s, m in col_means.items() if s <= c < s + 6]) for c in range(12)]
    assert torch.allclose(out[0, 0, 5], torch.tensor(expected, dtype=torch.float64))


def test_flip_and_scales_of_a_pointwise_model_match_one_pass() -> None:
    image = torch.rand(1, 3, 32, 48, dtype=torch.float64)
    plan = InferencePlan(crop=16, stride=8, scales=(1.0,), flip=True)
    assert torch.allclose(run_plan(pointwise_fn, image, plan), pointwise_fn(image))
    # Multi-scale: the literal average of resize -> model -> resize back over scales.
    plan = InferencePlan(scales=(0.5, 1.0, 1.5))
    expected = (
        sum(
            F.interpolate(
                pointwise_fn(
                    F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
                    if s != 1
                    else image
                ),
                size=(32, 48),
                mode="bilinear",
                align_corners=False,
            )
            for s in (0.5, 1.0, 1.5)
        )
        / 3
    )
    assert torch.allclose(run_plan(pointwise_fn, image, plan), expected)


@pytest.mark.parametrize(
    ("h", "w", "size", "band"), [(7, 9, (50, 61), 8), (14, 14, (224, 300), 64), (5, 5, (3, 4), 2)]
)
def test_banded_upsample_matches_full_interpolation(h: int, w: int, size: tuple[int, int], band: int) -> None:
    logits = torch.randn(1, 4, h, w, dtype=torch.float64)
    full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
    mask, probs = upsample_argmax(logits, size, band=band, keep_probabilities=True)
    assert torch.equal(mask, full.argmax(0))
    assert probs is not None and torch.allclose(probs, full.float().softmax(0), atol=1e-6)


# ---------------------------------------------------------------- results and visualisation


def test_palette_is_distinct_and_overlay_blends() -> None:
    colours = palette(300)
    assert len({tuple(c) for c in colours}) == 300
    assert np.array_equal(palette(5), colours[:5])
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [1, 0]])
    out = np.asarray(overlay(image, mask, colours, alpha=0.25))
    assert np.array_equal(out[0, 1], np.round(0.75 * 100 + 0.25 * colours[1].astype(float)).astype(np.uint8))
    result = SegmentationResult(mask=mask, labels=["a", "b", "c"], image=image)
    assert result.areas() == {"a": 0.5, "b": 0.5}
    assert result.overlay().size == (2, 2)


def voc_reference(index: int) -> tuple[int, int, int]:
    """PASCAL VOC's colormap, written out from the devkit's bit rule (bit 3j+c of the index -> bit 7-j
    of channel c)."""
    rgb = [0, 0, 0]
    for j in range(8):
        for c in range(3):
            rgb[c] |= ((index >> (3 * j + c)) & 1) << (7 - j)
    return rgb[0], rgb[1], rgb[2]


def test_colours_are_voc_labels_from_one() -> None:
    assert [tuple(c) for c in voc_colours(5)] == [
        (0, 0, 0),
        (128, 0, 0),
        (0, 128, 0),
        (128, 128, 0),
        (0, 0, 128),
    ]
    assert [tuple(int(v) for v in c) for c in voc_colours(400)] == [voc_reference(i) for i in range(400)]
    # Semantic labels skip black: label k is VOC colour k + 1.
    assert np.array_equal(palette(300), voc_colours(301)[1:])


def test_palette_png_keeps_indices_and_shows_colours(tmp_path: Path) -> None:
    mask = RNG.integers(0, 7, size=(9, 11))
    colours = palette(7)
    palette_image(mask, colours).save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P" and np.array_equal(np.asarray(back), mask)
    assert np.array_equal(np.asarray(back.convert("RGB")), colours[mask])  # what a viewer shows
    big = np.arange(12).reshape(3, 4) * 50  # indices over 255: 16-bit, values intact
    palette_image(big, palette(600)).save(tmp_path / "big.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "big.png")).astype(int), big)


def test_legend_fits_inside_the_picture_and_shows_each_colour() -> None:
    picture = Image.fromarray(np.full((120, 160, 3), 255, np.uint8))
    colours = palette(3)
    items = [(name, colours[i]) for i, name in enumerate(["red circle 40.0%", "sky 35.5%", "other 24.5%"])]
    drawn = np.asarray(draw_legend(picture, items))
    assert drawn.shape == (120, 160, 3)
    present = {tuple(p) for p in drawn.reshape(-1, 3)}
    assert all(tuple(int(v) for v in c) in present for c in colours)  # each swatch in its own colour
    changed = np.argwhere((drawn != 255).any(-1))
    assert changed[:, 0].min() > 60 and changed[:, 1].min() > 40  # bottom-right corner only
    for width, height in ((64, 64), (32, 24), (640, 480)):
        size, texts = fit_legend(["the large circle on the left (0.93, 4.1%)"] * 6, width, height)
        assert 6 <= size <= 28 and 1 <= len(texts) <= 6
        drawn = draw_legend(
            Image.new("RGB", (width, height)), list(zip(texts, palette(len(texts)), strict=True))
        )
        assert drawn.size == (width, height)


def test_fast_overlay_and_legend_match_imgviz() -> None:
    """langseg blends and draws legends itself for speed; imgviz's own functions are the reference."""
    image = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = RNG.integers(0, 4, (48, 64))
    colours = voc_colours(4)
    for alpha, skip in ((0.5, []), (0.3, 0), (0.7, [0, 2])):
        weights = {k: (0.0 if k in ([skip] if isinstance(skip, int) else skip) else alpha) for k in range(4)}
        expected = imgviz.label2rgb(mask, image, alpha=weights, colormap=colours)
        got = np.asarray(overlay_without(image, mask, colours, alpha, skip))
        assert np.abs(got.astype(int) - expected).max() <= 1  # float32 against imgviz's float64
        assert np.array_equal(got[mask == 3], expected[mask == 3]) or alpha != 0.5
    grey = np.full((128, 160, 3), 100, np.uint8)
    # One long row (shortened with "…" at the smallest font) and one short one.
    long_row = "the large circle on the left " * 3
    for texts in (["red circle (0.93, 4.1%)", "the large square"], [long_row, "sky"]):
        size, fitted = fit_legend(texts, 160, 128)
        items = list(zip(fitted, [(255, 0, 0), (0, 255, 0)], strict=True))
        ours = np.asarray(draw_legend(Image.fromarray(grey), items)).astype(int)
        reference = imgviz.components.legend(grey, items=items, font_size=size, loc="rb").astype(int)
        box = lambda a: np.argwhere((a != 100).any(-1))  # noqa: E731
        assert np.abs(box(ours).min(0) - box(reference).min(0)).max() <= 2
        assert np.abs(box(ours).max(0) - box(reference).max(0)).max() <= 2
        # Same glyphs in the same places (glyph by glyph, a pixel either way): almost every dark text
        # pixel of ours has one of imgviz's within a pixel, and as many of them.
        dark_ours, dark_ref = ours.sum(-1) < 200, reference.sum(-1) < 200
        near = np.zeros_like(dark_ref)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= np.roll(dark_ref, (dy, dx), axis=(0, 1))
        assert dark_ref.sum() > 50 and (dark_ours & near).sum() >= 0.9 * dark_ours.sum()
        assert 0.8 <= dark_ours.sum() / dark_ref.sum() <= 1.25


def test_label_scores_are_mean_probabilities_of_each_labels_pixels() -> None:
    scores = RNG.random((3, 6, 5)).astype(np.float32)
    scores /= scores.sum(0, keepdims=True)
    mask = scores.argmax(0)
    result = SegmentationResult(
        mask=mask, labels=["a", "b", "c"], image=np.zeros((6, 5, 3), np.uint8), scores=scores
    )
    expected = {
        name: float(np.mean([scores[k, y, x] for y, x in np.argwhere(mask == k)]))
        for k, name in enumerate("abc")
        if (mask == k).any()
    }
    assert result.label_scores() == pytest.approx(expected)
    record = result.to_dict()
    assert [s["score"] for s in record["segments"]] == pytest.approx(list(expected.values()))
    assert [s["index"] for s in record["segments"]] == [k for k, n in enumerate("abc") if n in expected]
    assert (
        "score"
        not in SegmentationResult(mask=mask, labels=list("abc"), image=result.image).to_dict()["segments"][0]
    )


def test_referring_set_gives_overlaps_to_the_surer_expression() -> None:
    image = np.zeros((1, 4, 3), np.uint8)
    first = ReferringResult(np.array([[1, 1, 0, 0]], bool), 0.9, "a", image, np.array([[0.9, 0.5, 0.1, 0.2]]))
    second = ReferringResult(
        np.array([[0, 1, 1, 0]], bool), 0.8, "b", image, np.array([[0.1, 0.7, 0.8, 0.2]])
    )
    both = ReferringSet([first, second])
    assert both.mask.tolist() == [[1, 2, 2, 0]]  # pixel 1: b is surer (0.7 > 0.5); pixel 3: nothing
    first.scores = second.scores = None
    assert ReferringSet([first, second]).mask.tolist() == [[1, 1, 2, 0]]  # no scores: the earlier one
    record = both.to_dict()
    assert [e["index"] for e in record["expressions"]] == [1, 2] and record["texts"] == ["a", "b"]
    assert both.mask_image().mode == "P" and both.overlay().size == (4, 1)


def test_overlay_leaves_a_background_label_uncoloured() -> None:
    """Painting "background" would tint the whole picture: its pixels keep the image's colours."""
    from langseg.predict.results import SegmentationResult

    image = np.full((40, 60, 3), 90, np.uint8)
    mask = np.zeros((40, 60), np.int64)
    mask[:, 30:] = 1
    for name in ("background", "Other"):
        picture = np.array(SegmentationResult(mask, [name, "red circle"], image).overlay(legend=False))
        assert (picture[:, :30] == 90).all()  # untouched
        assert not (picture[:, 30:] == 90).all()  # the object is coloured
    coloured = np.array(SegmentationResult(mask, ["sky", "red circle"], image).overlay(legend=False))
    assert not (coloured[:, :30] == 90).all()  # any other label is coloured
