"""The batch's workers: forked processes give the same files as threads, in order, and a worker that
dies or fails is an error in the parent, never a hang."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import langseg
from langseg.batch import check_job, run_batch
from langseg.batch.workers import Workers, can_fork
from langseg.data import ShapeWorldConfig, render_scene

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not can_fork(), reason="worker processes are forked on Linux only"),
]
TEXTS = ["the large circle on the left", "the red square"]


def write_scenes(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        config = ShapeWorldConfig(size=48 + 8 * (i % 3), background=("plain", "noise", "texture")[i % 3])
        Image.fromarray(render_scene(seed=21, index=i, config=config).image).save(folder / f"{i}.png")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_processes_write_what_threads_write(tmp_path: Path, referrer) -> None:
    write_scenes(tmp_path / "in", 9)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    outputs, summaries = {}, {}
    for processes in (True, False):
        out = tmp_path / f"out-{processes}"
        job = check_job("referring", [tmp_path / "in"], TEXTS, model="vlt-shapes", out_dir=out, device="cpu")
        summaries[processes] = run_batch(referrer, job, write_processes=processes, prefetch=3)
        outputs[processes] = files_of(out)
    fast, slow = summaries[True], summaries[False]
    assert len(outputs[True]) == 27 and outputs[True] == outputs[False]  # byte for byte
    assert fast.written == slow.written and [p.name for p in fast.written] == [f"{i}.png" for i in range(9)]
    assert fast.areas == slow.areas and [p.name for p in fast.files] == [p.name for p in slow.files]
    assert [p.name for p, _ in fast.failed] == ["broken.png"] and fast.failed == slow.failed


def test_results_come_back_in_order(tmp_path: Path, referrer) -> None:
    write_scenes(tmp_path / "in", 6)
    images = sorted((tmp_path / "in").iterdir())
    with Workers(referrer, 2, 1, processes=True) as workers:
        assert workers.processes
        handles = [workers.decode(image, {}) for image in images]  # all sent before any is read
        decoded = [handle.result() for handle in handles]
    for image, item in zip(images, decoded, strict=True):
        direct = referrer.prepare(image)
        assert item.image == image and item.error is None
        assert np.array_equal(item.prepared.image, direct.image)
        assert np.array_equal(item.prepared.input.numpy(), direct.input.numpy())


class Dies:
    """A predictor whose decoding kills or breaks the worker process."""

    device = None

    def __init__(self, how: str) -> None:
        self.how = how

    def prepare(self, image: Path) -> None:
        if self.how == "exit":
            os._exit(3)
        raise KeyboardInterrupt  # not an Exception: decode() does not catch it, the worker fails


@pytest.mark.parametrize(("how", "message"), [("exit", r"died \(exit code 3\)"), ("interrupt", "died")])
def test_a_dead_worker_is_an_error_not_a_hang(how: str, message: str, tmp_path: Path) -> None:
    with Workers(Dies(how), 1, 1, processes=True) as workers:
        handle = workers.decode(tmp_path / "x.png", {})
        with pytest.raises(RuntimeError, match=message):
            handle.result()


def test_gpu_predictors_keep_threads(referrer) -> None:
    class OnGpu:
        device = type("Device", (), {"type": "cuda"})()

    assert Workers(referrer, 1, 1).processes and not Workers(OnGpu(), 1, 1).processes


def test_a_bug_while_writing_is_raised_with_its_traceback(tmp_path: Path) -> None:
    write_scenes(tmp_path / "in", 6)
    referrer = langseg.load("vlt-shapes")
    job = check_job(
        "referring", [tmp_path / "in"], TEXTS, model="vlt-shapes", out_dir=tmp_path / "o", device="cpu"
    )
    infer_many = referrer.infer_many

    def broken(*args, **kwargs):
        pending = infer_many(*args, **kwargs)
        for one in pending:
            one.texts = None  # finish() zips texts with masks: a TypeError in the worker
        return pending

    referrer.infer_many = broken
    with pytest.raises(RuntimeError, match="TypeError"):
        run_batch(referrer, job, write_processes=True)


def test_stopping_serves_queued_writes_and_skips_queued_decoding(tmp_path: Path) -> None:
    """An interrupted batch ends its worker: the writes sent still happen, the decoding queued does not."""
    from langseg.batch.workers import _ForkedWorker

    def serve(payload: bytes) -> bytes:
        if payload == b"d-first":
            time.sleep(0.5)  # everything below is queued behind it when stop() begins
        (tmp_path / payload.decode()).touch()
        return payload

    worker = _ForkedWorker(serve, droppable=b"d")
    first = worker.submit(b"d-first")
    for name in (b"w-1", b"d-2", b"w-3", b"d-4"):
        worker.submit(name)
    time.sleep(0.1)
    worker.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-first", "w-1", "w-3"]
    assert not worker._process.is_alive() and first.index == 0


@pytest.mark.skipif(not can_fork(), reason="worker processes need fork (Linux)")
def test_many_large_requests_and_answers_never_deadlock() -> None:
    """Requests sent without reading answers, both larger than the pipes hold: the parent must read
    answers before its sends could block (else parent and worker each wait on a full pipe for good)."""
    import threading

    from langseg.batch.workers import _ForkedWorker

    def serve(payload: bytes) -> bytes:
        return payload * 3  # answers larger than requests

    worker = _ForkedWorker(serve)
    payloads = [bytes([i]) * 300_000 for i in range(24)]  # 7.2 MB of requests, 21.6 MB of answers
    answers: list[bytes] = []

    def run() -> None:
        handles = [worker.submit(p) for p in payloads]  # nothing read on purpose
        answers.extend(h.result() for h in handles)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    try:
        assert not thread.is_alive(), "deadlock: parent and worker both blocked on full pipes"
        assert answers == [p * 3 for p in payloads]
    finally:
        if not thread.is_alive():
            worker.stop()
