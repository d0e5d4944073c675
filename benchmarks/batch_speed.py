"""Benchmark the batch path of ``langseg segment`` / ``langseg refer`` against the bare network.

    python benchmarks/batch_speed.py [--model vlt-shapes] [--num 100] [--size 128] [--threads 1]
                                     [--rounds 5] [--batch-size 8] [--labels "a, b, c"] [--text T ...]

Renders ``--num`` ShapeWorld scenes (backgrounds cycling plain / noise / texture) into a temporary folder,
loads the model once, and times, interleaved over ``--rounds`` rounds (so that other jobs on a shared
machine hit every path alike):

- **bare network**: the network's forward alone on the already preprocessed input tensors, one image
  per call (for a referring model ``encode_image`` + ``decode`` of all expressions; for a semantic model
  ``encode_image`` + ``dense_logits`` of all labels on each tensor the predictor's test-time plan feeds
  it: scaled, windowed, flipped and padded beforehand): the reference of the "vs bare" column;
- **bare network, B per call**: the same with ``--batch-size`` images stacked in each call (the reference
  of the "vs bare B" column: what batching alone gives the network);
- **batch, B per call, writing (the CLI)**: :func:`langseg.batch.run_batch` as ``langseg segment`` /
  ``langseg refer`` run it: decoding the PNG files, preprocessing, the network on ``--batch-size`` images
  per call, mapping to the image size, and writing overlay, palette mask and JSON;
- **batch, B per call, no writing**: the same without writing outputs, to see where the time goes;
- **batch, B per call, writing, threads**: with its workers as threads rather than forked processes
  (the default on Linux with a CPU predictor; see :mod:`langseg.batch.workers`);
- **batch, 1 per call, writing**: the CLI path with ``--batch-size 1``;
- **bare network, other core busy**: the bare network while another process compresses data on the
  other core: a control for how much this machine slows one core when the other one works at all (a
  pipeline cannot beat it, since its decoding and writing have to run somewhere).

Rates are images per second by the wall clock, the median of the rounds. Beside them: the CPU time
per image of all threads and worker processes, and of the calling thread alone (the network's thread:
the critical path, which the decoding and writing workers must not lengthen). The pipeline reaches the
bare network's rate only when the machine has a core to spare for its workers, so the script also
measures how many cores this process actually gets (two threads of GIL-free zlib work against one) and
prints it with the load average. ``--model`` takes a registry name or a checkpoint folder (a semantic
model gets ``--labels``, a referring one ``--text``). Prints one table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import resource
import statistics
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

import langseg
from langseg.batch import check_job, run_batch
from langseg.data import ShapeWorldConfig, render_scene
from langseg.predict.tta import run_plan

TEXTS = ["the large circle on the left", "the red square"]
LABELS = "red circle, blue square, green triangle, yellow star, background"
BACKGROUNDS = ("plain", "noise", "texture")


def render_folder(folder: Path, num: int, size: int) -> list[Path]:
    """``num`` ShapeWorld scenes as PNG files (seed 123: no training world)."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(num):
        config = ShapeWorldConfig(size=size, background=BACKGROUNDS[i % 3])  # type: ignore[arg-type]
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(render_scene(seed=123, index=i, config=config).image).save(paths[-1])
    return paths


