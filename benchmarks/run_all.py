"""One performance table: every family at its default size, PyTorch fp32 / bf16 and onnxruntime.

    python benchmarks/run_all.py [--models lseg-vitb32-384 naclip-vit-b16 lseg-shapes vlt-shapes]
                                 [--backends fp32 bf16 onnx] [--reps 5] [--threads N] [--keep DIR]
                                 [--quick] [--device cuda --lseg-size 480]   # GPU figures (no onnx)

Models without bundled weights get RANDOM weights (no model hub here; speed does not depend on the
values). Per model, in fresh processes: the fp32 predictor exported with ``langseg.export.export_onnx``;
then all backends loaded (``bf16``: the family's ``dtype="bfloat16"`` option; ``onnx``: ``langseg.load``
of the exported folder), one warm-up call of everything, and ``--reps`` rounds in which every timed
call of every backend and a large fp32 and bf16 ``torch.mm`` alternate (so that load from other
processes hits all alike); figures are medians over the rounds; then peak memory, one process per row.
Columns: ``segment()`` / ``refer()`` p50 on a new image (prompts cached), bare-network images/s at batch
1 and 8, peak memory of the batch-8 forward above the loaded model, GFLOP per image
(``FlopCounterMode``, nominal: LSeg's Winograd convolutions counted as direct ones), the share of the
matmul FLOP/s reached at batch 8, and ``segment()`` over the bare forward. docs/performance.md says
exactly how each is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import langseg
from langseg.export import is_exported_folder
from langseg.models.dpt import reference_convolutions
from langseg.predict.tta import InferencePlan, run_plan

DEFAULT_MODELS = ["lseg-vitb32-384", "naclip-vit-b16", "lseg-shapes", "vlt-shapes"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
EXPRESSION = "the large circle on the left"


@dataclass(frozen=True)
class Spec:
    """What a model is measured on: image side (pixels) and prompts (labels, or one expression)."""

    side: int
    prompts: tuple[str, ...]


def spec_for(model: str, lseg_size: int) -> Spec:
    if model.startswith("vlt-"):
        return Spec(128, (EXPRESSION,))
    if model == "lseg-shapes":
        return Spec(128, ("red circle", "blue square", "green triangle", "yellow star", "background"))
    if model.startswith("lseg-"):
        return Spec(lseg_size, ("cat", "grass", "sky", "wooden table", "other"))
    return Spec(336, ("cat", "sofa", "other"))  # dense CLIP: its short side, no resizing


# ---------------------------------------------------------------------------------------- building


def random_open_clip(path: Path) -> Path:
    """A random open_clip ViT-B-16 checkpoint (QuickGELU, as the OpenAI tag) at ``path``, once."""
    if not path.exists():
        import open_clip
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", force_quick_gelu=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def build(model: str, backend: str, tmp: Path, device: str, lseg_size: int) -> Any:
    """The predictor of ``model`` on ``backend``; ``onnx`` loads the folder the worker exported."""
    if backend == "onnx":
        return langseg.load(str(tmp / f"onnx-{model}"))
    dtype = DTYPES[backend]
    if model.startswith("lseg-") and model != "lseg-shapes":
        from langseg.models.lseg import TEXT_ENCODER_CONFIGS, LSeg
        from langseg.models.text import ClipTextEncoder
        from langseg.zoo.lseg import LSegOptions, lseg_segmenter

        torch.manual_seed(0)  # the same random weights for every backend
        net, text = langseg.create_model(model), ClipTextEncoder(**TEXT_ENCODER_CONFIGS[model])
        options = LSegOptions(plan=InferencePlan(), dtype=dtype)  # one pass at the image's own size
        return lseg_segmenter(LSeg(net, text), device, options)
    if model.startswith("vlt-") and model != "vlt-shapes":
        from langseg.predict.referrer import Referrer

        torch.manual_seed(0)
        net = langseg.create_model(model).to(dtype=getattr(torch, dtype)).eval()
        return Referrer(net, langseg.load("vlt-shapes").tokenizer, device=device)
    weights = random_open_clip(tmp / "open_clip-vit-b16.safetensors") if "clip" in model else None
    return langseg.load(model, weights=weights, device=device, dtype=dtype)


def photos(side: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(side)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]


def network_inputs(predictor: Any, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the predictor hands its network for prepared input ``x``: for a Segmenter, each call
    of its test-time plan (windows, flips), padded as it pads them; for a Referrer, ``x`` itself."""
    if not hasattr(predictor, "plan"):
        return [x]
    seen: list[torch.Tensor] = []
    multiple = predictor.preprocess.pad_multiple

    def record(windows: torch.Tensor) -> torch.Tensor:
        seen.append(F.pad(windows, (0, (-windows.shape[-1]) % multiple, 0, (-windows.shape[-2]) % multiple)))
        return windows.new_zeros(windows.shape[0], 1, *windows.shape[-2:])

    run_plan(record, x, predictor.plan)
    return seen


