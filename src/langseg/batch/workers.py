"""What runs beside the network in a batch: decoding the images, and mapping each result to its image
and writing its outputs, in worker processes or threads.

Why processes: the network's thread spends much of its time in short torch calls that each need the
GIL to start, and the work around it (PIL decoding, letterboxing, drawing, PNG and JSON encoding) is
mostly Python holding the GIL. Measured on 2 cores with `vlt-shapes` (16 ms of network per 128 px
image), a thread running Python 1 ms in every 7 slowed the network by 20 %; GIL-free work (zlib) by 2 %.
Worker processes each have their own GIL. They are forked (Linux only), so they start in milliseconds and
inherit the loaded predictor, as a DataLoader's workers do; elsewhere threads do the same work.

Why one process for both jobs, not one each: with two, both were often runnable at once on a 2-core
machine, and the kernel woke one of them on the network's core, in place of the network (the parent's
200-byte write of a request took 2-3 ms of wall time for 0.03 ms of CPU). One process whose work per
image (5-7 ms for `vlt-shapes`) is well under the network's keeps to the spare core: measured in one
run, 0.83x of the bare network's images/s against 0.74x with two processes.

What crosses between processes is one pickle per image each way: the image's prepared input, then its
pending logits (:func:`finish_and_write`'s arguments, with ``finish`` by reference), tensors as numpy
arrays; what comes back last is a small :class:`Written`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import pickle
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from langseg.batch.outputs import write_atomic
from langseg.errors import LangsegError

Row = tuple[str, float, "float | None"]


@dataclass
class Written:
    """What writing one image did: the ``files`` written, the ``rows`` of the summary (name, share of
    the image, score) and, when it failed, why (``error``; nothing is written then)."""

    files: list[Path] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    error: str | None = None


def write_outputs(
    result: Any, image: Path, paths: dict[str, Path], model: str, overwrite: bool = False
) -> list[Path]:
    """Write the outputs of one image's result (``SegmentationResult`` or ``ReferringSet``)."""
    writers: dict[str, Callable[[Path], None]] = {
        # Level 1 compresses these masks as well as 9 does, and the overlays within a few percent, at a
        # fraction of the time (the writer's time is what keeps up with the network).
        "overlay": lambda tmp: result.overlay().save(tmp, format="PNG", compress_level=1),
        "mask": lambda tmp: result.mask_image().save(tmp, format="PNG", compress_level=1),
        "json": lambda tmp: tmp.write_text(_json_text(_record(result, image, model))),
    }
    written = []
    for kind, path in paths.items():
        write_atomic(path, writers[kind], overwrite)
        written.append(path)
    return written


def finish_and_write(
    finish: Callable[[Any], Any],
    referring: bool,
    pending: Any,
    image: Path,
    paths: dict[str, Path],
    model: str,
    overwrite: bool,
    write: bool,
) -> Written:
    """``finish(pending)`` (the predictor's static ``finish``) and, with ``write``, its outputs.

    A problem the user can cause (a full disk, a folder that became read-only) is this image's failure,
    returned in :attr:`Written.error`; anything else is a bug and raises."""
    from langseg.predict.results import ReferringSet

    try:
        result = finish(pending)
        result = ReferringSet(result) if referring else result
        if not write:
            return Written()
        return Written(write_outputs(result, image, paths, model, overwrite), summary_rows(result))
    except (LangsegError, OSError) as err:
        return Written(error=getattr(err, "message", None) or f"cannot write: {err.strerror or err}")


def summary_rows(result: Any) -> list[Row]:
    """(name, share of the image, score) per label that covers pixels / per expression."""
    if hasattr(result, "texts"):
        return [(r.text, float(r.mask.mean()), r.score) for r in result.results]
    scores = result.label_scores()
    return [(label, share, scores.get(label)) for label, share in result.areas().items()]


def _json_text(record: dict[str, Any]) -> str:
    """``record`` as JSON; a NaN or infinite number (e.g. the score of a model with broken weights) is
    written as ``null``, never as a bare ``NaN`` token, which is not JSON."""
    try:
        return json.dumps(record, indent=1, allow_nan=False)
    except ValueError:  # rare: only then pay for walking the record
        from langseg.evaluate import json_safe

        return json.dumps(json_safe(record), indent=1, allow_nan=False)


def _record(result: Any, image: Path, model: str) -> dict[str, Any]:
    task = "referring" if hasattr(result, "texts") else "semantic"
    return {"image": str(image), "model": model, "task": task, **result.to_dict()}


# ---------------------------------------------------------------------------------------- pools


def decode(predictor: Any, image: Path, paths: dict[str, Path]) -> Decoded:
    """``predictor.prepare(image)``, never raising: one bad file must not stop the run."""
    try:
        return Decoded(image, paths, predictor.prepare(image))
    except LangsegError as err:
        return Decoded(image, paths, error=err.message)
    except Exception as err:  # e.g. PIL's DecompressionBombError: still this file's problem only
        return Decoded(image, paths, error=f"cannot read it ({type(err).__name__}: {err})")


