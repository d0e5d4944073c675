"""Segmentation losses the tasks use: per-pixel cross-entropy and binary-mask BCE / Dice.

Every loss accepts logits at a lower resolution than the target (as decoders often produce) and
upsamples them bilinearly first, and returns a scalar that stays differentiable (and equals 0) when a
batch has no labelled pixel, rather than the NaN that averaging over zero pixels would give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from langseg.errors import BadDataError

__all__ = ["binary_mask_loss", "cross_entropy", "dice_loss", "resize_logits"]


def resize_logits(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``B x C x h x w`` -> ``B x C x H x W`` (bilinear) when the sizes differ; else unchanged."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels.

    Args:
        logits: ``B x K x h x w`` class scores (any float dtype; computed in float32).
        target: ``B x H x W`` int64 class indices, ``ignore_index`` for unlabelled pixels.
        label_smoothing, weight: as in :func:`torch.nn.functional.cross_entropy`.

    Returns:
        Scalar; ``0 * logits.sum()`` when no pixel is labelled (keeps the graph for DDP).

    Raises:
        BadDataError: batch sizes differ or a label is out of range.
    """
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise BadDataError(
            f"cross_entropy wants B x K x h x w logits and B x H x W targets, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    k = logits.shape[1]
    bad = target[valid & ((target < 0) | (target >= k))]
    if bad.numel():
        raise BadDataError(
            f"target holds class {int(bad[0])}, outside [0, {k}) and not ignore_index={ignore_index}",
            hint="Check that the model's number of classes matches the dataset's labels.",
        )
    logits = resize_logits(logits, target.shape[-2:]).float()
    return F.cross_entropy(
        logits, target.long(), weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing
    )


def _as_mask_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``B x h x w`` or ``B x 1 x h x w`` logits -> ``B x H x W`` float32 at the target's size."""
    if logits.dim() == 3:
        logits = logits[:, None]
    if logits.dim() != 4 or logits.shape[1] != 1 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise BadDataError(
            f"mask losses want B x [1 x] h x w logits and B x H x W targets, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return resize_logits(logits, target.shape[-2:])[:, 0].float()


def binary_mask_loss(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy with logits over all pixels.

    Args:
        logits: ``B x h x w`` or ``B x 1 x h x w`` mask logits.
        target: ``B x H x W`` bool (or 0/1) ground-truth masks.
        pos_weight: weight of positive pixels (e.g. ``#neg / #pos`` for small objects); ``None`` = 1.
    """
    x = _as_mask_logits(logits, target)
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=x.device, dtype=x.dtype)
    return F.binary_cross_entropy_with_logits(x, target.to(x.dtype), pos_weight=pw)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ``1 - (2 |P G| + eps) / (|P| + |G| + eps)`` with soft ``P = sigmoid``.

    Args:
        logits: ``B x h x w`` or ``B x 1 x h x w`` mask logits.
        target: ``B x H x W`` bool (or 0/1) masks.
        eps: smoothing; keeps an empty prediction of an empty target at loss 0.
    """
    p = torch.sigmoid(_as_mask_logits(logits, target)).flatten(1)
    g = target.to(p.dtype).flatten(1)
    dice = (2 * (p * g).sum(1) + eps) / (p.sum(1) + g.sum(1) + eps)
    return (1 - dice).mean()
