"""Training-free dense CLIP speed on this CPU: ``segment()`` against a bare open_clip image forward.

    python benchmarks/dense_clip_speed.py [--repeats 5] [--size 448] [--mode naclip] [--threads N]

open_clip ViT-B-16 (QuickGELU, as the OpenAI weights) with RANDOM weights: no model hub is reachable
here, and the time of a forward pass does not depend on the values. The image is ``size x size`` and the
segmenter keeps it at that size (``short_side=size``), so with 224 windows every 112 pixels a 448 image
is 9 windows. The baseline is ``model.encode_image`` on exactly those 9 windows, in the same batches
(8): everything ``segment()`` adds on top (last-block recompute, cosine logits, window averaging, PAMR
for NACLIP, upsampling to the original size, argmax) shows up in the ratio.

Columns: ``encode_image`` (baseline); ``segment`` first call with 3 new labels (text: 3 x 80 templates);
``segment, labels cached`` on a new image (text cache hit, image recomputed), and its ratio to the
baseline; ``same image + labels`` (image features cached too). Rows: float32 weights, and bfloat16
weights (``model.to(torch.bfloat16)``, no autocast). Each time is the best of ``--repeats`` runs, and the
baseline and ``segment`` runs alternate, so that load from other processes on a shared machine hits both
alike (the best run is the one least disturbed by it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import open_clip
import torch
from rich.console import Console
from rich.table import Table

from langseg.predict.tta import window_starts
from langseg.zoo.dense_clip import DenseClipOptions, dense_clip_segmenter

LABELS = ["cat", "sofa", "other"]


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds, the functions alternating in each round."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def photo(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def measure(dtype: torch.dtype, size: int, mode: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True).to(dtype).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")

    def make():
        return dense_clip_segmenter(model, tokenizer, mode, options=DenseClipOptions(short_side=size))

    seg = make()
    images = [photo(size, seed) for seed in range(2)]
    seg.set_image(images[0])
    x = seg.input_tensor  # the working image segment() will cut its windows from
    crop, stride, batch = seg.plan.crop, seg.plan.window_stride(), seg.plan.batch_size
    boxes = [(t, s) for t in window_starts(size, crop, stride) for s in window_starts(size, crop, stride)]
    windows = torch.cat([x[..., t : t + crop, s : s + crop] for t, s in boxes]).to(dtype)

    @torch.inference_mode()
    def bare() -> None:
        for i in range(0, len(windows), batch):
            model.encode_image(windows[i : i + batch])

    calls = iter(range(1 << 30))
    bare()  # warm-up: allocator, oneDNN kernels, tokenizer cache
    make().segment(images[0], LABELS)
    seg.segment(images[1], LABELS)
    result = best_times(
        {
            "bare": bare,
            "cold": lambda: make().segment(images[0], LABELS),
            "warm": lambda: seg.segment(images[next(calls) % 2], LABELS),
            "cached": lambda: seg.segment(labels=LABELS),
        },
        repeats,
    )
    return {**result, "ratio": result["warm"] / result["bare"], "windows": len(boxes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--mode", default="naclip")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = Table(
        "weights",
        "encode_image (bare)",
        "segment, new labels",
        "segment, labels cached",
        "ratio to bare",
        "same image + labels",
        title=(
            f"{args.mode} on open_clip ViT-B-16 (random weights), {args.size}x{args.size} image, "
            f"{torch.get_num_threads()} CPU threads, best of {args.repeats}"
        ),
    )
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        r = measure(dtype, args.size, args.mode, args.repeats)
        table.add_row(
            name,
            f"{r['bare']:.2f} s ({r['windows']} windows)",
            f"{r['cold']:.2f} s",
            f"{r['warm']:.2f} s",
            f"{r['ratio']:.2f}",
            f"{r['cached']:.3f} s",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
