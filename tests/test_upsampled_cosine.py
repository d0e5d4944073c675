"""The cosine of x2-upsampled features computed at the features' resolution
(langseg.models.upsampled_cosine) against the literal computation: upsample the D channels, normalise,
dot with each label, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from langseg.models.upsampled_cosine import upsampled_cosine, upsampled_squared_norm


def _literal(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(features.double(), scale_factor=2, mode="bilinear", align_corners=True)
    return torch.einsum("bdhw,kd->bkhw", F.normalize(up, dim=1), text.double())


def test_hand_worked_two_pixels() -> None:
    # One row of two pixels, f0 = (1, 0) and f1 = (0, 1). Along x the output's 4 samples sit at
    # source positions 0, 1/3, 2/3, 1: g = (1 - b) f0 + b f1, |g|^2 = (1 - b)^2 + b^2.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    b = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    norms = upsampled_squared_norm(features)
    assert norms.shape == (1, 1, 2, 4)
    assert_close(norms[0, 0], ((1 - b) ** 2 + b**2).expand(2, 4))
    text = torch.tensor([[1.0, 0.0]])
    assert_close(upsampled_cosine(features, text)[0, 0, 0], (1 - b) / ((1 - b) ** 2 + b**2).sqrt())


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (4, 1), (3, 7), (12, 12), (9, 16)])
def test_matches_upsample_then_normalise(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(size))
    features = torch.randn(2, 24, *size, generator=gen)
    text = F.normalize(torch.randn(5, 24, generator=gen), dim=1)
    ours = upsampled_cosine(features, text)
    assert ours.shape == (2, 5, 2 * size[0], 2 * size[1]) and ours.dtype == torch.float32
    assert_close(ours.double(), _literal(features, text), rtol=0, atol=2e-6)
    # channels-last features (the predictor's layout) give the same numbers
    assert_close(upsampled_cosine(features.contiguous(memory_format=torch.channels_last), text), ours)


def test_nearly_equal_neighbours_keep_their_precision() -> None:
    # Smooth maps (the common case) make the correction terms tiny: the differences keep them exact
    # where dot products of neighbours would cancel.
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 64, 1, 1, generator=gen)
    features = 100 * base + 1e-3 * torch.randn(1, 64, 10, 10, generator=gen)
    text = F.normalize(torch.randn(3, 64, generator=gen), dim=1)
    up = F.interpolate(features.double(), scale_factor=2, mode="bilinear", align_corners=True)
    literal = up.square().sum(1, keepdim=True)
    assert_close(upsampled_squared_norm(features.double()), literal, rtol=1e-12, atol=0)
    assert_close(upsampled_cosine(features, text).double(), _literal(features, text), rtol=0, atol=2e-6)


def test_zero_features_score_zero_like_normalize() -> None:
    features = torch.zeros(1, 8, 3, 3)
    features[..., 1, 1] = 1.0  # one non-zero pixel: its neighbours' upsampled values are partly zero
    text = F.normalize(torch.ones(2, 8), dim=1)
    ours = upsampled_cosine(features, text)
    assert torch.isfinite(ours).all()
    assert_close(ours.double(), _literal(features, text), rtol=0, atol=1e-6)


def test_gradients_match_the_literal_computation() -> None:
    # Training backpropagates through it; equal neighbours (uniform regions) must not give NaN.
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(1, 6, 4, 5, generator=gen, dtype=torch.float64)
    features[..., :2, :2] = features[..., :1, :1]  # a uniform 2 x 2 block: zero differences
    text = F.normalize(torch.randn(3, 6, generator=gen, dtype=torch.float64), dim=1)
    weights = torch.randn(1, 3, 8, 10, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (upsampled_cosine, _literal):
        x = features.clone().requires_grad_(True)
        (fn(x, text) * weights).sum().backward()
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all()
    assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)
