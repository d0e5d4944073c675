"""Train-time augmentation, batching and normalisation of langseg's shared sample dicts.

Samples (see :mod:`langseg.data.shapes_datasets`):

- semantic: ``{"image": 3 x H x W uint8, "mask": H x W int64 (ignore_index = unlabelled), "labels",
  "meta"}``;
- referring: ``{"image": 3 x H x W uint8, "mask": H x W bool, "text": str, "meta"}``.

Augmentation keeps images ``uint8`` (cheap to batch and move); :func:`normalize` turns a batch into
floats on the training device. Every random draw comes from a ``torch.Generator`` passed in, and
:class:`AugmentedDataset` seeds one per ``(seed, epoch, index)``, so a sample's augmentation does not
depend on batch size, worker count, rank or which batches were skipped on resume.

Horizontal flips of referring samples swap the words "left" and "right" (and "leftmost"/"rightmost") in
the text, so that "the circle on the left" still names the flipped object. Other spatial words ("top",
"above", ...) are unaffected by a horizontal flip.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from langseg.errors import BadDataError

__all__ = [
    "AugmentedDataset",
    "TrainTransform",
    "collate",
    "hflip_sample",
    "normalize",
    "pad_crop_sample",
    "scale_sample",
    "swap_left_right",
]

Sample = dict[str, Any]

_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """``text`` with "left" and "right" exchanged as whole words, keeping their capitalisation.

    ``"the circle on the left"`` -> ``"the circle on the right"``; ``"Leftmost"`` -> ``"Rightmost"``;
    words that merely contain them (``"leftover"``, ``"bright"``) are left alone.
    """

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (match.group(2) or "")

    return _LEFT_RIGHT.sub(swap, text)


def _pad_value(mask: torch.Tensor, ignore_index: int) -> int | bool:
    # Referring masks are boolean (padding is "not the object"); semantic padding is unlabelled.
    return False if mask.dtype == torch.bool else ignore_index


def scale_sample(sample: Sample, factor: float) -> Sample:
    """Resize image (bilinear, antialiased when shrinking) and mask (nearest) by ``factor``.

    Output side: ``max(1, round(side * factor))``. The image stays ``3 x H' x W'`` uint8.
    """
    image, mask = sample["image"], sample["mask"]
    h, w = image.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return sample
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=factor < 1
    )[0]
    out = dict(sample)
    out["image"] = resized.round().clamp(0, 255).to(torch.uint8)
    # Nearest on float is exact for class ids < 2**24 and for booleans.
    out["mask"] = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)
    return out


def pad_crop_sample(
    sample: Sample, size: tuple[int, int], top: int, left: int, ignore_index: int = 255
) -> Sample:
    """Pad bottom/right up to ``size`` if needed, then crop ``size = (h, w)`` at ``(top, left)``.

    Padding is 0 for the image, ``ignore_index`` for semantic masks and ``False`` for referring masks.
    ``top``/``left`` index the padded sample and must leave the crop inside it.
    """
    image, mask = sample["image"], sample["mask"]
    h, w = image.shape[-2:]
    ch, cw = size
    pad_h, pad_w = max(0, ch - h), max(0, cw - w)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        padded = torch.full((h + pad_h, w + pad_w), _pad_value(mask, ignore_index), dtype=mask.dtype)
        padded[:h, :w] = mask
        mask = padded
    if not (0 <= top <= image.shape[-2] - ch and 0 <= left <= image.shape[-1] - cw):
        raise ValueError(f"crop {size} at ({top}, {left}) leaves the {tuple(image.shape[-2:])} image")
    out = dict(sample)
    out["image"] = image[:, top : top + ch, left : left + cw].contiguous()
    out["mask"] = mask[top : top + ch, left : left + cw].contiguous()
    return out


def hflip_sample(sample: Sample) -> Sample:
    """Mirror image and mask left-right; referring text gets "left" and "right" swapped."""
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    out["mask"] = sample["mask"].flip(-1)
    if isinstance(sample.get("text"), str):
        out["text"] = swap_left_right(sample["text"])
    return out


class TrainTransform:
    """Random scale, pad-and-crop and horizontal flip (in that order).

    Args:
        crop_size: side of the square crop; ``None`` crops back to the input's own ``H x W``.
        scale_range: the scale factor is drawn uniformly from this range (``(1, 1)`` disables it).
        hflip: flip with probability 1/2.
        ignore_index: padding label of semantic masks.
    """

    def __init__(
        self,
        crop_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        ignore_index: int = 255,
    ) -> None:
        self.crop_size, self.scale_range = crop_size, tuple(scale_range)
        self.hflip, self.ignore_index = hflip, ignore_index

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        h, w = sample["image"].shape[-2:]
        size = (self.crop_size, self.crop_size) if self.crop_size else (h, w)
        # Always draw the same numbers in the same order, so the stream is easy to reason about.
        u_scale, u_top, u_left, u_flip = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        lo, hi = self.scale_range
        if (lo, hi) != (1.0, 1.0):
            sample = scale_sample(sample, lo + (hi - lo) * u_scale)
        sh, sw = sample["image"].shape[-2:]
        room_h, room_w = max(sh, size[0]) - size[0], max(sw, size[1]) - size[1]
        top, left = int(u_top * (room_h + 1)), int(u_left * (room_w + 1))
        sample = pad_crop_sample(sample, size, min(top, room_h), min(left, room_w), self.ignore_index)
        if self.hflip and u_flip < 0.5:
            sample = hflip_sample(sample)
        return sample


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on ``(seed, epoch, index)``."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class AugmentedDataset(Dataset):
    """``dataset`` with ``transform(sample, generator)`` applied, the generator seeded per sample.

    Call :meth:`set_epoch` before each epoch (before creating the DataLoader iterator, so that worker
    processes receive the new value) to get fresh augmentations each epoch.
    """

    def __init__(self, dataset: Dataset, transform: TrainTransform, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        return self.transform(self.dataset[index], sample_generator(self.seed, self.epoch, index))


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Batch samples: tensors are stacked (``image`` -> ``B x 3 x H x W``, ``mask`` -> ``B x H x W``);
    everything else (``labels``, ``text``, ``meta``) becomes a list of length ``B``.

    Raises:
        BadDataError: images or masks of one batch differ in size.
    """
    if not samples:
        raise BadDataError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise BadDataError(
                    f"cannot batch {key!r} tensors of different shapes {sorted(shapes)}",
                    hint="Set data.crop_size so that every training sample has the same size.",
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``B x 3 x H x W`` uint8 (0-255) -> float ``(x / 255 - mean) / std`` on the same device."""
    mean_t = torch.tensor(mean, dtype=dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=images.device).view(-1, 1, 1)
    return (images.to(dtype) / 255.0 - mean_t) / std_t
