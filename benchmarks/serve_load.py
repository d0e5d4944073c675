"""Load test of the HTTP API (``langseg serve``) on loopback, against the library in a loop.

    python benchmarks/serve_load.py [--clients 8] [--requests 400] [--size 128] [--timeout-s 600]
                                    [--warmup 16] [--server-threads N]

Starts the API in a subprocess (``langseg.serve.api.run_server(["lseg-shapes"], port=P)``, what
``langseg serve --model lseg-shapes`` runs), waits for ``/health``, sends ``--warmup`` requests, then has
``--clients`` threads (one httpx client each) send ``--requests`` requests in all to ``/segment``:
ShapeWorld PNGs of ``--size`` pixels (backgrounds cycling plain / noise / texture) as multipart uploads,
with the labels "red circle, blue square, green triangle, yellow star, background". Every answer must be
a 200 whose segments cover the image.

Then, in this process and with the server stopped, the same images through ``Segmenter.segment()`` in a
loop: the rate a program gets from the library, which the server is compared with (the issue asks for
at least 0.8 of it), and, to see where a gap comes from, the same loop doing what the server does per
request besides the network (decoding the PNG, keeping the scores, building the JSON) and the loop with
the server's torch threads (``run_server`` leaves a core to the event loop, decoding and answers: one
thread on two cores; ``--server-threads`` sets another count through ``OMP_NUM_THREADS``).

Prints one table: throughput, latency percentiles, errors by status, the server's resident memory after
the warm-up and at the end (the issue asks for under 10 % growth), the loop rates and the ratios, the CPU
seconds per image of the server, of the client threads and of the loop, and the load average (other
work on the machine slows both sides). Everything is bounded: ``--requests`` in all and ``--timeout-s``
for the whole load phase.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from langseg.serve.api import torch_threads

LABELS = "red circle, blue square, green triangle, yellow star, background"
BACKGROUNDS = ("plain", "noise", "texture")
NUM_IMAGES = 24  # distinct images, cycled: the predictor's per-image cache must not make it easy


def render_images(size: int) -> tuple[list[np.ndarray], list[bytes]]:
    """ShapeWorld scenes (seed 123: no training world) as arrays and as PNG files."""
    from langseg.data import ShapeWorldConfig, render_scene

    arrays, files = [], []
    for i in range(NUM_IMAGES):
        config = ShapeWorldConfig(size=size, background=BACKGROUNDS[i % 3])  # type: ignore[arg-type]
        arrays.append(render_scene(seed=123, index=i, config=config).image)
        buffer = io.BytesIO()
        Image.fromarray(arrays[-1]).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return arrays, files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, threads: int | None) -> subprocess.Popen[bytes]:
    """The API in its own process, as ``langseg serve --model lseg-shapes --port P`` starts it (with
    ``threads``, through ``OMP_NUM_THREADS``, instead of the server's own choice of torch threads)."""
    code = f"from langseg.serve.api import run_server; run_server(['lseg-shapes'], port={port})"
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    root = Path(__file__).resolve().parents[1]
    # The access log (a line per request) is not wanted among the results.
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def wait_ready(base: str, server: subprocess.Popen[bytes], timeout_s: float = 180) -> float:
    """Seconds until ``/health`` says the default model is loaded."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{server.stderr.read().decode() if server.stderr else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=2).json().get("ready"):
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the server was not ready within {timeout_s:g} s")


def rss_mib(pid: int) -> float:
    """Resident memory of a process (``VmRSS`` in /proc/<pid>/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_answer(response: httpx.Response, size: int) -> str:
    """``"200"`` for a 200 whose segments cover the image exactly once, else what went wrong."""
    if response.status_code != 200:
        return str(response.status_code)
    answer = response.json()
    covered = sum(round(s["area"] * size * size) for s in answer["segments"])
    return "200" if answer["size"] == [size, size] and covered == size * size else "200, wrong answer"


def load(base: str, files: list[bytes], size: int, clients: int, total: int, deadline: float) -> dict:
    """``total`` requests from ``clients`` threads; latencies (s) and outcomes."""
    latencies: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as session:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                image = files[index % len(files)]
                started = time.perf_counter()
                try:
                    response = session.post(
                        "/segment",
                        files={"image": ("scene.png", image, "image/png")},
                        data={"labels": LABELS},
                    )
                    outcome = check_answer(response, size)
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "wall": time.perf_counter() - started,
        "client_cpu": time.process_time() - cpu_started,  # this process: the client threads
        "latencies": latencies,
        "outcomes": outcomes,
    }


class Loop:
    """``segment()`` in a loop in this process, with torch's default threads (what a program gets from
    the library): ``rate`` on arrays, ``full`` doing the server's per-request work besides the network
    (decoding the PNG, keeping the scores, building and serialising the JSON), ``same_threads`` on arrays
    with the server's torch threads."""

    def __init__(self, arrays: list[np.ndarray], files: list[bytes], server_threads: int) -> None:
        import langseg

        self.arrays, self.files, self.server_threads = arrays, files, server_threads
        self.segmenter = langseg.load("lseg-shapes")
        self.labels = [label.strip() for label in LABELS.split(",")]
        self.count = 0
        for image in arrays[:4]:  # warm-up, as the server had
            self.segmenter.segment(image, self.labels)

    def _timed(self, num: int, step: Callable[[int], object]) -> tuple[float, float]:
        """(images per second, CPU seconds per image)."""
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(num):
            step(self.count)
            self.count += 1
        return num / (time.perf_counter() - started), (time.process_time() - cpu_started) / num

    def plain(self, i: int) -> None:
        self.segmenter.segment(self.arrays[i % len(self.arrays)], self.labels)

    def full(self, i: int) -> None:
        from langseg.serve.service import Limits, decode_image, segment_answer

        image = decode_image(self.files[i % len(self.files)], Limits())
        result = self.segmenter.segment(image, self.labels, keep_scores=True)
        json.dumps(segment_answer(result, "lseg-shapes"))

    def round(self, num: int) -> dict[str, float]:
        rates = {}
        rates["plain"], rates["cpu"] = self._timed(num, self.plain)
        rates["full"], _ = self._timed(num, self.full)
        default_threads = torch.get_num_threads()
        torch.set_num_threads(self.server_threads)
        try:
            rates["same_threads"], _ = self._timed(num, self.plain)
        finally:
            torch.set_num_threads(default_threads)
        return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=400, help="requests in all (after the warm-up)")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--timeout-s", type=float, default=600, help="bound on the load phase")
    parser.add_argument("--warmup", type=int, default=16, help="requests before memory is first read")
    parser.add_argument("--rounds", type=int, default=4, help="server and loop phases, interleaved")
    parser.add_argument(
        "--server-threads", type=int, default=None, help="torch threads in the server (default: its own)"
    )
    args = parser.parse_args()
    console = Console()
    load_before = os.getloadavg()

    arrays, files = render_images(args.size)
    server_threads = args.server_threads or torch_threads()
    loop = Loop(arrays, files, server_threads)  # loaded before the server starts: no overlap
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, args.server_threads)
    rounds: list[dict] = []
    try:
        ready_s = wait_ready(base, server)
        deadline = time.monotonic() + args.timeout_s
        warm = load(base, files, args.size, args.clients, args.warmup, deadline)
        rss_warm, server_cpu = rss_mib(server.pid), cpu_s(server.pid)
        # Server and loop take turns, so that other work on the machine slows both alike.
        for k in range(args.rounds):
            share = args.requests // args.rounds + (k < args.requests % args.rounds)
            rounds.append(load(base, files, args.size, args.clients, share, deadline))
            rounds[-1]["loop"] = loop.round(max(8, share // 3))
        rss_end, server_cpu = rss_mib(server.pid), cpu_s(server.pid) - server_cpu
    finally:
        server.terminate()
        server.wait(30)
    load_after = os.getloadavg()

    latencies = [t for r in rounds for t in r["latencies"]]
    done = len(latencies)
    wall = sum(r["wall"] for r in rounds)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000 if done else (float("nan"),) * 3
    outcomes = sum((r["outcomes"] for r in rounds), warm["outcomes"])
    errors = {k: v for k, v in outcomes.items() if k != "200"}
    growth = 100 * (rss_end - rss_warm) / rss_warm
    server_rates = [len(r["latencies"]) / r["wall"] for r in rounds]

    def loop_median(key: str) -> float:
        return statistics.median(r["loop"][key] for r in rounds)

    def ratio(key: str) -> str:
        """The median over the rounds of server rate / loop rate (each round's pair ran back to back)."""
        return (
            f"{statistics.median(s / r['loop'][key] for s, r in zip(server_rates, rounds, strict=True)):.2f}"
        )

    table = Table(title=f"langseg serve: {args.clients} clients, {done} requests, {args.size} px, loopback")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("server ready after", f"{ready_s:.1f} s", "")
    table.add_row(
        "server throughput (all / median round)",
        f"{done / wall:.1f} / {statistics.median(server_rates):.1f} req/s",
        "",
    )
    table.add_row("latency p50 / p95 / p99", f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms", "")
    table.add_row("errors by status", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0", "0")
    table.add_row("server RSS after warm-up / end", f"{rss_warm:.0f} / {rss_end:.0f} MiB", "")
    table.add_row("server RSS growth", f"{growth:+.1f} %", "< 10 %")
    table.add_row(
        f"segment() loop, one process ({torch.get_num_threads()} threads)",
        f"{loop_median('plain'):.1f} img/s",
        "",
    )
    table.add_row("ratio server / loop", ratio("plain"), ">= 0.8")
    table.add_row("loop + decode, scores, JSON", f"{loop_median('full'):.1f} img/s", "")
    table.add_row("ratio server / loop + server work", ratio("full"), "")
    table.add_row(
        f"loop with the server's {server_threads} torch thread(s)",
        f"{loop_median('same_threads'):.1f} img/s",
        "",
    )
    table.add_row("ratio server / loop, same threads", ratio("same_threads"), "")
    cpu_ms = [
        1000 * server_cpu / done,
        1000 * sum(r["client_cpu"] for r in rounds) / done,
        1000 * loop_median("cpu"),
    ]
    table.add_row(
        "CPU per image: server / clients / loop", " / ".join(f"{ms:.0f}" for ms in cpu_ms) + " ms", ""
    )
    console.print(table)
    console.print(
        f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} cores; "
        f"torch threads: server {server_threads}, loop {torch.get_num_threads()}; {args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
