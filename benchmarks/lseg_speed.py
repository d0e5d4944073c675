"""LSeg predictor speed and memory on CPU: one ``Segmenter.segment()`` call, and what the caches save.

    python benchmarks/lseg_speed.py [--models lseg-vitb32-384 lseg-vitl16-384] [--sizes 384 480]
                                    [--dtypes float32 bfloat16] [--runs 3]

Models have **random weights** (no published weights; speed and memory do not depend on the values).
Each (model, dtype) runs in a fresh process. The plan is one pass at the image's own size, so the network
sees exactly ``size x size``. bf16 means the image network's weights converted with
``.to(torch.bfloat16)`` (no autocast); the CLIP text tower stays float32 (see ``lseg_segmenter``).

Columns, each the median of ``--runs`` calls (one warm-up call precedes the first size):

- ``segment()``: a new image and a new label set (5 labels): text tower + image encoder + head;
- ``same labels``: ``segment(labels=...)`` again on the same image: text and image features cached;
- ``new labels``: a new label set on the same image: text tower + head, image features cached;
- ``peak RSS``: peak resident memory during that size's calls above the process's RSS once the model is
  loaded, from Linux ``/proc/self/status`` (``VmHWM``, reset per size through ``/proc/self/clear_refs``):
  activations, cached features and allocator slack, not the weights.

Other processes may share the CPU: absolute numbers are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from langseg.api import create_model
from langseg.models.lseg import TEXT_ENCODER_CONFIGS, LSeg
from langseg.models.text import ClipTextEncoder
from langseg.predict import InferencePlan, Segmenter
from langseg.zoo.lseg import LSegOptions, lseg_segmenter

LABELS = ["cat", "grass", "sky", "wooden table", "other"]


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    # Resets VmHWM to the current RSS (Linux >= 4.0). Without it, the figure is the process's peak so far,
    # still right for each size because sizes run in increasing order.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _median_ms(call: Callable[[int], object], runs: int) -> float:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        call(i)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(seg: Segmenter, size: int, runs: int, loaded_kib: int) -> dict[str, float]:
    """Milliseconds of the three kinds of call and the peak RSS (MiB) above ``loaded_kib``, at one size."""
    rng = np.random.default_rng(size)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(runs + 1)]
    counter = iter(range(1 << 30))

    def fresh_labels() -> list[str]:
        return [*LABELS[:-1], f"thing {size}-{next(counter)}"]  # never seen: the text cache cannot help

    _reset_peak()
    if seg.image_encodings == 0:  # warm-up, once per process: one-time kernel selection and allocations
        seg.segment(images[-1], fresh_labels())
    full = _median_ms(lambda i: seg.segment(images[i], fresh_labels()), runs)
    last = fresh_labels()
    seg.segment(labels=last)
    text_calls, image_calls = seg.text_encodings, seg.image_encodings
    same = _median_ms(lambda _: seg.segment(labels=last), runs)
    assert (seg.text_encodings, seg.image_encodings) == (text_calls, image_calls)  # all from the caches
    new = _median_ms(lambda _: seg.segment(labels=fresh_labels()), runs)
    assert seg.image_encodings == image_calls  # new labels reuse the image features
    peak = (_status_kib("VmHWM") - loaded_kib) / 1024
    return {"full": full, "same": same, "new": new, "peak": peak}


def worker(model: str, dtype: str, sizes: list[int], runs: int) -> list[dict]:
    """Measure one model in one dtype (random weights); one row per size."""
    torch.manual_seed(0)
    net, text = create_model(model), ClipTextEncoder(**TEXT_ENCODER_CONFIGS[model])
    seg = lseg_segmenter(LSeg(net, text), options=LSegOptions(plan=InferencePlan(), dtype=dtype))
    loaded_kib = _status_kib("VmRSS")
    return [
        {"model": model, "dtype": dtype, "size": size, **measure(seg, size, runs, loaded_kib)}
        for size in sorted(sizes)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lseg-vitb32-384", "lseg-vitl16-384"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[384, 480])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=3, help="timed calls per figure, after one warm-up")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.sizes, args.runs)))
        return
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            command = [sys.executable, __file__, "--worker", model, dtype, "--runs", str(args.runs)]
            done = subprocess.run(
                [*command, "--sizes", *map(str, args.sizes)], capture_output=True, text=True
            )
            if done.returncode != 0:
                sys.exit(f"{model} {dtype} failed:\n{done.stderr}")
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    cpu = f"{found.group(1) if found else platform.machine()}, {torch.get_num_threads()} threads"
    print(
        f"LSeg segment() on CPU ({cpu}, torch {torch.__version__}); random weights; one pass at size x size;"
    )
    print(f"5 labels; median of {args.runs} calls (after one warm-up call per process)\n")
    print("| model | weights | input | segment() | same labels | new labels | peak RSS above model |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        times = f"{r['full']:.0f} ms | {r['same']:.0f} ms | {r['new']:.0f} ms"
        print(f"| {r['model']} | {r['dtype']} | {r['size']}x{r['size']} | {times} | {r['peak']:.0f} MiB |")


if __name__ == "__main__":
    main()
