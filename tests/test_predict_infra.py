"""Image loading, test-time plans and visualisation, against independent references."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from langseg.errors import BadImageError
from langseg.predict import (
    InferencePlan,
    SegmentationResult,
    load_image,
    run_plan,
    sliding_window,
    upsample_argmax,
)
from langseg.predict.tta import window_starts
from langseg.viz import overlay, palette

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
    assert result.overlay().size == (2, 2) and result.legend().size[1] > 0