def plan_inputs(predictor: object, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a semantic predictor's test-time plan hands its network for input ``x`` (scaled,
    windowed, flipped), padded as the predictor pads them: what the bare network gets too."""
    seen: list[torch.Tensor] = []
    multiple = predictor.preprocess.pad_multiple  # type: ignore[attr-defined]

    def record(windows: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-windows.shape[-2]) % multiple, (-windows.shape[-1]) % multiple
        seen.append(F.pad(windows, (0, pad_w, 0, pad_h)))
        return windows.new_zeros(windows.shape[0], 1, *windows.shape[-2:])

    run_plan(record, x, predictor.plan)  # type: ignore[attr-defined]
    return seen


def bare_pass(
    predictor: object, inputs: list[torch.Tensor], prompts: list[str], batch: int = 1
) -> Callable[[], int]:
    """The network's forward on the preprocessed inputs, nothing around it, ``batch`` images per call
    (stacked along the batch; a referring model decodes the ``batch x E`` image-expression pairs)."""
    model = predictor.model  # type: ignore[attr-defined]
    dtype = next(model.parameters()).dtype
    if hasattr(predictor, "expressions"):
        expressions = predictor.expressions(prompts)  # type: ignore[attr-defined]
        per_image = [[x.to(dtype)] for x in inputs]

        def forward(x: torch.Tensor) -> torch.Tensor:
            count = expressions.ids.shape[0]
            features = [f.repeat_interleave(count, dim=0) for f in model.encode_image(x)]
            return model.decode(
                features,
                expressions.ids.repeat(x.shape[0], 1),
                expressions.mask.repeat(x.shape[0], 1),
            )

    else:
        embeddings = predictor.label_set(prompts).embeddings  # type: ignore[attr-defined]
        per_image = [plan_inputs(predictor, x) for x in inputs]

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model.dense_logits(model.encode_image(x), embeddings)

    # The same plan step of ``batch`` consecutive images in one tensor (every scene has the same size).
    calls = [
        [torch.cat(step) for step in zip(*per_image[start : start + batch], strict=True)]
        for start in range(0, len(per_image), batch)
    ]

    def run() -> int:
        with torch.inference_mode():
            for tensors in calls:
                for x in tensors:
                    forward(x)
        return len(per_image)

    return run


def batch_pass(
    predictor: object, job_for: Callable[[], object], write: bool, batch: int, processes: bool | None = None
) -> Callable[[], int]:
    def run() -> int:
        summary = run_batch(predictor, job_for(), write=write, write_processes=processes, batch_size=batch)
        assert not summary.failed, summary.failed
        return len(summary.written)

    return run


def busy_neighbour(run: Callable[[], int]) -> Callable[[], int]:
    """``run`` while a forked process compresses data (GIL-free, cache-light work) on another core: how
    much this machine slows one core down when the other works at all, whatever the pipeline does."""

    def compress_until(stop: multiprocessing.synchronize.Event) -> None:
        data = os.urandom(1 << 16)
        while not stop.is_set():
            zlib.compress(data, 1)

    def with_neighbour() -> int:
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        neighbour = context.Process(target=compress_until, args=(stop,), daemon=True)
        neighbour.start()
        try:
            return run()
        finally:
            stop.set()
            neighbour.join()

    return with_neighbour


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the batch's worker processes, which
    have ended when ``run_batch`` returns)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cores_available(seconds: float = 0.5) -> float:
    """How many cores this process gets now: the throughput of two threads of GIL-free work (zlib)
    over that of one (2.0 on an idle machine with two spare cores, 1.0 when only one is to be had)."""
    data = os.urandom(1 << 20)

    def work(counts: list[int], index: int, until: float) -> None:
        while time.perf_counter() < until:
            zlib.compress(data, 1)
            counts[index] += 1

    one = [0]
    work(one, 0, time.perf_counter() + seconds)
    two = [0, 0]
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=work, args=(two, i, until)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(two) / max(one[0], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlt-shapes", help="registry name or checkpoint folder")
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--size", type=int, default=128, help="scene side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the network")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="images per network call (the CLI's)")
    parser.add_argument("--labels", default=LABELS, help="semantic models: comma-separated labels")
    parser.add_argument("--text", action="append", help="referring models: an expression (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    load_before, cores_before = os.getloadavg(), cores_available()
    predictor = langseg.load(args.model, device="cpu")
    task = "referring" if hasattr(predictor, "expressions") else "semantic"
    prompts = (args.text or TEXTS) if task == "referring" else [p.strip() for p in args.labels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = render_folder(root / "images", args.num, args.size)
        inputs = [predictor.prepare(path).input for path in images]
        runs_done = [0]

        def job_for() -> object:  # a fresh output folder each pass: every pass writes every file
            runs_done[0] += 1
            out = root / f"out{runs_done[0]}"
            return check_job(task, [root / "images"], prompts, model=args.model, out_dir=out, device="cpu")

        bare = bare_pass(predictor, inputs, prompts)
        b = args.batch_size
        runs = {
            "bare network": bare,
            f"bare network, {b} per call": bare_pass(predictor, inputs, prompts, b),
            f"batch, {b} per call, writing (the CLI)": batch_pass(predictor, job_for, True, b),
            f"batch, {b} per call, no writing": batch_pass(predictor, job_for, False, b),
            f"batch, {b} per call, writing, threads": batch_pass(
                predictor, job_for, True, b, processes=False
            ),
            "batch, 1 per call, writing": batch_pass(predictor, job_for, True, 1),
            "bare network, other core busy": busy_neighbour(bare),
        }
        for run in runs.values():  # warm-up: allocator, caches, thread pools
            run()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}  # ms per image, all threads
        main_thread: dict[str, list[float]] = {name: [] for name in runs}  # ms per image, this thread
        for _ in range(args.rounds):
            for name, run in runs.items():
                start, start_cpu, start_thread = time.perf_counter(), cpu_seconds(), time.thread_time()
                count = run()
                rates[name].append(count / (time.perf_counter() - start))
                cpu[name].append(1000 * (cpu_seconds() - start_cpu) / count)
                main_thread[name].append(1000 * (time.thread_time() - start_thread) / count)
    load_after, cores_after = os.getloadavg(), cores_available()
    bare = statistics.median(rates["bare network"])
    bare_batched = statistics.median(rates[f"bare network, {args.batch_size} per call"])
    title = (
        f"{args.model} ({task}), {args.num} scenes of {args.size} px, {len(prompts)} prompts, "
        f"{args.threads} torch thread(s), median of {args.rounds} interleaved rounds"
    )
    columns = (
        "path",
        "images/s",
        "range",
        "vs bare",
        f"vs bare {args.batch_size}",
        "CPU ms/img",
        "net ms/img",
    )
    table = Table(*columns, title=title)
    for name, values in rates.items():
        median = statistics.median(values)
        table.add_row(
            name,
            f"{median:.1f}",
            f"{min(values):.1f}-{max(values):.1f}",
            f"{median / bare:.2f}x",
            f"{median / bare_batched:.2f}x",
            f"{statistics.median(cpu[name]):.2f}",
            f"{statistics.median(main_thread[name]):.2f}",
        )
    loads = [" ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after)]
    console.print(f"load average (1, 5, 15 min) before {loads[0]}, after {loads[1]}; {os.cpu_count()} cores")
    console.print(
        f"cores this process gets (2 threads against 1): {cores_before:.2f}, after: {cores_after:.2f}"
    )
    console.print(table)


if __name__ == "__main__":
    main()