def bare_forward(predictor: Any, images: list[np.ndarray], prompts: tuple[str, ...]) -> Callable[[], None]:
    """The network alone on ``len(images)`` preprocessed images: each network call of the predictor
    with the images stacked along the batch (a Referrer: one expression per image)."""
    model = predictor.model
    per_image = [network_inputs(predictor, predictor.prepare(image).input) for image in images]
    calls = [torch.cat(group) for group in zip(*per_image, strict=True)]
    if hasattr(predictor, "expressions"):
        found = next(model.parameters(), None)  # bf16 weights take bf16 images, as Referrer casts them
        calls = [x.to(found.dtype) if found is not None else x for x in calls]
        expressions = predictor.expressions(list(prompts))
        ids, mask = expressions.ids.repeat(len(images), 1), expressions.mask.repeat(len(images), 1)

        def forward(x: torch.Tensor) -> object:
            return model.decode(model.encode_image(x), ids, mask)

    else:
        embeddings = predictor.label_set(list(prompts)).embeddings

        def forward(x: torch.Tensor) -> object:
            return model.dense_logits(model.encode_image(x), embeddings)

    def run() -> None:
        with torch.inference_mode():
            for x in calls:
                forward(x)

    return run


def predict_call(predictor: Any, images: list[np.ndarray], prompts: tuple[str, ...]) -> Callable[[], None]:
    """``segment()`` / ``refer()`` on the next of ``images`` (never the one set: no feature cache)."""
    counter = iter(range(1 << 30))

    def run() -> None:
        image = images[next(counter) % len(images)]
        if hasattr(predictor, "expressions"):
            predictor.refer(image, prompts[0])
        else:
            predictor.segment(image, list(prompts))

    return run


# ---------------------------------------------------------------------------------------- measuring


def synced(call: Callable[[], object], device: str) -> Callable[[], float]:
    """``call`` timed in seconds, the GPU's queue drained before and after."""

    def timed() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return timed


MM_CALLS = 4  # products per timed matmul call: one short product is at the mercy of a single hiccup


