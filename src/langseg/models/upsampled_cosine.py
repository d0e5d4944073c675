"""Cosine similarity of x2-upsampled pixel features with label embeddings, computed without upsampling
the features.

LSeg upsamples its ``D``-channel pixel embeddings x2 (bilinear, ``align_corners=True``), normalises
them and takes dot products with the labels. Materialising the upsampled ``B x D x 2h x 2w`` map is the
costly part (75 MB of fresh memory per ViT-B/32 image at 384 px, D = 512, written and read several
times), yet neither the dot product nor the norm needs it:

- bilinear upsampling is linear, so ``up(f) . t = up(f . t)``: ``K`` score maps are upsampled instead
  of ``D`` channels;
- along one axis ``g = (1 - a) f0 + a f1`` has ``|g|^2 = (1 - a)|f0|^2 + a|f1|^2 - a(1 - a)|f1 - f0|^2``.
  Applied along y (weight ``a``), then along x (weight ``b``)::

      |up(f)|^2 = up(|f|^2) - b(1-b) lerp_y(|dx f|^2) - a(1-a) lerp_x(|dy f|^2) + a(1-a) b(1-b) |dx dy f|^2

  where ``dx f``, ``dy f`` are the differences of horizontally / vertically neighbouring pixels,
  ``dx dy f`` the mixed difference of a 2 x 2 block, each sampled at the block the output pixel falls
  in. Four ``B x 1 x h x w`` maps, each one reduction over ``D``.

The result equals normalising the upsampled map (to float rounding; tested against the literal
computation in float64). The differences, rather than dot products of neighbours, keep the correction
terms accurate when neighbouring embeddings are nearly equal, which is the common case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# F.normalize's default: the norm is clamped to at least this before dividing.
NORM_EPS = 1e-12


def _source_positions(n_in: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a x2 ``align_corners=True`` upsampling of ``n_in`` samples: per output sample the left and
    right source indices (``2 n_in`` each, int64) and the right one's weight, as PyTorch's bilinear
    kernel computes them (``i * (n_in - 1) / (2 n_in - 1)``, in ``like``'s dtype, at least float32)."""
    n_out = 2 * n_in
    dtype = torch.promote_types(like.dtype, torch.float32)
    src = torch.arange(n_out, device=like.device, dtype=dtype) * ((n_in - 1) / (n_out - 1))
    left = src.floor().long()
    right = (left + 1).clamp(max=n_in - 1)
    return left, right, src - left


def _squared_norms(vectors: torch.Tensor) -> torch.Tensor:
    """``B x D x h x w`` -> ``B x 1 x h x w`` squared norms over ``D``."""
    return torch.linalg.vector_norm(vectors, dim=1, keepdim=True).square()


def upsampled_squared_norm(features: torch.Tensor) -> torch.Tensor:
    """``|up2(features)|^2`` per pixel: ``B x D x h x w`` -> ``B x 1 x 2h x 2w``, non-negative."""
    h, w = features.shape[-2:]
    y0, y1, a = _source_positions(h, features)
    x0, x1, b = _source_positions(w, features)
    a = a.to(features.dtype).view(-1, 1)
    b = b.to(features.dtype).view(1, -1)
    # Differences of neighbours on the map padded by repeating its last row and column: every map
    # stays h x w (the last column's / row's differences are 0 and only ever read with weight 0), and
    # torch.export sees no (h - 1)-sized tensors, whose stride checks would pin the graph's size.
    padded = F.pad(features, (0, 1, 0, 1), mode="replicate")  # B x D x (h+1) x (w+1)
    dy = padded[..., 1:, :] - padded[..., :-1, :]  # B x D x h x (w+1)
    norms = _squared_norms(features)
    dx_norms = _squared_norms(padded[..., :-1, 1:] - padded[..., :-1, :-1])
    dy_norms = _squared_norms(dy[..., :-1])
    dxdy_norms = _squared_norms(dy[..., 1:] - dy[..., :-1])
    out = F.interpolate(norms, scale_factor=2, mode="bilinear", align_corners=True)
    # lerp_y of the horizontal differences, at the output pixel's left column.
    dx_y = (1 - a) * dx_norms.index_select(2, y0) + a * dx_norms.index_select(2, y1)
    out = out - b * (1 - b) * dx_y.index_select(3, x0)
    # lerp_x of the vertical differences, at the output pixel's upper row.
    dy_top = dy_norms.index_select(2, y0)
    dy_x = (1 - b) * dy_top.index_select(3, x0) + b * dy_top.index_select(3, x1)
    out = out - a * (1 - a) * dy_x
    out = out + a * (1 - a) * b * (1 - b) * dxdy_norms.index_select(2, y0).index_select(3, x0)
    return out.clamp(min=0)  # rounding may leave -1e-7 where the true value is 0


def upsampled_cosine(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``cos(up2(features), text)`` for every output pixel and label.

    Args:
        features: ``B x D x h x w`` pixel features (any norm, any memory layout).
        text: ``K x D`` unit-norm label embeddings, same dtype.

    Returns:
        ``B x K x 2h x 2w``: what ``F.normalize(up2(features), dim=1)`` dotted with each label gives,
        with ``up2`` bilinear x2 with ``align_corners=True``.
    """
    scores = torch.einsum("bdhw,kd->bkhw", features, text)
    scores = F.interpolate(scores, scale_factor=2, mode="bilinear", align_corners=True)
    return scores / upsampled_squared_norm(features).sqrt().clamp(min=NORM_EPS)
