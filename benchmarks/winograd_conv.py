"""Winograd F(4x4, 3x3) against F.conv2d for the DPT decoder's 3x3 convolutions, per map size.

    python benchmarks/winograd_conv.py [--reps 9] [--threads 2] [--tiles 96,192,384]

For each shape (LSeg's decoder at 384 px is 96, 48, 24 and 12 pixels a side at 256 channels; 480 px
gives 120; the finest projection has 96 input channels; the small ones bound the thresholds in
``langseg.models.dpt``) the script times ``F.conv2d`` (channels-last input and weights, with bias, as
the decoder runs it) and ``winograd_conv3x3`` at several tile-block sizes, each variant once per
repetition in turn (interleaved), and prints medians, their ratios, and the largest error of each
against a float64 convolution. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import langseg.models.winograd as winograd

# (side, input channels, output channels)
SHAPES = [(120, 256, 256), (96, 256, 256), (96, 96, 256), (48, 256, 256), (24, 256, 256), (12, 256, 256),
          (8, 256, 256), (32, 64, 64), (32, 32, 32)]  # fmt: skip


def row(shape: tuple[int, int, int], tile_blocks: list[int], reps: int, gen: torch.Generator) -> str:
    """One table row: F.conv2d and Winograd at each block size, interleaved medians and errors."""
    side, c_in, c_out = shape
    x = torch.randn(1, c_in, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) / (3 * c_in**0.5)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c_out, generator=gen)
    kernel = winograd.transform_kernel(weight, bias)
    variants: dict[str, Callable[[], torch.Tensor]] = {"conv2d": lambda: F.conv2d(x, weight, bias, padding=1)}
    for tiles in tile_blocks:

        def run(tiles: int = tiles) -> torch.Tensor:
            winograd.TILES_PER_BLOCK = tiles
            return winograd.winograd_conv3x3(x, kernel)

        variants[f"t{tiles}"] = run
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    errors = {name: (f().double() - reference).abs().max().item() for name, f in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, f in variants.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cells = [
        f"{medians[n] * 1e3:8.1f} ms ({medians['conv2d'] / medians[n]:.2f}x)"
        for n in variants
        if n != "conv2d"
    ]
    wino_error = max(e for n, e in errors.items() if n != "conv2d")
    return (f"{side:>4} {c_in:>4} {c_out:>5}  {medians['conv2d'] * 1e3:9.1f}  " + "  ".join(cells)
            + f"  {errors['conv2d']:.1e} / {wino_error:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiles", default="96,192,384", help="TILES_PER_BLOCK values to try")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before {os.getloadavg()}; torch {torch.__version__}, {args.threads} threads")
    print(f"{'side':>4} {'C_in':>4} {'C_out':>5}  {'conv2d ms':>9}  " + "  ".join(
        f"{'F(4,3) t' + t:>18}" for t in args.tiles.split(",")) + "  max err (conv2d / F(4,3))")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        print(row(shape, [int(t) for t in args.tiles.split(",")], args.reps, gen))
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
