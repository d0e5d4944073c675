"""The letterbox: how an image of any size becomes a square model input, and how outputs go back.

VLT takes exactly ``S x S`` inputs (its query maps are flattened into dense layers). The official loader
scales the image to fit (``scale = min(S/w, S/h)``), centres it with floor offsets and pads with grey
0.5; :func:`letterbox` does that on tensors, for the :class:`~langseg.predict.Referrer` (one image) and
for training (batches, already normalised: resizing is linear, so normalising before or after it gives
the same input). :func:`crop_to_image` maps an output back to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The official VLT loader's resampling (PIL bicubic, antialiased when shrinking) and padding grey.
IMAGE_MODE = "bicubic"
PAD_VALUE = 0.5


@dataclass(frozen=True)
class Placement:
    """Where the resized image sits in the ``size x size`` input: ``(dx, dy)`` offset, ``nw x nh`` size,
    for an original image of ``width x height``."""

    size: int
    width: int
    height: int
    nw: int
    nh: int
    dx: int
    dy: int

    @classmethod
    def fit(cls, width: int, height: int, size: int) -> Placement:
        """Official: ``scale = min(S/w, S/h)``, ``nw = int(w * scale)``, centred with floor offsets."""
        scale = min(size / width, size / height)
        nw, nh = max(1, int(width * scale)), max(1, int(height * scale))
        return cls(size, width, height, nw, nh, (size - nw) // 2, (size - nh) // 2)

    @property
    def identity(self) -> bool:
        """True when the image already is the input (no resizing, no padding)."""
        return (self.width, self.height, self.dx, self.dy) == (self.size, self.size, 0, 0)


def letterbox(
    images: torch.Tensor, size: int, pad: torch.Tensor | float, mode: str = IMAGE_MODE
) -> tuple[torch.Tensor, Placement]:
    """``B x C x H x W`` float -> ``B x C x S x S`` with the images placed as :meth:`Placement.fit` says.

    Args:
        images: float images (or soft masks), in any value range.
        size: ``S``.
        pad: the fill, a scalar or one value per channel (``C``).
        mode: ``"bicubic"`` (images, as the official loader) or ``"bilinear"`` (masks); antialiased when
            shrinking, as PIL is.
    """
    height, width = images.shape[-2:]
    place = Placement.fit(width, height, size)
    if place.identity:
        return images, place
    resized = images
    if (place.nh, place.nw) != (height, width):
        resized = F.interpolate(
            images, size=(place.nh, place.nw), mode=mode, align_corners=False, antialias=True
        )
    fill = torch.as_tensor(pad, dtype=resized.dtype, device=resized.device).reshape(1, -1, 1, 1)
    canvas = fill.expand(images.shape[0], images.shape[1], size, size).clone()
    canvas[..., place.dy : place.dy + place.nh, place.dx : place.dx + place.nw] = resized
    return canvas, place


def crop_to_image(values: torch.Tensor, place: Placement) -> torch.Tensor:
    """``B x C x h x w`` outputs over the square input -> ``B x C x H x W`` over the original image.

    Bilinear resize to the input size, crop the letterbox, bilinear resize to the image (the official
    evaluation's order).
    """
    full = F.interpolate(values, size=(place.size,) * 2, mode="bilinear", align_corners=False)
    crop = full[..., place.dy : place.dy + place.nh, place.dx : place.dx + place.nw]
    if (place.nh, place.nw) == (place.height, place.width):
        return crop
    return F.interpolate(crop, size=(place.height, place.width), mode="bilinear", align_corners=False)
