"""Winograd F(4x4, 3x3) convolutions (langseg.models.winograd) and the DPT's Conv3x3, which folds
BatchNorm and uses them at inference, against F.conv2d / F.batch_norm in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import langseg.models.winograd as winograd
from langseg.models.dpt import Conv3x3, DPTDecoder, reference_convolutions
from langseg.models.winograd import transform_kernel, transform_matrices, winograd_conv3x3


def test_matrices_are_lavin_and_grays() -> None:
    # F(4x4, 3x3) with points 0, +-1, +-2 as printed in Lavin & Gray (2016), section 4.2.
    b_t = [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ]
    g = [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ]
    a_t = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    ours = transform_matrices()
    for got, want in zip(ours, (b_t, g, a_t), strict=True):
        assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("points", [(0, 1, -1, 2, -2), (0, 1, -1, 3, -1 / 2)])
def test_one_dimensional_filtering_is_exact(points: tuple[float, ...]) -> None:
    # F(4, 3): 4 outputs of a 3-tap correlation over 6 inputs, y_i = sum_k d_{i+k} g_k.
    b_t, g_mat, a_t = transform_matrices(points)
    gen = torch.Generator().manual_seed(0)
    d, g = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    )
    literal = torch.stack([sum(d[i + k] * g[k] for k in range(3)) for i in range(4)])
    assert_close(a_t @ ((g_mat @ g) * (b_t @ d)), literal, rtol=0, atol=1e-12)


def _kernel(c_in: int, c_out: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=dtype) / (3 * c_in**0.5)
    return weight, torch.randn(c_out, generator=gen, dtype=dtype) if bias else None


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (4, 4), (5, 9), (13, 8), (24, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_float64_equals_conv2d(size: tuple[int, int], bias: bool) -> None:
    """In float64 the algorithm is exact up to rounding: any tiling or padding slip shows."""
    weight, b = _kernel(3, 5, torch.float64, bias)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = winograd_conv3x3(x, transform_kernel(weight, b))
    assert out.shape == (2, 5, *size)
    assert_close(out, F.conv2d(x, weight, b, padding=1), rtol=0, atol=1e-11)


@pytest.mark.parametrize("tiles_per_block", [1, 5, 10_000])
def test_blocks_of_tile_rows_give_one_result(monkeypatch: pytest.MonkeyPatch, tiles_per_block: int) -> None:
    weight, b = _kernel(4, 6, torch.float64, True)
    x = torch.randn(3, 4, 17, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    monkeypatch.setattr(winograd, "TILES_PER_BLOCK", tiles_per_block)
    assert_close(
        winograd_conv3x3(x, transform_kernel(weight, b)),
        F.conv2d(x, weight, b, padding=1),
        rtol=0,
        atol=1e-11,
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_error_is_small(channels_last: bool) -> None:
    """fp32: error about 4x a direct fp32 convolution's (docs in the module), far below 1e-3 of the
    unit-scale outputs."""
    weight, b = _kernel(64, 32, torch.float32, True)
    x = torch.randn(1, 64, 20, 28, generator=torch.Generator().manual_seed(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = F.conv2d(x.double(), weight.double(), b.double(), padding=1)
    ours = winograd_conv3x3(x, transform_kernel(weight, b))
    assert ours.dtype == torch.float32
    assert_close(ours.double(), reference, rtol=0, atol=2e-4)
    direct_rms = (F.conv2d(x, weight, b, padding=1).double() - reference).square().mean().sqrt()
    assert (ours.double() - reference).square().mean().sqrt() < 20 * direct_rms


def test_rejects_other_kernels() -> None:
    with pytest.raises(ValueError, match="3x3"):
        transform_kernel(torch.zeros(2, 2, 5, 5))


def _conv_and_norm(channels: int) -> tuple[Conv3x3, nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv, norm = Conv3x3(channels, channels, bias=False), nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.3, 3)
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    return conv.eval(), norm.eval()


def _reference(conv: Conv3x3, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))`` in float64, literally."""
    out = F.conv2d(x.double(), conv.weight.double(), None, padding=1)
    stats = [t.double() for t in (norm.running_mean, norm.running_var, norm.weight, norm.bias)]
    return F.batch_norm(out, stats[0], stats[1], stats[2], stats[3], training=False, eps=norm.eps)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counting(x: torch.Tensor, kernel: winograd.WinogradKernel) -> torch.Tensor:
        calls.append(1)
        return winograd_conv3x3(x, kernel)

    monkeypatch.setattr("langseg.models.dpt.winograd_conv3x3", counting)
    return calls


