"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP applies it.

Each pixel's mask becomes a weighted average of the masks of its neighbours, with weights from the image:
neighbours that look like the pixel count more. For a pixel ``i`` and its neighbours ``j`` (the 8
pixels at offsets ``(±d, ±d)``, ``(±d, 0)``, ``(0, ±d)`` for every dilation ``d``; borders replicate):

- ``sigma_i,c``: standard deviation (unbiased) of channel ``c`` over the 9 pixels of the ``3 x 3``
  neighbourhood at every dilation, the centre counted once per dilation;
- ``k_ij = mean_c( -|I_i,c - I_j,c| / (1e-8 + 0.1 * sigma_i,c) )``;
- ``a_ij = softmax_j(k_ij)`` over all ``8 * len(dilations)`` neighbours;
- ``m_i <- sum_j a_ij m_j``, repeated ``iterations`` times with the same ``a``.

The affinity depends on the image only, so the refinement is linear in the mask: each label channel is
refined on its own (we process labels in chunks to bound memory) and scaling the logits commutes with it.
Dividing by the local standard deviation makes it invariant to per-channel affine changes of the image,
so a normalised image gives the same weights as raw pixels (up to the ``1e-8``).

Defaults are NACLIP's (Hajimiri et al., WACV 2025): 10 iterations at dilations ``(8, 16)``, on the image
at the resolution of the logits. The PAMR paper itself uses dilations ``(1, 2, 4, 8, 12, 24)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from langseg.errors import BadConfigError

NACLIP_ITERATIONS = 10
NACLIP_DILATIONS: tuple[int, ...] = (8, 16)
PAPER_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)

# Label channels refined together: bounds the working memory to ~4 x chunk x H x W floats.
_CHUNK_ELEMENTS = 1 << 24


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """``(dy, dx)`` of the 8 neighbours at each dilation, dilation-major."""
    return [
        (dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    ]


def _check(dilations: Sequence[int], iterations: int) -> None:
    if not dilations or any(int(d) != d or d < 1 for d in dilations):
        raise BadConfigError(f"PAMR dilations must be positive integers, got {tuple(dilations)}")
    if iterations < 0:
        raise BadConfigError(f"PAMR iterations must be >= 0, got {iterations}")


def _shifted(padded: torch.Tensor, pad: int, offset: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """View of ``x[..., i + dy, j + dx]`` (border-replicated) from ``x`` replicate-padded by ``pad``."""
    dy, dx = offset
    height, width = size
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = NACLIP_DILATIONS) -> torch.Tensor:
    """Neighbour weights ``a_ij`` of every pixel (see module docstring).

    Args:
        image: ``B x C x H x W`` float image (any normalisation).
        dilations: neighbourhood dilations in pixels.

    Returns:
        ``B x P x H x W`` weights, ``P = 8 * len(dilations)`` in :func:`neighbour_offsets` order; they
        sum to 1 over ``P``.
    """
    _check(dilations, 0)
    image = image.to(torch.promote_types(image.dtype, torch.float32))
    size = (image.shape[-2], image.shape[-1])
    pad = max(dilations)
    padded = F.pad(image, [pad] * 4, mode="replicate")
    offsets = neighbour_offsets(dilations)
    # Standard deviation over the 3 x 3 window of every dilation, the centre once per dilation (as in the
    # paper's code), in two passes over shifted views: no B x C x P x H x W tensor is ever built.
    window = [(0, 0)] * len(dilations) + offsets
    mean = sum(_shifted(padded, pad, o, size) for o in window) / len(window)
    variance = sum((_shifted(padded, pad, o, size) - mean) ** 2 for o in window) / (len(window) - 1)
    inverse = 1.0 / (1e-8 + 0.1 * variance.sqrt())
    kernel = [((image - _shifted(padded, pad, o, size)).abs() * inverse).mean(dim=1) for o in offsets]
    return torch.stack(kernel, dim=1).neg().softmax(dim=1)


def pamr(
    logits: torch.Tensor,
    image: torch.Tensor,
    iterations: int = NACLIP_ITERATIONS,
    dilations: Sequence[int] = NACLIP_DILATIONS,
) -> torch.Tensor:
    """Refine ``logits`` along the edges of ``image``.

    Args:
        logits: ``B x K x h x w`` scores (logits or probabilities); resized bilinearly
            (``align_corners=False``) to the image size when it differs.
        image: ``B x C x H x W`` image the refinement follows.
        iterations: propagation steps.
        dilations: neighbourhood dilations in pixels at the image's resolution.

    Returns:
        ``B x K x H x W`` refined scores in float32 (float64 for float64 logits).
    """
    _check(dilations, iterations)
    size = (image.shape[-2], image.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if iterations == 0:
        return logits
    affinity = pamr_affinity(image, dilations).to(logits.dtype)
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[0] * size[0] * size[1]))
    refined = []
    for start in range(0, logits.shape[1], chunk):
        mask = logits[:, start : start + chunk]
        for _ in range(iterations):
            padded = F.pad(mask, [pad] * 4, mode="replicate")
            out = torch.zeros_like(mask)
            for p, offset in enumerate(offsets):
                out.addcmul_(affinity[:, p : p + 1], _shifted(padded, pad, offset, size))
            mask = out
        refined.append(mask)
    return torch.cat(refined, dim=1)


class PAMR:
    """PAMR as a ``refine(logits, image)`` callable for :class:`langseg.predict.Segmenter`.

    Args:
        iterations: propagation steps (NACLIP: 10).
        dilations: neighbourhood dilations in working-resolution pixels (NACLIP: ``(8, 16)``).
    """

    def __init__(self, iterations: int = NACLIP_ITERATIONS, dilations: Sequence[int] = NACLIP_DILATIONS):
        _check(dilations, iterations)
        self.iterations = int(iterations)
        self.dilations = tuple(int(d) for d in dilations)

    def __call__(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``1 x K x h x w`` logits refined along the ``1 x 3 x h x w`` image."""
        return pamr(logits, image, self.iterations, self.dilations)

    def __repr__(self) -> str:
        return f"PAMR(iterations={self.iterations}, dilations={self.dilations})"


__all__ = ["NACLIP_DILATIONS", "NACLIP_ITERATIONS", "PAMR", "PAPER_DILATIONS", "pamr", "pamr_affinity"]
