"""Test-time inference plans: sliding window, multi-scale and flip, over any dense logits function.

Every function here takes ``logits_fn(images: B x 3 x h x w) -> B x K x h' x w'`` (any output
resolution; it is resized bilinearly to the window) and a normalised ``1 x 3 x H x W`` float image.
Padding uses 0, the mean colour of a normalised image. Logits are averaged over windows, scales and
flips (as the official LSeg multi-scale evaluation sums them).

For very large images the plan runs at a working resolution and :func:`upsample_argmax` produces the
full-size mask in horizontal bands, so memory stays ``K x band x W`` instead of ``K x H x W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# The LSeg paper's multi-scale evaluation (with horizontal flip and sliding windows, stride 2/3 crop).
PAPER_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class InferencePlan:
    """How to run a dense model over one image.

    Attributes:
        crop: window side; ``None`` runs the whole (scaled) image in one pass.
        stride: window step; default ``2/3 * crop`` as in LSeg's evaluation.
        scales: image scales; with ``base_size`` a scale ``s`` resizes the long side to ``s * base_size``,
            otherwise it multiplies the input size.
        base_size: reference long side for ``scales`` (LSeg evaluates ADE20K with 520).
        flip: also run the horizontally flipped image and average.
        batch_size: windows per call of the logits function.
    """

    crop: int | None = None
    stride: int | None = None
    scales: tuple[float, ...] = (1.0,)
    base_size: int | None = None
    flip: bool = False
    batch_size: int = 4

    def window_stride(self) -> int:
        assert self.crop is not None
        return self.stride or max(1, math.ceil(self.crop * 2 / 3))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``[0, length)``; the last window is flush with the end."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def sliding_window(
    logits_fn: LogitsFn, image: torch.Tensor, crop: int, stride: int, batch_size: int = 4
) -> torch.Tensor:
    """``1 x K x H x W`` logits averaged over ``crop`` windows every ``stride`` pixels.

    Images smaller than the window are padded (bottom/right, with 0) to the window and cropped back.
    """
    _, _, height, width = image.shape
    padded = F.pad(image, (0, max(0, crop - width), 0, max(0, crop - height)))
    ph, pw = padded.shape[-2:]
    boxes = [
        (top, left) for top in window_starts(ph, crop, stride) for left in window_starts(pw, crop, stride)
    ]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, dtype=image.dtype, device=image.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        windows = torch.cat([padded[..., y : y + crop, x : x + crop] for y, x in chunk])
        logits = _resize(logits_fn(windows), (crop, crop)).to(image.dtype)
        if total is None:
            total = torch.zeros(1, logits.shape[1], ph, pw, dtype=image.dtype, device=image.device)
        for (top, left), window_logits in zip(chunk, logits, strict=True):
            total[0, :, top : top + crop, left : left + crop] += window_logits
            count[..., top : top + crop, left : left + crop] += 1
    assert total is not None
    return (total / count)[..., :height, :width]


def plan_sizes(height: int, width: int, plan: InferencePlan) -> list[tuple[int, int]]:
    """The image size at each of the plan's scales, for an ``H x W`` input."""
    sizes = []
    for scale in plan.scales:
        factor = scale if plan.base_size is None else scale * plan.base_size / max(height, width)
        sizes.append((max(1, round(height * factor)), max(1, round(width * factor))))
    return sizes


def scaled_inputs(image: torch.Tensor, plan: InferencePlan) -> dict[tuple[int, int], torch.Tensor]:
    """``image`` resized to each of the plan's sizes, as :func:`run_plan` would resize it: computed
    ahead (e.g. in a decoding thread) and handed to :func:`run_plan` as ``scaled``."""
    return {size: _resize(image, size) for size in plan_sizes(*image.shape[-2:], plan)}


def run_plan(
    logits_fn: LogitsFn,
    image: torch.Tensor,
    plan: InferencePlan,
    scaled: dict[tuple[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``1 x K x H x W`` logits of ``image`` (``1 x 3 x H x W``) under ``plan``, at the input size;
    ``scaled`` may hold the resized inputs already (:func:`scaled_inputs`)."""
    _, _, height, width = image.shape
    total: torch.Tensor | None = None
    runs = 0
    for size in plan_sizes(height, width, plan):
        x_scaled = scaled[size] if scaled is not None and size in scaled else _resize(image, size)
        for flip in (False, True) if plan.flip else (False,):
            x = x_scaled.flip(-1) if flip else x_scaled
            if plan.crop is None:
                logits = _resize(logits_fn(x), size)
            else:
                logits = sliding_window(logits_fn, x, plan.crop, plan.window_stride(), plan.batch_size)
            logits = _resize(logits.flip(-1) if flip else logits, (height, width))
            total = logits if total is None else total + logits
            runs += 1
    assert total is not None
    return total / runs


def upsample_argmax(
    logits: torch.Tensor, size: tuple[int, int], band: int = 512, keep_probabilities: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full-size ``H x W`` int64 label map (and optionally ``K x H x W`` softmax) from ``1 x K x h x w``.

    Bilinear upsampling (align_corners=False) is computed band by band over output rows, each band from
    the source rows it needs, so peak memory is ``K x band x W`` rather than ``K x H x W``.
    """
    _, num_labels, h, w = logits.shape
    height, width = size
    mask = torch.empty(height, width, dtype=torch.int64, device=logits.device)
    probabilities = (
        torch.empty(num_labels, height, width, dtype=torch.float32, device=logits.device)
        if keep_probabilities
        else None
    )
    scale_y = h / height
    for top in range(0, height, band):
        bottom = min(height, top + band)
        # Source rows used by output rows [top, bottom) under align_corners=False, plus one each side.
        src_top = max(0, math.floor((top + 0.5) * scale_y - 0.5) - 1)
        src_bottom = min(h, math.ceil((bottom - 0.5) * scale_y - 0.5) + 2)
        block = logits[:, :, src_top:src_bottom]
        # Interpolate the band exactly as the full-image interpolation would: output rows map to source
        # coordinates with the global scale, then two linear interpolations (rows, then columns).
        ys = (torch.arange(top, bottom, device=logits.device, dtype=torch.float64) + 0.5) * scale_y - 0.5
        ys = ys.clamp(0, h - 1) - src_top
        xs = (torch.arange(width, device=logits.device, dtype=torch.float64) + 0.5) * (w / width) - 0.5
        xs = xs.clamp(0, w - 1)
        rows = _lerp_rows(block[0], ys)
        values = _lerp_cols(rows, xs)
        mask[top:bottom] = values.max(0).indices  # 10x faster than argmax on this torch build
        if probabilities is not None:
            probabilities[:, top:bottom] = values.float().softmax(0)
    return mask, probabilities


def _lerp_rows(block: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``K x len(ys) x w``: linear interpolation of ``block`` (``K x r x w``) at fractional rows."""
    y0 = ys.floor().long().clamp(max=block.shape[1] - 1)
    y1 = (y0 + 1).clamp(max=block.shape[1] - 1)
    t = (ys - y0).to(block.dtype)[None, :, None]
    return block[:, y0] * (1 - t) + block[:, y1] * t


def _lerp_cols(rows: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    x0 = xs.floor().long().clamp(max=rows.shape[2] - 1)
    x1 = (x0 + 1).clamp(max=rows.shape[2] - 1)
    t = (xs - x0).to(rows.dtype)[None, None, :]
    return rows[:, :, x0] * (1 - t) + rows[:, :, x1] * t
