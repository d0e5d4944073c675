"""The batch runner behind ``langseg segment`` and ``langseg refer``, callable from Python as well.

``check_job`` checks everything a run needs before any model loads (images, labels or expressions,
output files, model name, task, device, dtype) and raises one :class:`~langseg.errors.LangsegError` per
problem; ``run_batch`` then runs a loaded predictor over the images as a pipeline of three stages, so
that the network never waits for files:

- decoding and preprocessing (``predictor.prepare``) by workers, a few images ahead;
- the network (``predictor.infer_many``) in the calling thread, ``batch_size`` images at a time, with the
  label or expression embeddings computed once for the whole run;
- mapping the logits to the image (``predictor.finish``) and writing the outputs by workers.

The workers are forked processes on Linux with a CPU predictor (they do not compete with the network
for the GIL), threads elsewhere: see :mod:`langseg.batch.workers`.

A file that cannot be decoded (or written) is reported and skipped; the run goes on and the summary lists
it. Outputs go to temporary names and are renamed when complete, so an interrupted run leaves no half
file, and (without ``overwrite``) a file already on disk is never replaced.

Outputs per image ``STEM`` (see :data:`OUTPUTS`): ``STEM.overlay.png`` (colours over the image with a
legend), ``STEM.mask.png`` (VOC-style palette PNG, pixel values = label indices; for referring
0 = nothing, k = expression k) and ``STEM.json`` (label names, areas, scores, COCO RLE masks).
"""

from __future__ import annotations

import glob
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from langseg.batch.outputs import (
    FORMATS,
    OUTPUTS,
    TEMP_PREFIX,
    check_output_dir,
    check_output_file,
    check_output_folder,
    path_kind,
    plan_outputs,
    write_atomic,
    write_file_atomic,
    write_folder_atomic,
)
from langseg.batch.workers import Decoded, Workers, Written, write_outputs
from langseg.errors import BadConfigError, BadImageError, LangsegError, OutputError

