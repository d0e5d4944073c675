"""`langseg demo` and `langseg serve` from the command line: arguments refused before anything loads,
and both commands started for real as the user starts them, answering on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from langseg.data import ShapeWorldConfig, render_scene
from tests.test_cli import run_cli

TEXTS = ["the large circle on the left", "the red square"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_start(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The servers' start functions replaced by recorders: a test that reaches them has failed to
    refuse its arguments first."""
    import langseg.serve.api
    import langseg.serve.demo

    started: list[str] = []
    monkeypatch.setattr(langseg.serve.api, "run_server", lambda *a, **k: started.append("serve"))
    monkeypatch.setattr(langseg.serve.demo, "run_demo", lambda *a, **k: started.append("demo"))
    return started


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["--model", "no-such-model"], "no-such-model", "langseg models"),
        (["--host", "256.1.2.3"], "cannot listen", "address"),
        (["--port", "0"], "Invalid value", "--port"),
        (["--queue", "0"], "Invalid value", "--queue"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(
    command, args, message, hint, monkeypatch, capsys, no_start
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, command, *args)
    assert code == 2, out + err
    assert message in err and hint in err and "Traceback" not in err
    assert no_start == []


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_port_in_use_is_refused(command, monkeypatch, capsys, no_start) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(monkeypatch, capsys, command, "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err
    assert no_start == []


def test_serve_takes_the_token_from_the_environment(monkeypatch, capsys) -> None:
    import langseg.serve.api

    calls: list[dict] = []
    monkeypatch.setattr(langseg.serve.api, "run_server", lambda *a, **k: calls.append(k))
    monkeypatch.setenv("LANGSEG_TOKEN", "s3cret")
    port = str(free_port())
    assert run_cli(monkeypatch, capsys, "serve", "--port", port, "--model", "vlt-shapes")[0] == 0
    assert calls[0]["token"] == "s3cret" and calls[0]["port"] == int(port)
    assert run_cli(monkeypatch, capsys, "serve", "--port", port, "--token", "flag")[0] == 0
    assert calls[1]["token"] == "flag"  # the option wins over the environment
    monkeypatch.setenv("LANGSEG_TOKEN", "   ")
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--port", port)
    assert code == 2 and "token is empty" in err and len(calls) == 2


def start(args: list[str], port: int, path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``langseg ARGS`` in a new process, once ``http://127.0.0.1:PORT/PATH`` answers 200."""
    process = subprocess.Popen(
        [sys.executable, "-m", "langseg", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"langseg {args[0]} ended: {process.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise AssertionError(f"langseg {args[0]} did not answer within 120 s")


def stop(process: subprocess.Popen) -> str:
    """Ctrl-C, as a user stops it; the output, after checking that it ended by itself."""
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the server did not stop on Ctrl-C") from None
    return output.decode(errors="replace")


def test_serve_answers_with_the_librarys_masks(referrer) -> None:
    image = render_scene(seed=5, index=3, config=ShapeWorldConfig(size=64)).image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    port = free_port()
    server = start(["serve", "--model", "vlt-shapes", "--token", "t0k"], port, "/health")
    try:
        url = f"http://127.0.0.1:{port}/refer"
        body = {"image": base64.b64encode(buffer.getvalue()).decode(), "expressions": TEXTS}
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        answer = httpx.post(url, json=body, headers={"Authorization": "Bearer t0k"}, timeout=60)
    finally:
        output = stop(server)
    assert answer.status_code == 200, answer.text
    expected = referrer.refer_all(image, TEXTS, keep_scores=True)
    got = answer.json()["expressions"]
    assert [e["text"] for e in got] == TEXTS
    for entry, result in zip(got, expected, strict=True):
        mask = coco_mask.decode({**entry["mask"], "counts": entry["mask"]["counts"].encode()})
        assert np.array_equal(mask.astype(bool), result.mask)
        assert entry["score"] == pytest.approx(result.score, abs=1e-6)
    assert f"langseg serve on http://127.0.0.1:{port}" in output


def test_demo_serves_its_page(tmp_path: Path) -> None:
    port = free_port()
    demo = start(["demo", "--model", "lseg-shapes"], port, "/")
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30)
    finally:
        output = stop(demo)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert config.status_code == 200 and "lseg-shapes" in config.text and "Segment" in config.text
    assert f"langseg demo on http://127.0.0.1:{port}" in output