@dataclass
class Decoded:
    """One input image: its output ``paths`` and either the ``prepared`` input or why it failed."""

    image: Path
    paths: dict[str, Path]
    prepared: Any = None
    error: str | None = None


def can_fork() -> bool:
    """Whether worker processes can be forked here: Linux only (macOS frameworks are not fork-safe)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class Workers:
    """What runs beside the network: decoding images (:func:`decode`) and finishing and writing results
    (:func:`finish_and_write`), in one forked process or in thread pools; a context manager.

    A process is used where ``processes`` allows it (``None``: wherever :func:`can_fork`) and the
    predictor runs on the CPU: a forked child cannot use the parent's CUDA or MPS context, and it would
    have to for the prepared input. It serves both kinds of request in the order sent, over pipes, so
    that this process runs no helper thread at all (a thread pool's bookkeeping threads would take the
    GIL from the network at every hand-over). With threads, ``decode_workers`` and ``write_workers``
    threads.

    Results must be asked for (``result()``) in the order they were submitted, per kind.
    """

    def __init__(
        self, predictor: Any, decode_workers: int, write_workers: int, processes: bool | None = None
    ) -> None:
        on_cpu = getattr(getattr(predictor, "device", None), "type", "cpu") == "cpu"
        self.processes = (can_fork() if processes is None else processes and can_fork()) and on_cpu
        self.predictor = predictor
        self.decode_workers, self.write_workers = decode_workers, write_workers
        self._decoder: Any = None
        self._writer: Any = None
        self._worker: _ForkedWorker | None = None

    def __enter__(self) -> Workers:
        if self.processes:
            predictor = self.predictor

            def serve(payload: bytes) -> bytes:
                kind, body = payload[:1], payload[1:]
                return _decode_packed(predictor, body) if kind == _DECODE else _finish_and_write_packed(body)

            self._worker = _ForkedWorker(serve, droppable=_DECODE)
        else:
            self._decoder = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="langseg-decode")
            self._writer = ThreadPoolExecutor(self.write_workers, thread_name_prefix="langseg-write")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the writes under way or queued (each is atomic: results computed are written),
        drop the decoding not started."""
        if isinstance(self._decoder, ThreadPoolExecutor):
            self._decoder.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)
        elif self._worker is not None:
            self._worker.stop()
        self._decoder = self._writer = self._worker = None

    def decode(self, image: Path, paths: dict[str, Path]) -> Future[Decoded]:
        """:func:`decode` of ``image`` with the predictor."""
        if self._worker is None:
            assert self._decoder is not None, "use Workers as a context manager"
            return self._decoder.submit(decode, self.predictor, image, paths)
        handle = self._worker.submit(_DECODE + pickle.dumps((image, paths), pickle.HIGHEST_PROTOCOL))
        return _Unpacked(handle, _unpack_decoded)  # type: ignore[return-value]

    def finish_and_write(self, *args: Any) -> Future[Written]:
        """:func:`finish_and_write` with ``args`` (its arguments in order)."""
        if self._worker is None:
            assert self._writer is not None, "use Workers as a context manager"
            return self._writer.submit(finish_and_write, *args)
        finish, referring, pending, *rest = args
        payload = pickle.dumps((finish, referring, _as_arrays(pending), *rest), pickle.HIGHEST_PROTOCOL)
        return _Unpacked(self._worker.submit(_WRITE + payload), pickle.loads)  # type: ignore[return-value]


_DECODE, _WRITE = b"d", b"w"  # the first byte of a request to the worker process: which job it is


# ------------------------------------------------------------------------------- forked workers
# What crosses between processes is bytes: pickles of dataclasses whose tensors travel as numpy arrays
# (no shared-memory tensors, whose set-up costs more than copying these small arrays).