@pytest.mark.parametrize(
    ("channels", "side", "winograd_expected"), [(96, 24, True), (96, 23, False), (64, 24, False)]
)
def test_inference_folds_the_norm(
    monkeypatch: pytest.MonkeyPatch, channels: int, side: int, winograd_expected: bool
) -> None:
    conv, norm = _conv_and_norm(channels)
    calls = _spy(monkeypatch)
    x = torch.randn(2, channels, side, side + 3)
    with torch.inference_mode():
        out = conv(x, norm)
    assert bool(calls) == winograd_expected
    assert_close(out.double(), _reference(conv, norm, x), rtol=0, atol=2e-4)


def test_training_gradients_and_bf16_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    conv, norm = _conv_and_norm(96)
    calls = _spy(monkeypatch)
    x = torch.randn(2, 96, 24, 24)
    # eval with autograd on: gradients reach the weights through F.conv2d
    conv(x, norm).square().sum().backward()
    assert conv.weight.grad is not None and conv._folded is None
    # training: batch statistics, running statistics updated, exactly the unfused modules' result
    conv.train(), norm.train()
    before = norm.running_mean.clone()
    expected = F.batch_norm(
        F.conv2d(x, conv.weight, None, padding=1),
        before.clone(),
        norm.running_var.clone(),
        norm.weight,
        norm.bias,
        True,
    )
    with torch.no_grad():
        out = conv(x, norm)
    assert torch.equal(out, expected) and not torch.equal(norm.running_mean, before)
    # bf16 inference: F.conv2d then the norm
    conv.eval(), norm.eval()
    conv.to(torch.bfloat16), norm.to(torch.bfloat16)
    with torch.inference_mode():
        out = conv(x.bfloat16(), norm)
        assert torch.equal(out, norm(F.conv2d(x.bfloat16(), conv.weight, None, padding=1)))
    assert not calls and conv._folded is None


def test_folded_kernel_follows_new_weights_and_statistics() -> None:
    conv, norm = _conv_and_norm(96)
    x = torch.randn(1, 96, 24, 24)
    with torch.inference_mode():
        conv(x, norm)
    # new weights (load_state_dict copies in place) and a training step that moves the running stats
    conv.load_state_dict({"weight": torch.randn_like(conv.weight) / 30})
    norm.train()
    norm(torch.randn(4, 96, 6, 6) * 3 + 1)
    norm.eval()
    with torch.inference_mode():
        out = conv(x, norm)
    assert_close(out.double(), _reference(conv, norm, x), rtol=0, atol=2e-4)


def test_graph_capture_keeps_conv2d() -> None:
    """Exported graphs (ONNX goes through torch.export) hold a plain convolution and the norm, with no
    Winograd loop baked in for one size."""

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = _conv_and_norm(96)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x, self.norm)

    with torch.no_grad():
        program = torch.export.export(Unit().eval(), (torch.randn(1, 96, 24, 24),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("conv2d" in t or "convolution" in t for t in targets), targets
    assert not any("bmm" in t for t in targets), targets


def test_decoder_inference_matches_the_plain_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DPT decoder wide enough for Winograd (96 channels): inference with folded norms and Winograd
    against the same decoder with autograd on (F.conv2d, separate norms)."""
    torch.manual_seed(0)
    decoder = DPTDecoder([16, 32, 48, 64], features=96).eval()
    for module in decoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2)
    maps = [torch.randn(1, c, s, s) for c, s in zip([16, 32, 48, 64], [64, 32, 16, 8], strict=True)]
    calls = _spy(monkeypatch)
    with torch.inference_mode():
        fast = decoder(maps)
    assert len(calls) == 8  # the residual units at 32 and 64 pixels (2 convolutions each, 2 units)
    plain = decoder(maps)  # autograd on: the plain path
    assert plain.requires_grad
    assert_close(fast, plain.detach(), rtol=0, atol=1e-4 * plain.abs().max().item())


def test_reference_convolutions_switch_the_fast_path_off(monkeypatch: pytest.MonkeyPatch) -> None:
    conv, norm = _conv_and_norm(96)
    calls = _spy(monkeypatch)
    x = torch.randn(1, 96, 24, 24)
    with torch.inference_mode():
        with reference_convolutions():
            plain = conv(x, norm)
        assert not calls and conv._folded is None
        fast = conv(x, norm)
    assert calls and torch.equal(plain, norm(F.conv2d(x, conv.weight, None, padding=1)))
    assert_close(fast, plain, rtol=0, atol=2e-4)
