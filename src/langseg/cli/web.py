"""``langseg demo`` and ``langseg serve``: the web demo and the HTTP API, started from the command line.

Both check their arguments (models known and of a usable kind, port free to bind, limits positive)
before anything loads, and import gradio / fastapi only when they start (extras ``demo`` / ``serve``).
"""

from __future__ import annotations

import os
import socket

import typer

from langseg.cli import app, console
from langseg.errors import BadConfigError

TOKEN_ENV = "LANGSEG_TOKEN"
MODEL_HELP = "A model to offer (repeat for more); default: every model whose weights are on this machine."
HOST_HELP = "Address to listen on; 127.0.0.1 (this machine only) unless you mean to expose it."


def _check_models(names: list[str] | None) -> list[str] | None:
    """The model names, each known (a registry name or a model folder); ``None`` stays ``None``."""
    if not names:
        return None
    from langseg.api import model_entry

    for name in names:
        model_entry(name)  # UnknownModelError with the close names as a hint
    return list(dict.fromkeys(names))


def _check_address(host: str, port: int) -> None:
    """Refuse, before any model loads, an address that cannot be bound (in use, not ours, bad name)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        hint = "Use an address of this machine."
        raise BadConfigError(f"cannot listen on {host!r}: {err}", hint=hint) from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise BadConfigError(
                f"cannot listen on {host}:{port}: {err.strerror or err}",
                hint="Choose another --port, or stop what is using this one.",
            ) from err


def _limits(max_pixels: int, max_body_mb: float, timeout: float, queue: int) -> object:
    from langseg.serve.service import Limits

    return Limits(
        max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels, timeout_s=timeout, queue_size=queue
    )


@app.command()
def demo(
    model: list[str] | None = typer.Option(None, "--model", help=MODEL_HELP, show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to listen on."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, ..."),
    max_pixels: int = typer.Option(16_000_000, "--max-pixels", min=1, help="Largest image (width x height)."),
    queue: int = typer.Option(8, "--queue", min=1, help="Requests waiting at once; more are turned away."),
) -> None:
    """Start the web demo (Gradio): segment with labels or refer with a sentence, in a browser."""
    from langseg.serve.demo import require_demo_extra, run_demo

    require_demo_extra()
    names = _check_models(model)
    _check_address(host, port)
    console.print(f"langseg demo on http://{host}:{port} (Ctrl-C to stop)", highlight=False)
    run_demo(names, host=host, port=port, device=device, limits=_limits(max_pixels, 16, 60, queue))


@app.command()
def serve(
    model: list[str] | None = typer.Option(None, "--model", help=MODEL_HELP, show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help=HOST_HELP),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64, help="Server processes (each loads the models once)."
    ),
    token: str | None = typer.Option(
        None, "--token", help=f"Bearer token every request but /health must carry (or set {TOKEN_ENV})."
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, ..."),
    max_pixels: int = typer.Option(16_000_000, "--max-pixels", min=1, help="Largest image (width x height)."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Largest request body, in MiB."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.1, help="Seconds a request may wait and run."),
    queue: int = typer.Option(8, "--queue", min=1, help="Requests waiting or running at once, per worker."),
) -> None:
    """Start the JSON HTTP API (FastAPI): POST /segment and /refer, GET /models and /health."""
    from langseg.serve.api import require_serve_extra, run_server

    require_serve_extra()
    names = _check_models(model)
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and not token.strip():
        raise BadConfigError("the token is empty", hint=f"Pass a non-empty --token, or unset {TOKEN_ENV}.")
    _check_address(host, port)
    auth = "a bearer token" if token else "no token"
    console.print(f"langseg serve on http://{host}:{port}, {workers} worker(s), {auth}", highlight=False)
    limits = _limits(max_pixels, max_body_mb, timeout, queue)
    run_server(names, host=host, port=port, workers=workers, token=token, limits=limits, device=device)