__all__ = [
    "FORMATS",
    "OUTPUTS",
    "TEMP_PREFIX",
    "BatchJob",
    "BatchSummary",
    "check_job",
    "check_output_dir",
    "check_output_file",
    "check_output_folder",
    "expand_images",
    "load_predictor",
    "path_kind",
    "plan_outputs",
    "run_batch",
    "write_atomic",
    "write_file_atomic",
    "write_folder_atomic",
    "write_outputs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
COMMANDS = {"semantic": "segment", "referring": "refer"}


@dataclass
class BatchJob:
    """A checked run: what :func:`check_job` returns and :func:`load_predictor` / :func:`run_batch` use.

    Attributes:
        task: ``"semantic"`` (labels) or ``"referring"`` (expressions).
        images: the input files, in order; ``outputs``: for each, output kind -> path.
        prompts: the labels or expressions; ``background_threshold``: semantic only.
        model, weights, device, options: what to load (``options`` go to :func:`langseg.api.load`).
        overwrite: replace existing outputs.
    """

    task: str
    images: list[Path]
    outputs: list[dict[str, Path]]
    prompts: list[str]
    model: str
    weights: Path | None = None
    device: Any = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    background_threshold: float | None = None
    overwrite: bool = False


@dataclass
class BatchSummary:
    """What a run did: ``written`` images (with ``areas``: per image, ``(name, share, score)`` rows),
    ``files`` written, ``failed`` images with the reason, and the wall time."""

    total: int = 0
    written: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    areas: dict[Path, list[tuple[str, float, float | None]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------- checks


def expand_images(items: Sequence[str | Path], skip_outputs_in: Path | None = None) -> list[Path]:
    """Image files from files, folders (their image files, not recursive) and globs, in order, each once.

    A named file is taken whatever its suffix; folders and globs give files with an image suffix
    (:data:`IMAGE_SUFFIXES`), leaving out langseg's own outputs in ``skip_outputs_in``.

    Raises:
        BadImageError: a path that does not exist, a folder or glob without images, an unreadable
            file, or nothing at all.
    """
    found: list[Path] = []

    def is_image(path: Path) -> bool:
        own = skip_outputs_in is not None and path.parent.resolve() == skip_outputs_in.resolve()
        ours = own and path.name.endswith((OUTPUTS["overlay"], OUTPUTS["mask"]))
        return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not ours

    for item in items:
        try:
            found += _expand_one(item, is_image)
        except OSError as err:  # too long, a symlink loop, a folder that cannot be listed...
            hint = "Check the path, and that you may read it."
            raise BadImageError(f"cannot read {item}: {err.strerror or err}", hint=hint) from err
    if not found:
        raise BadImageError("no images given", hint="Pass image files, folders or globs.")
    for path in found:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise BadImageError(f"cannot read {path}", hint="Check that it is a file you may read.")
    unique = {p.resolve(): p for p in reversed(found)}  # first occurrence wins
    return [p for p in found if unique.get(p.resolve()) is p]


def _expand_one(item: str | Path, is_image: Callable[[Path], bool]) -> list[Path]:
    """The image files of one command-line item (see :func:`expand_images`)."""
    path = Path(item).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if is_image(p))
        if not files:
            hint = f"Image files end in {', '.join(IMAGE_SUFFIXES)}."
            raise BadImageError(f"the folder {path} holds no images", hint=hint)
    elif path.exists():
        files = [path]
    elif glob.has_magic(str(item)):
        files = sorted(p for p in map(Path, glob.glob(str(path))) if is_image(p))
        if not files:
            raise BadImageError(f"no image file matches {item}", hint="Check the pattern and the folder.")
    else:
        hint = "Check the path (and the working directory)."
        raise BadImageError(f"image not found: {item}", hint=hint)
    return files


def check_job(
    task: str,
    images: Sequence[str | Path],
    prompts: Sequence[str],
    *,
    model: str,
    out_dir: Path,
    fmt: str = "both",
    overwrite: bool = False,
    weights: Path | None = None,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    background_threshold: float | None = None,
) -> BatchJob:
    """Every check a run makes before the model loads; returns the job, or raises the first problem."""
    from langseg.api import check_load

    if task not in COMMANDS:
        raise BadConfigError(f"unknown task {task!r}", hint="Use semantic or referring.")
    files = expand_images(images, skip_outputs_in=out_dir)
    if task == "semantic":
        from langseg.predict.segmenter import check_labels

        check_labels(prompts, background_threshold)
    else:
        from langseg.errors import BadExpressionError
        from langseg.predict.referrer import check_expression_text

        if not prompts:
            hint = 'Pass --text "the large circle on the left".'
            raise BadExpressionError("no expression given", hint=hint)
        for text in prompts:
            check_expression_text(text)
    outputs = plan_outputs(files, out_dir, fmt, overwrite)
    entry, _, resolved = check_load(model, weights, device, **(options or {}))
    if entry.task != task:
        raise BadConfigError(
            f"{model} is a {entry.task} model; `langseg {COMMANDS[task]}` needs a {task} one",
            hint=f"Run `langseg {COMMANDS[entry.task]} ...` with it, or pick a model from "
            f"`langseg models --task {task}`.",
        )
    return BatchJob(
        task, files, outputs, list(prompts), model, weights, resolved, dict(options or {}),
        background_threshold, overwrite,
    )  # fmt: skip


def load_predictor(job: BatchJob) -> Any:
    """The predictor of a checked job (:func:`langseg.api.load`)."""
    from langseg.api import load

    return load(job.model, weights=job.weights, device=job.device, **job.options)


# ---------------------------------------------------------------------------------------- running


def run_batch(
    predictor: Any,
    job: BatchJob,
    *,
    write: bool = True,
    console: Any = None,
    batch_size: int = 8,
    prefetch: int | None = None,
    decode_workers: int = 2,
    write_workers: int = 1,
    write_processes: bool | None = None,
) -> BatchSummary:
    """Run ``predictor`` over ``job.images`` and write their outputs (see the module docstring).

    Args:
        predictor: a ``Segmenter`` for a semantic job, a ``Referrer`` for a referring one.
        job: from :func:`check_job` (or built directly).
        write: write the outputs (``False``: compute and map results only, e.g. for benchmarks).
        console: a rich console for the progress bar and the skipped files, or ``None`` for silence.
        batch_size: images per network call, as far as they are decoded (``predictor.infer_many``: on a
            CPU, 8 ``vlt-shapes`` images in one call cost 0.47x their time one by one; a predictor that
            cannot batch a plan, e.g. sliding windows, runs those images one by one).
        prefetch: images decoded ahead of the network (``None``: twice ``batch_size``, at least 4).
        decode_workers, write_workers: workers for decoding and for finishing/writing.
        write_processes: run them as forked processes (``None``: where that works, see
            :class:`~langseg.batch.workers.Workers`, and for more than 4 images), else as threads.
    """
    referring = job.task == "referring"
    # Referring sets need the probabilities to share overlapping pixels; labels' scores go to the JSON.
    keep_scores = referring or (write and any("json" in plan for plan in job.outputs))
    # Embeddings (and the expressions' warnings) once for the whole run, before the first image.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if referring:
            predictor.expressions(job.prompts)
        else:
            predictor.label_set(job.prompts)
    for warning in caught if console is not None else ():
        console.print(f"[yellow]warning:[/] {warning.message}", highlight=False)
    if write:
        for folder in {p.parent for plan in job.outputs for p in plan.values()}:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputError(f"cannot create {folder}: {err.strerror or err}") from err

    summary = BatchSummary(total=len(job.images))
    progress, bar = _progress(console, len(job.images))

    def fail(image: Path, reason: str) -> None:
        summary.failed.append((image, reason))
        if progress is not None:
            progress.console.print(f"[red]skipped[/] {image}: {reason}", highlight=False)

    def collect(image: Path, future: Future[Written]) -> None:
        written = future.result()
        if written.error is not None:
            fail(image, written.error)
        else:
            summary.written.append(image)
            summary.files += written.files
            summary.areas[image] = written.rows
        if progress is not None:
            progress.advance(bar)

    start = time.perf_counter()
    # Small runs stay in threads: forking costs more than it saves below a few images.
    processes = write_processes if write_processes is not None else (None if len(job.images) > 4 else False)
    workers = Workers(predictor, decode_workers, write_workers, processes)
    ahead: deque[Future[Decoded]] = deque()
    writing: deque[tuple[Path, Future[Written]]] = deque()
    queue = iter(zip(job.images, job.outputs, strict=True))
    try:
        workers.__enter__()  # first: processes fork before any thread of ours starts
        if progress is not None:
            progress.start()
        batch_size = max(1, int(batch_size))
        for item in islice(queue, prefetch if prefetch is not None else max(4, 2 * batch_size)):
            ahead.append(workers.decode(*item))
        while ahead:
            # The next batch_size images, in order (waiting for their decoding: batches, and so the
            # results to the last bit, do not depend on how fast the workers were).
            batch: list[Decoded] = []
            while ahead and len(batch) < batch_size:
                decoded = ahead.popleft().result()
                for item in islice(queue, 1):
                    ahead.append(workers.decode(*item))
                if decoded.error is not None:
                    fail(decoded.image, decoded.error)
                    if progress is not None:
                        progress.advance(bar)
                else:
                    batch.append(decoded)
            for decoded, pending in _infer(predictor, job, batch, keep_scores, fail):
                if pending is None:
                    if progress is not None:
                        progress.advance(bar)
                    continue
                # Bound the results held in memory; take in what is done without waiting.
                limit = 2 * write_workers + len(batch)
                while writing and (len(writing) > limit or writing[0][1].done()):
                    collect(*writing.popleft())
                image, paths = decoded.image, decoded.paths
                args = (predictor.finish, referring, pending, image, paths, job.model, job.overwrite, write)
                writing.append((image, workers.finish_and_write(*args)))
        while writing:
            collect(*writing.popleft())
    finally:
        # On an interrupt: drop what is queued, let started writes finish (they are atomic anyway).
        workers.close()
        if progress is not None:
            progress.stop()
    summary.seconds = time.perf_counter() - start
    order = {p: i for i, p in enumerate(job.images)}
    summary.written.sort(key=order.__getitem__)
    summary.failed.sort(key=lambda item: order[item[0]])
    return summary


def _infer(
    predictor: Any, job: BatchJob, batch: list[Decoded], keep_scores: bool, fail: Callable[[Path, str], None]
) -> list[tuple[Decoded, Any]]:
    """The network on a batch of decoded images: ``(decoded, pending logits)`` in order, the logits
    ``None`` for an image the network refused (reported through ``fail``). A batch the predictor refuses
    as a whole runs again one image at a time, so that only the image at fault is skipped."""
    prepared = [d.prepared for d in batch]
    try:
        if job.task == "referring":
            pending = predictor.infer_many(prepared, job.prompts, keep_scores=keep_scores)
        else:
            pending = predictor.infer_many(prepared, job.prompts, job.background_threshold, keep_scores)
        return list(zip(batch, pending, strict=True))
    except LangsegError as err:
        if len(batch) == 1:
            fail(batch[0].image, err.message)
            return [(batch[0], None)]
    return [pair for decoded in batch for pair in _infer(predictor, job, [decoded], keep_scores, fail)]


def _progress(console: Any, total: int) -> tuple[Any, Any]:
    """A rich progress bar over the images on ``console`` and its task (both ``None`` without one)."""
    if console is None:
        return None, None
    from rich import progress as rp

    columns = (rp.TextColumn("images"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn())
    bar = rp.Progress(*columns, rp.TimeRemainingColumn(), console=console, transient=True)
    return bar, bar.add_task("images", total=total)