def matmuls(size: int, device: str) -> dict[str, Callable[[], object]]:
    """``MM_CALLS`` ``size`` x ``size`` torch.mm per dtype: the machine's attainable matmul FLOP/s."""
    out: dict[str, Callable[[], object]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        out[f"mm {name}"] = lambda a=a, b=b: [torch.mm(a, b) for _ in range(MM_CALLS)]
    return out


def gflops(run: Callable[[], None]) -> float:
    """The network's nominal GFLOP: 3x3 convolutions counted as direct convolutions (the Winograd
    ones LSeg's decoder runs at fp32 inference do fewer multiplies; the share is then effective)."""
    with reference_convolutions(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def reason(err: BaseException) -> str:
    """One line for a footnote: the error's type and the start of its message."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:220]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """All backends of one model, interleaved; returns rows, matmul GFLOP/s and notes."""
    model, tmp, spec = args.worker, Path(args.tmp), spec_for(args.worker, args.lseg_size)
    notes: dict[str, str] = {}
    predictors: dict[str, Any] = {}
    for backend in args.backends:
        try:
            if backend == "onnx" and args.device != "cpu":
                raise RuntimeError("exported models run on onnxruntime's CPU provider only")
            predictors[backend] = build(model, backend, tmp, args.device, args.lseg_size)
        except Exception as err:  # one backend that cannot load must not lose the others
            notes[backend] = reason(err)
    images = photos(spec.side, 9)
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    for backend, predictor in predictors.items():
        try:
            calls[backend, "segment"] = predict_call(predictor, images, spec.prompts)
            calls[backend, "b1"] = bare_forward(predictor, images[:1], spec.prompts)
            calls[backend, "b8"] = bare_forward(predictor, images[: args.batch], spec.prompts)
        except Exception as err:
            notes[backend] = reason(err)
    calls.update({(name, ""): fn for name, fn in matmuls(args.mm_size, args.device).items()})
    for key, call in list(calls.items()):  # warm-up: kernels, allocator, arenas, prompt caches
        try:
            call()
        except Exception as err:
            notes[key[0] if key[1] != "b8" else f"{key[0]} b{args.batch}"] = reason(err)
            del calls[key]
    timers = {key: synced(call, args.device) for key, call in calls.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for _ in range(args.reps):
        for key, timer in timers.items():
            times[key].append(timer())
    median = {key: statistics.median(values) for key, values in times.items()}
    peak = {name: MM_CALLS * 2 * args.mm_size**3 / median[name, ""] / 1e9 for name in ("mm fp32", "mm bf16")}
    flops = (
        gflops(bare_forward(predictors["fp32"], images[:1], spec.prompts)) if "fp32" in predictors else None
    )
    rows = []
    for backend in args.backends:
        if backend not in predictors:
            rows.append({"model": model, "backend": backend, "side": spec.side})
            continue
        row = {"model": model, "backend": backend, "side": spec.side, "gflop": flops}
        for kind in ("segment", "b1", "b8"):
            row[kind] = median.get((backend, kind))
        if row["b8"] is not None and flops is not None:
            achieved = flops * args.batch / row["b8"]
            row["share"] = achieved / peak["mm bf16" if backend == "bf16" else "mm fp32"]
        rows.append(row)
    return {"rows": rows, "mm": peak, "notes": notes}


def export(args: argparse.Namespace) -> None:
    """Export the fp32 predictor to ``onnx-MODEL`` in the work folder, unless a kept run did already.
    Its own process, so that the exporter's memory and threads touch no timing."""
    from langseg.export import export_onnx, is_exported_folder

    folder = Path(args.tmp) / f"onnx-{args.export}"
    if not is_exported_folder(folder):
        predictor = build(args.export, "fp32", Path(args.tmp), "cpu", args.lseg_size)
        export_onnx(predictor, folder, model_name=args.export, overwrite=True)


def _status_kib(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(found.group(1)) if found else 0


def memory(args: argparse.Namespace) -> float:
    """MiB the first batch-8 forward of a freshly loaded model needs above the model (and its inputs)."""
    model, backend = args.memory
    spec = spec_for(model, args.lseg_size)
    predictor = build(model, backend, Path(args.tmp), args.device, args.lseg_size)
    run = bare_forward(predictor, photos(spec.side, args.batch), spec.prompts)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap pages back first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


# ---------------------------------------------------------------------------------------- the table


def child(args: argparse.Namespace, extra: list[str], backends: list[str] | None = None) -> tuple[Any, str]:
    """Run this script in a fresh process; (its last stdout line as JSON or None, error text)."""
    forwarded = ["--tmp", args.tmp, "--reps", str(args.reps), "--batch", str(args.batch)]
    forwarded += ["--mm-size", str(args.mm_size), "--device", args.device, "--lseg-size", str(args.lseg_size)]
    forwarded += ["--threads", str(torch.get_num_threads()), "--backends", *(backends or args.backends)]
    done = subprocess.run([sys.executable, __file__, *extra, *forwarded], capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def machine(device: str) -> str:
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    cpu = found.group(1) if found else platform.machine()
    gpu = f"; {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    import onnxruntime

    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads{gpu}; "
        f"{versions}, Python {platform.python_version()}"
    )


def fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def run_models(args: argparse.Namespace, console: Console) -> tuple[list[dict], list[str], dict[str, list]]:
    """Per model: export (own process), time (own process), peak memory (one process per row).
    Returns the rows, the footnotes and the matmul GFLOP/s each worker measured."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    mm: dict[str, list[float]] = {"mm fp32": [], "mm bf16": []}
    started = time.perf_counter()

    def say(text: str) -> None:
        console.print(f"[{time.perf_counter() - started:5.0f} s] {text}", highlight=False)

    with contextlib.ExitStack() as stack:
        if args.keep:  # exporting dominates a run's wall time: a kept folder skips it next time
            args.keep.mkdir(parents=True, exist_ok=True)
            args.tmp = str(args.keep)
        else:
            args.tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="langseg-bench-"))
        for model in args.models:
            backends, failed = list(args.backends), ""
            if (
                "onnx" in backends
                and args.device == "cpu"
                and not is_exported_folder(Path(args.tmp) / f"onnx-{model}")
            ):
                say(f"{model}: ONNX export")
                _, failed = child(args, ["--export", model])
                if failed:  # time the other backends; the onnx row says why it is empty
                    backends.remove("onnx")
                    notes.append(f"{model} onnx: export failed: {failed}")
            say(f"{model}: timing")
            result, error = child(args, ["--worker", model], backends)
            if result is None:
                notes.append(f"{model}: the worker failed: {error}")
                continue
            for name, value in result["mm"].items():
                mm[name].append(value)
            notes += [f"{model} {backend}: {why}" for backend, why in result["notes"].items()]
            say(f"{model}: peak memory")
            for row in result["rows"]:
                if row.get("b8") is not None:
                    row["peak"], error = child(args, ["--memory", model, row["backend"]])
                    if error:
                        notes.append(f"{model} {row['backend']} peak memory: {error}")
                rows.append(row)
            if failed:
                rows.append({"model": model, "backend": "onnx", "side": spec_for(model, args.lseg_size).side})
    return rows, notes, mm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument(
        "--backends", nargs="+", default=["fp32", "bf16", "onnx"], choices=["fp32", "bf16", "onnx"]
    )
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed rounds after one warm-up")
    parser.add_argument("--batch", type=int, default=8, help="images per call of the batched forward")
    parser.add_argument("--mm-size", type=int, default=2048, help="side of the reference matmuls")
    parser.add_argument("--lseg-size", type=int, default=384, help="image side for random-weight LSeg")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (onnx is CPU only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, batch 2, small matmuls")
    parser.add_argument(
        "--keep", type=Path, help="folder for the ONNX exports and random checkpoints, reused next run"
    )
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.batch, args.mm_size = 1, 2, 1024
    if args.worker or args.memory or args.export:
        print(json.dumps(worker(args) if args.worker else memory(args) if args.memory else export(args)))
        return
    console = Console(width=200)
    load_before = os.getloadavg()
    rows, notes, mm = run_models(args, console)
    load_after = os.getloadavg()
    title = (
        f"langseg on {args.device}: median of {args.reps} interleaved rounds after one warm-up; "
        f"batched forward = {args.batch} images{'; QUICK SMOKE RUN' if args.quick else ''}"
    )
    table = Table(title=title, box=box.MARKDOWN)
    columns = ["model", "backend", "image", "segment() p50", "img/s b1", f"img/s b{args.batch}"]
    columns += [f"peak b{args.batch}", "GFLOP/img", "% mm peak", "segment()/fwd"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "backend", "image") else "right")
    for r in rows:
        mark = next(
            (f" [{i + 1}]" for i, n in enumerate(notes) if n.startswith(f"{r['model']} {r['backend']}")), ""
        )
        ratio = r["segment"] / r["b1"] if r.get("segment") and r.get("b1") else None
        table.add_row(
            r["model"],
            r["backend"] + mark,
            f"{r['side']}x{r['side']}",
            fmt(r.get("segment") and 1000 * r["segment"], "{:.1f} ms"),
            fmt(r.get("b1") and 1 / r["b1"], "{:.2f}"),
            fmt(r.get("b8") and args.batch / r["b8"], "{:.2f}"),
            fmt(r.get("peak"), "{:.0f} MiB"),
            fmt(r.get("gflop"), "{:.2f}"),
            fmt(r.get("share") and 100 * r["share"], "{:.1f}%"),
            fmt(ratio, "{:.2f}x"),
        )
    console.print(f"machine: {machine(args.device)}")
    loads = [" ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after)]
    console.print(f"load average (1, 5, 15 min): before {loads[0]}, after {loads[1]}")
    for name, values in mm.items():
        if values:
            console.print(
                f"{name} {args.mm_size}x{args.mm_size}: {statistics.median(values):.0f} GFLOP/s "
                f"(median over models; {min(values):.0f}-{max(values):.0f})"
            )
    console.print(table)
    for i, note in enumerate(notes):
        console.print(f"[{i + 1}] {note}", markup=False, highlight=False)


if __name__ == "__main__":
    main()
