"""CLIP text-tower speed on this CPU: 5 new labels at ViT-B/32, open_clip's full forward vs langseg's.

    python benchmarks/text_speed.py [--repeats 15] [--threads N]

``ClipTextEncoder("ViT-B-32")`` with RANDOM weights (no model hub here; the time of a forward does not
depend on the values), frozen as LSeg keeps it. Five labels, tokenised by open_clip to 77 positions.

Columns, per weight dtype (float32, and bfloat16 via ``.to(torch.bfloat16)``, no autocast):

- ``open_clip full``: ``encoder.text(ids)``, open_clip's own forward over all 77 positions. With frozen
  weights nn.MultiheadAttention's in-projection runs as ``aten::bmm`` (see ``run_text_blocks``).
- ``full, no bmm``: langseg's blocks over all 77 positions (``encode_text_trimmed(..., length=77)``):
  the in-projection as one ``addmm``, so this column isolates the bmm's cost.
- ``trimmed``: ``encoder.encode(ids)``, langseg's path: only up to the last end-of-text token, no bmm.
- ratios to ``trimmed``, the largest |difference| of ``trimmed`` from ``open_clip full``, and the
  ``aten::bmm`` calls each forward issues (torch.profiler).

Each time is the median of ``--repeats`` rounds in which the three forwards alternate, so that load from
other processes hits all of them alike. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from langseg.models.text import ClipTextEncoder, encode_text_trimmed

LABELS = ["cat", "sofa", "potted plant", "window", "other"]


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (s) of each function over ``repeats`` rounds, alternating within each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bmm_calls(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name == "aten::bmm" for event in prof.events())


def measure(dtype: torch.dtype, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    encoder = ClipTextEncoder("ViT-B-32").to(dtype).eval()
    fns: dict[str, Callable[[], object]] = {
        "full": lambda: encoder.text(ids),
        "full_no_bmm": lambda: encode_text_trimmed(encoder.text, ids, length=ids.shape[1])[0],
        "trimmed": lambda: encoder.encode(ids),
    }
    with torch.inference_mode():
        for fn in fns.values():  # warm-up: allocator, oneDNN kernels
            fn()
        times = median_times(fns, repeats)
        diff = float((encoder.encode(ids).float() - encoder.text(ids).float()).abs().max())
        bmm = {name: bmm_calls(fn) for name, fn in fns.items()}
    return {**times, "diff": diff, **{f"bmm_{name}": float(n) for name, n in bmm.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = open_clip.get_tokenizer("ViT-B-32")(LABELS)
    eot = int(ids.argmax(-1).max())
    console = Console(width=200)
    console.print(
        f"{len(LABELS)} labels {LABELS}, {ids.shape[1]} positions, last EOT at {eot} "
        f"(trimmed runs {eot + 1}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average before: {os.getloadavg()}"
    )
    rows = {
        name: measure(dtype, ids, args.repeats)
        for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
    }
    console.print(f"load average after: {os.getloadavg()}")

    table = Table(title=f"ViT-B/32 text tower, {len(LABELS)} new labels (median of {args.repeats}, ms)")
    for column in (
        "weights",
        "open_clip full",
        "full, no bmm",
        "trimmed",
        "full / trimmed",
        "full / full no bmm",
        "max |trimmed - full|",
        "bmm calls (full / no bmm / trimmed)",
    ):
        table.add_column(column, justify="right")
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['full'] * 1e3:.1f}",
            f"{r['full_no_bmm'] * 1e3:.1f}",
            f"{r['trimmed'] * 1e3:.1f}",
            f"{r['full'] / r['trimmed']:.1f}x",
            f"{r['full'] / r['full_no_bmm']:.2f}x",
            f"{r['diff']:.1e}",
            f"{r['bmm_full']:.0f} / {r['bmm_full_no_bmm']:.0f} / {r['bmm_trimmed']:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
