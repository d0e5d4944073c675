"""Dense Prediction Transformer (DPT) pieces, as used by LSeg.

A ViT gives four token sequences; *reassemble* blocks turn each into an image-like map at strides
4, 8, 16 and 32 of the input; a 3x3 projection brings every map to a common width; four *fusion*
blocks (RefineNet style) merge them from coarse to fine and upsample, ending at stride 2.

Shapes below use ``h x w`` for the ViT token grid and ``H x W`` for the input image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadConfigError
from langseg.models.text import capturing_graph
from langseg.models.winograd import WinogradKernel, transform_kernel, winograd_conv3x3

READOUTS = ("ignore", "add", "project")


class ReadoutIgnore(nn.Module):
    """Drop the class token: ``B x (1 + N) x C -> B x N x C``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:]


class ReadoutAdd(nn.Module):
    """Add the class token to every patch token: ``B x (1 + N) x C -> B x N x C``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:] + tokens[:, :1]


class ReadoutProject(nn.Module):
    """Concatenate the class token to every patch token and project back: ``B x (1+N) x C -> B x N x C``.

    ``GELU(Linear([patch, cls]))``; the patch token comes first in the concatenation (DPT order).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        self.act = nn.GELU()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.act(self.proj(torch.cat([patches, readout], dim=-1)))


def make_readout(kind: str, dim: int) -> nn.Module:
    """The readout module named ``kind`` (one of :data:`READOUTS`) for tokens of width ``dim``."""
    if kind == "ignore":
        return ReadoutIgnore()
    if kind == "add":
        return ReadoutAdd()
    if kind == "project":
        return ReadoutProject(dim)
    raise BadConfigError(f"unknown readout {kind!r}", hint=f"Use one of {', '.join(READOUTS)}.")