class _ForkedWorker:
    """A forked process applying ``serve`` (bytes -> bytes) to each request in order, over two pipes.

    Requests starting with the byte ``droppable`` are skipped once :meth:`stop` is under way."""

    def __init__(self, serve: Callable[[bytes], bytes], droppable: bytes = b"") -> None:
        context = multiprocessing.get_context("fork")
        self._stopping = context.Event()
        requests, self._requests = context.Pipe(duplex=False)
        self._results, results = context.Pipe(duplex=False)
        for connection in (requests, results):
            _widen(connection.fileno())
        # The child inherits ``serve`` and what it closes over (the predictor): nothing is pickled.
        self._process = context.Process(
            target=_serve, args=(serve, requests, results, self._stopping, droppable), daemon=True
        )
        self._process.start()
        requests.close()  # the child's ends: closing ours lets each side see the other one go
        results.close()
        self._sent = self._done = 0  # requests sent, results received
        self._received: dict[int, bytes] = {}  # results not yet asked for, by request number
        self._capacity = _pipe_size(self._requests.fileno())
        self._unanswered: deque[int] = deque()  # bytes of each request sent and not yet answered

    def submit(self, payload: bytes) -> _Handle:
        # Never block on a full request pipe: the child may be blocked on a full result pipe that only
        # we can empty (a deadlock: seen with batches of large lseg-shapes results). Requests not yet
        # answered may still sit in the pipe, so before their bytes could overflow it, read results.
        size = len(payload) + 16  # the length header, generously
        while self._unanswered and sum(self._unanswered) + size > self._capacity:
            self._receive()
        self._requests.send_bytes(payload)
        self._unanswered.append(size)
        self._sent += 1
        return _Handle(self, self._sent - 1)

    def _receive(self) -> None:
        try:
            ok, value = pickle.loads(self._results.recv_bytes())
        except EOFError:
            self._process.join(timeout=10)
            code = self._process.exitcode
            raise RuntimeError(f"a batch worker process died (exit code {code})") from None
        if not ok:
            raise RuntimeError(f"a batch worker process failed:\n{value}")
        self._received[self._done] = value
        self._done += 1
        self._unanswered.popleft()

    def stop(self) -> None:
        """End the process once it has served the requests sent, the droppable ones skipped."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._requests.send_bytes(b"")
        # Read (and drop) its answers meanwhile: unread, they could fill the pipe and block it for good.
        with contextlib.suppress(OSError, EOFError):
            while self._process.is_alive():
                if self._results.poll(0.05):
                    self._results.recv_bytes()
        self._process.join()
        self._requests.close()
        self._results.close()


class _Handle:
    """The ``index``-th result of a :class:`_ForkedWorker`."""

    def __init__(self, worker: _ForkedWorker, index: int) -> None:
        self.worker, self.index = worker, index

    def done(self) -> bool:
        worker = self.worker
        while self.index not in worker._received and worker._results.poll():
            worker._receive()
        return self.index in worker._received

    def result(self) -> bytes:
        worker = self.worker
        while self.index not in worker._received:
            worker._receive()
        return worker._received.pop(self.index)


class _Unpacked:
    """A :class:`_Handle` whose bytes are unpacked by ``unpack`` (in the thread asking: the network's,
    so that no other thread of this process takes the GIL for it)."""

    def __init__(self, handle: _Handle, unpack: Callable[[bytes], Any]) -> None:
        self.handle, self.unpack = handle, unpack

    def done(self) -> bool:
        return self.handle.done()

    def result(self) -> Any:
        return self.unpack(self.handle.result())


def _pipe_size(fd: int) -> int:
    """The capacity of pipe ``fd`` in bytes (Linux; 64 KiB, the usual default, where it cannot say)."""
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return 1 << 16


def _widen(fd: int, size: int = 1 << 20) -> None:
    """Grow a pipe to ``size`` bytes where Linux allows it, so that a few images' worth of requests
    never block the network's thread (64 KiB by default)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)  # type: ignore[attr-defined]


def _serve(
    serve: Callable[[bytes], bytes], requests: Any, results: Any, stopping: Any, droppable: bytes
) -> None:
    # An interrupt (Ctrl-C reaches the whole process group) is the parent's to handle: it lets the
    # writes queued finish and drops the rest. One torch thread: the parent's network has the others.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            payload = requests.recv_bytes()
        except EOFError:  # the parent is gone
            return
        if not payload:
            return
        if droppable and payload[:1] == droppable and stopping.is_set():
            results.send_bytes(pickle.dumps((True, b""), pickle.HIGHEST_PROTOCOL))
            continue
        try:
            answer = (True, serve(payload))
        except Exception:  # a bug: reported to the parent, which raises it
            answer = (False, traceback.format_exc())
        results.send_bytes(pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))


def _decode_packed(predictor: Any, payload: bytes) -> bytes:
    decoded = decode(predictor, *pickle.loads(payload))
    if decoded.prepared is not None:
        decoded.prepared = _as_arrays(decoded.prepared)
    return pickle.dumps(decoded, pickle.HIGHEST_PROTOCOL)


def _unpack_decoded(data: bytes) -> Decoded:
    decoded = pickle.loads(data)
    if decoded.prepared is not None:
        decoded.prepared = _as_tensors(decoded.prepared)
    return decoded


def _finish_and_write_packed(payload: bytes) -> bytes:
    finish, referring, pending, *rest = pickle.loads(payload)
    written = finish_and_write(finish, referring, _as_tensors(pending), *rest)
    return pickle.dumps(written, pickle.HIGHEST_PROTOCOL)


@dataclass
class _Array:
    """A tensor in transit, as a numpy array."""

    array: np.ndarray
    dtype: torch.dtype


def _as_arrays(item: Any) -> Any:
    """Dataclass ``item`` with its tensors as CPU numpy arrays (bfloat16 carried as float32)."""
    arrays = {
        f.name: _Array(value.detach().cpu().to(_NUMPY.get(value.dtype, value.dtype)).numpy(), value.dtype)
        for f in dataclasses.fields(item)
        if isinstance(value := getattr(item, f.name), torch.Tensor)
    }
    return dataclasses.replace(item, **arrays)


def _as_tensors(item: Any) -> Any:
    tensors = {
        f.name: torch.from_numpy(value.array).to(value.dtype)
        for f in dataclasses.fields(item)
        if isinstance(value := getattr(item, f.name), _Array)
    }
    return dataclasses.replace(item, **tensors)


_NUMPY = {torch.bfloat16: torch.float32}  # dtypes numpy lacks, and how they travel
