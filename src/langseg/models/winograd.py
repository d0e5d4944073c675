"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3), for fp32 inference on CPU.

A 3x3 convolution (stride 1, padding 1) of a ``C``-channel map costs ``9 C C'`` multiplies per output
pixel. Winograd's algorithm cuts the map into 6x6 input tiles overlapping by 2 that each give a 4x4
output tile, transforms tiles and kernels into a 36-point domain where the convolution becomes 36
independent matrix products (``tiles x C`` by ``C x C'``), and transforms back: 36/16 = 2.25
multiplies per output pixel per channel pair, 4x fewer. On CPUs the price is the transforms, which move
memory; they are done here as two small matrix products per block of tile rows (the Kronecker product
of the 1-D transforms), so that a block's 36 tile copies stay in cache.

The transform matrices follow from interpolation points (Toom-Cook; Lavin & Gray 2016, "Fast
Algorithms for Convolutional Neural Networks"): with points ``p_0..p_4`` and infinity,
``A^T[i, j] = p_j^i``, ``G[j, k] = p_j^k / prod_{l != j}(p_j - p_l)`` and the rows of ``B^T`` are the
coefficients of ``prod_{l != j}(x - p_l)`` (and of the full product for the point at infinity); they
are built exactly with fractions, then rounded once.

Accuracy: with the points 0, +-1, +-2 the fp32 result's error is about 4x that of a direct fp32
convolution (rms 3e-6 against 8e-7 on unit-variance outputs of 2304-term sums); fine for inference,
which is the only use (training and export keep ``F.conv2d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

OUTPUT_TILE = 4  # m: output tile side
KERNEL = 3  # r: kernel side
INPUT_TILE = OUTPUT_TILE + KERNEL - 1  # a = m + r - 1 = 6
POINTS = (0, 1, -1, 2, -2)  # interpolation points besides infinity (a - 1 of them)
TILES_PER_BLOCK = (
    96  # tiles transformed together (~3.5 MB of fp32 at 256 channels): benchmarks/winograd_conv.py
)


def _poly(roots: list[Fraction]) -> list[Fraction]:
    """Coefficients (constant first) of ``prod (x - root)``."""
    coeffs = [Fraction(1)]
    for root in roots:
        shifted = [Fraction(0), *coeffs]  # x * p(x)
        coeffs = [s - root * (coeffs[i] if i < len(coeffs) else 0) for i, s in enumerate(shifted)]
    return coeffs


def transform_matrices(points: tuple[int, ...] = POINTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B^T, G, A^T)`` of F(m x m, 3 x 3) for ``m = len(points) - 1``, float64.

    Shapes: ``B^T`` a x a, ``G`` a x 3, ``A^T`` m x a with ``a = len(points) + 1``. They compute the
    cross-correlation ``F.conv2d`` does: ``Y = A^T [(G g G^T) * (B^T d B)] A`` for a 3x3 kernel ``g``
    and an ``a x a`` input tile ``d``.
    """
    p = [Fraction(x) for x in points]
    n = len(p) + 1
    m = n - KERNEL + 1
    a_t = [[p[j] ** i for j in range(n - 1)] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, pj in enumerate(p):
        denominator = Fraction(1)
        for k, pk in enumerate(p):
            if k != j:
                denominator *= pj - pk
        g.append([pj**k / denominator for k in range(KERNEL)])
    g.append([Fraction(int(k == KERNEL - 1)) for k in range(KERNEL)])
    b_t = [[*_poly([pk for k, pk in enumerate(p) if k != j]), Fraction(0)] for j in range(n - 1)]
    b_t.append(_poly(p))

    def tensor(rows: list[list[Fraction]]) -> torch.Tensor:
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    return tensor(b_t), tensor(g), tensor(a_t)


@dataclass(frozen=True)
class WinogradKernel:
    """A 3x3 convolution's weights in the Winograd domain.

    ``u``: ``36 x C_in x C_out``; ``input_transform``: ``36 x 36`` (``B^T`` kron ``B^T``);
    ``output_transform``: ``16 x 36`` (``A^T`` kron ``A^T``); ``bias``: ``C_out`` or None.
    """

    u: torch.Tensor
    input_transform: torch.Tensor
    output_transform: torch.Tensor
    bias: torch.Tensor | None


def transform_kernel(weight: torch.Tensor, bias: torch.Tensor | None = None) -> WinogradKernel:
    """``weight``: ``C_out x C_in x 3 x 3`` -> its Winograd form, computed in float64 and rounded to
    ``weight``'s dtype once."""
    if weight.shape[-2:] != (KERNEL, KERNEL):
        raise ValueError(f"Winograd F(4x4, 3x3) needs a 3x3 kernel, got {tuple(weight.shape[-2:])}")
    b_t, g, a_t = (t.to(weight.device) for t in transform_matrices())
    side = g.shape[0]
    # u[p, q] = sum_kl G[p, k] w[k, l] G[q, l]; p indexes tile rows, q tile columns.
    u = torch.einsum("pk,oikl,ql->pqio", g, weight.detach().double(), g)
    return WinogradKernel(
        u=u.reshape(side * side, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous(),
        input_transform=torch.kron(b_t, b_t).to(weight.dtype),
        output_transform=torch.kron(a_t, a_t).to(weight.dtype),
        bias=None if bias is None else bias.detach().clone(),
    )


def winograd_conv3x3(x: torch.Tensor, kernel: WinogradKernel) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``x``: ``B x C_in x H x W`` -> ``B x C_out x H x W``.

    The result is laid out channels-last (as oneDNN's convolutions return it for channels-last input).
    """
    batch, channels, height, width = x.shape
    cells, c_in, c_out = kernel.u.shape
    if channels != c_in:
        raise ValueError(f"input has {channels} channels, the kernel expects {c_in}")
    a, m = INPUT_TILE, OUTPUT_TILE
    rows, cols = -(-height // m), -(-width // m)
    # Pad 1 on the top/left (the convolution's padding), and on the bottom/right up to whole tiles;
    # only the borders are zeroed (F.pad would fill the whole map first, then copy).
    padded = x.new_empty(batch, m * rows + a - m, m * cols + a - m, channels)
    padded[:, 1 : height + 1, 1 : width + 1] = x.permute(0, 2, 3, 1)
    padded[:, 0].zero_()
    padded[:, height + 1 :].zero_()
    padded[:, 1 : height + 1, 0].zero_()
    padded[:, 1 : height + 1, width + 1 :].zero_()
    out = torch.empty(batch, rows, m, cols, m, c_out, dtype=x.dtype, device=x.device)
    rows_per_block = max(1, TILES_PER_BLOCK // max(1, batch * cols))
    for first in range(0, rows, rows_per_block):
        last = min(rows, first + rows_per_block)
        block = padded[:, m * first : m * last + a - m]
        s_b, s_h, s_w, s_c = block.stride()
        # Every a x a tile (stride m) of the block, gathered as 36 x (tiles * C).
        tiles = block.as_strided(
            (a, a, batch, last - first, cols, channels), (s_h, s_w, s_b, m * s_h, m * s_w, s_c)
        ).reshape(cells, -1)
        transformed = (kernel.input_transform @ tiles).view(cells, -1, channels)
        products = torch.bmm(transformed, kernel.u)  # 36 x tiles x C_out
        tiles_out = (kernel.output_transform @ products.view(cells, -1)).view(
            m, m, batch, last - first, cols, c_out
        )
        if kernel.bias is None:
            out[:, first:last] = tiles_out.permute(2, 3, 0, 4, 1, 5)
        else:  # the bias is added on the way out (one pass over the result, not two)
            torch.add(tiles_out.permute(2, 3, 0, 4, 1, 5), kernel.bias, out=out[:, first:last])
    result = out.view(batch, m * rows, m * cols, c_out)[:, :height, :width]
    if (height, width) != (m * rows, m * cols):
        result = result.contiguous()  # dense, channels-last
    return result.permute(0, 3, 1, 2)