def make_resample(channels: int, scale: float) -> nn.Module:
    """Resize a ``B x C x h x w`` map by ``scale`` (a power of two): learned, as DPT does.

    ``scale > 1``: transposed convolution with kernel = stride = scale; ``1``: identity;
    ``1/f`` (f = 2, 4, ...): convolution with kernel ``f + 1``, stride ``f`` and padding ``f / 2`` (output
    ``ceil(h/f) x ceil(w/f)``); for f = 2 that is DPT's 3x3 stride-2 convolution. Factors below 1/2
    arise for patch-8 towers (small models on small images), never for the published variants.
    """
    if scale > 1:
        factor = int(scale)
        if factor != scale or factor & (factor - 1):
            raise BadConfigError(f"reassemble scale must be a power of two, got {scale}")
        return nn.ConvTranspose2d(channels, channels, kernel_size=factor, stride=factor)
    if scale == 1:
        return nn.Identity()
    factor = round(1 / scale)
    if scale <= 0 or abs(factor * scale - 1) > 1e-9 or factor & (factor - 1):
        raise BadConfigError(f"reassemble scale must be a power of two, got {scale}")
    return nn.Conv2d(channels, channels, kernel_size=factor + 1, stride=factor, padding=factor // 2)


class ReassembleBlock(nn.Module):
    """One DPT reassemble stage: tokens -> readout -> image grid -> 1x1 conv -> resample.

    Args:
        embed_dim: ViT width ``C``.
        out_channels: width of the produced map.
        scale: resampling factor of the token grid (e.g. 4 for stride 4 from 16x16 patches).
        readout: ``"ignore"``, ``"add"`` or ``"project"``.
    """

    def __init__(self, embed_dim: int, out_channels: int, scale: float, readout: str = "project") -> None:
        super().__init__()
        self.readout = make_readout(readout, embed_dim)
        self.conv = nn.Conv2d(embed_dim, out_channels, kernel_size=1)
        self.resample = make_resample(out_channels, scale)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``B x (1 + h*w) x C`` tokens -> ``B x out_channels x (h*scale) x (w*scale)`` map."""
        x = self.readout(tokens).transpose(1, 2)
        x = x.reshape(x.shape[0], x.shape[1], grid[0], grid[1])
        return self.resample(self.conv(x))


class DPTReassemble(nn.Module):
    """Four reassemble blocks bringing ViT tokens to strides 4, 8, 16 and 32 of the image.

    Args:
        embed_dim: ViT width.
        widths: channel count of each of the four maps (LSeg: ``256, 512, 1024, 1024`` for ViT-L/16,
            ``96, 192, 384, 768`` for ViT-B/32).
        patch_size: the ViT patch side; the token grid has stride ``patch_size``.
        readout: how the class token enters the maps.
    """

    strides: tuple[int, int, int, int] = (4, 8, 16, 32)

    def __init__(
        self, embed_dim: int, widths: Sequence[int], patch_size: int, readout: str = "project"
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise BadConfigError(f"DPT needs 4 reassemble widths, got {list(widths)}")
        self.blocks = nn.ModuleList(
            ReassembleBlock(embed_dim, width, patch_size / stride, readout)
            for width, stride in zip(widths, self.strides, strict=True)
        )

    def forward(self, tokens: Sequence[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        """Four ``B x (1 + h*w) x C`` sequences -> maps ``B x widths[i] x H/s_i x W/s_i``."""
        return [block(t, grid) for block, t in zip(self.blocks, tokens, strict=True)]


# Smaller maps or fewer channels run F.conv2d (benchmarks/winograd_conv.py): below 96 channels or at
# 8 px Winograd is slower; at 12 px it gains ~1 ms a convolution for a 9-28 MB transformed kernel each.
WINOGRAD_MIN_SIDE = 24
WINOGRAD_MIN_CHANNELS = 96
_REFERENCE = ContextVar("langseg_reference_convolutions", default=False)


@contextmanager
def reference_convolutions() -> Iterator[None]:
    """Within this block (this thread or task), the DPT's 3x3 convolutions run as in training:
    ``F.conv2d``, then the BatchNorm, no folding, no Winograd. For the network's nominal FLOP count
    (``FlopCounterMode`` counts the operators that run) and for comparisons at float rounding level."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution (stride 1, padding 1) whose inference can fold the BatchNorm that follows it
    and run by Winograd's algorithm (:mod:`langseg.models.winograd`).

    ``forward(x, norm)`` is ``norm(conv(x))`` for ``x``: ``B x C_in x H x W``. The fast path is taken
    in eval mode without autograd, for float32 on CPU, outside graph capture (export, compile) and
    outside :func:`reference_convolutions`: the norm is folded into the weights, and maps of at least
    ``WINOGRAD_MIN_SIDE`` pixels with at least ``WINOGRAD_MIN_CHANNELS`` channels run by Winograd.
    Folded weights and the Winograd kernel are cached and rebuilt when a weight or a statistic changes.
    Everything else (training, gradients, bf16, CUDA, ONNX export) runs ``F.conv2d`` then the norm, as
    before. Parameters and state-dict keys are those of :class:`torch.nn.Conv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        # (key of the source tensors, folded weight, folded bias, Winograd kernel once needed)
        self._folded: (
            tuple[tuple[object, ...], torch.Tensor, torch.Tensor | None, WinogradKernel | None] | None
        )
        self._folded = None

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if not self._fast_path(x, norm):
            out = super().forward(x)
            return out if norm is None else norm(out)
        key, weight, bias, kernel = self._fold(norm)
        side, channels = min(x.shape[-2:]), min(self.in_channels, self.out_channels)
        if side < WINOGRAD_MIN_SIDE or channels < WINOGRAD_MIN_CHANNELS:
            return F.conv2d(x, weight, bias, padding=1)
        if kernel is None:  # built on first use only: 36 / 9 = 4x the weight's memory
            kernel = transform_kernel(weight, bias)
            self._folded = (key, weight, bias, kernel)
        return winograd_conv3x3(x, kernel)

    def _fast_path(self, x: torch.Tensor, norm: nn.Module | None) -> bool:
        foldable = norm is None or (isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None)
        return (
            foldable
            and not _REFERENCE.get()
            and not self.training
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not capturing_graph()
            and not torch.onnx.is_in_onnx_export()
        )

    def _fold(
        self, norm: nn.Module | None
    ) -> tuple[tuple[object, ...], torch.Tensor, torch.Tensor | None, WinogradKernel | None]:
        """``norm(conv(x))`` as one convolution: the cache entry, rebuilt when a source tensor changed."""
        tensors = [self.weight, self.bias]
        if isinstance(norm, nn.BatchNorm2d):
            tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var]
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)
        if self._folded is not None and self._folded[0] == key:
            return self._folded
        weight, bias = self.weight.detach(), None if self.bias is None else self.bias.detach()
        if isinstance(norm, nn.BatchNorm2d):
            assert norm.running_mean is not None and norm.running_var is not None
            scale = torch.rsqrt(norm.running_var.double() + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight.detach().double()
            shift = -norm.running_mean.double() * scale
            if bias is not None:
                shift = shift + bias.double() * scale
            if norm.bias is not None:
                shift = shift + norm.bias.detach().double()
            # Element-wise products keep the weight's layout (channels-last or not).
            weight = (weight.double() * scale.view(-1, 1, 1, 1)).to(self.weight.dtype)
            bias = shift.to(self.weight.dtype)
        self._folded = (key, weight, bias, None)
        return self._folded


class ResidualConvUnit(nn.Module):
    """``x + bn2(conv2(relu(bn1(conv1(relu(x))))))`` on ``B x F x h x w``, shape-preserving.

    Convolutions are 3x3; with BatchNorm they carry no bias (the norm has one), as in LSeg.
    """

    def __init__(self, features: int, use_bn: bool = True) -> None:
        super().__init__()
        self.conv1 = Conv3x3(features, features, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(features) if use_bn else None
        self.conv2 = Conv3x3(features, features, bias=not use_bn)
        self.bn2 = nn.BatchNorm2d(features) if use_bn else None
        self.act = nn.ReLU()  # not in-place: x is reused for the residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act(x), self.bn1)  # the norm is folded in at inference
        out = self.conv2(self.act(out), self.bn2)
        return out + x


class FusionBlock(nn.Module):
    """RefineNet-style fusion: ``out_conv(up2(unit(x + skip_unit(skip))))``, computed as
    ``up2(out_conv(...))``.

    Args:
        features: width ``F`` of every map.
        use_bn: BatchNorm inside the residual units (LSeg: True).
        has_skip: False for the deepest block, which has no finer map to merge (the official network
            builds a skip unit there too but never calls it; we leave it out so no parameter is unused).

    ``x``: ``B x F x h x w``; ``skip``: ``B x F x h' x w'``. Output: ``B x F x 2h' x 2w'`` (or ``2h x 2w``
    without skip). Upsampling is bilinear with ``align_corners=True`` as in LSeg.
    """

    def __init__(self, features: int, use_bn: bool = True, has_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features, use_bn) if has_skip else None
        self.unit = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, upsample: bool = True
    ) -> torch.Tensor:
        """The fused map; with ``upsample=False`` at the input's resolution (the caller upsamples)."""
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("this fusion block was built without a skip input")
            if x.shape[-2:] != skip.shape[-2:]:
                # Odd token grids (e.g. 25x25) make the stride-32 map round up; the official code would
                # fail here, we align to the finer map instead. Equal sizes are untouched.
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = x + self.skip_unit(skip)
        # The official block upsamples, then applies the 1x1 out_conv. Both are linear per pixel and
        # bilinear weights sum to one, so the 1x1 convolution (bias included) commutes with the
        # upsampling: applied first, it gives the same map (to float rounding) at a quarter of the cost.
        x = self.out_conv(self.unit(x))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True) if upsample else x


class DPTDecoder(nn.Module):
    """Per-level 3x3 projections to ``features`` channels, then four fusion blocks coarse-to-fine.

    Args:
        widths: channels of the four reassembled maps (strides 4, 8, 16, 32).
        features: common decoder width (LSeg: 256).
        use_bn: BatchNorm in the residual units.

    ``proj[i]`` and ``fusion[i]`` belong to level ``i`` (0 = stride 4). Input: the four maps; output:
    ``B x features x H/2 x W/2`` (``H/4 x W/4`` with ``upsample_last=False``: the last x2 bilinear
    upsampling left to the caller, e.g. to run a 1x1 head first, which commutes with it).
    """

    def __init__(self, widths: Sequence[int], features: int = 256, use_bn: bool = True) -> None:
        super().__init__()
        self.proj = nn.ModuleList(Conv3x3(w, features, bias=False) for w in widths)
        self.fusion = nn.ModuleList(FusionBlock(features, use_bn, has_skip=i < 3) for i in range(4))

    def forward(self, maps: Sequence[torch.Tensor], upsample_last: bool = True) -> torch.Tensor:
        levels = [proj(m) for proj, m in zip(self.proj, maps, strict=True)]
        path = self.fusion[3](levels[3])
        for i in (2, 1):
            path = self.fusion[i](path, levels[i])
        return self.fusion[0](path, levels[0], upsample=upsample_last)
