"""The JSON HTTP API behind ``langseg serve`` (extra ``serve``: FastAPI, uvicorn, python-multipart).

Endpoints (the OpenAPI schema is at ``/openapi.json``, an explorer at ``/docs``):

- ``POST /segment``: ``image`` and ``labels`` (a comma-separated string, a list, or repeated form
  fields); optional ``model``, ``format`` (``rle``, or ``png`` to add base64 ``mask_png`` and
  ``overlay_png``) and ``background_threshold``. Answers ``{"model", "task", "labels", "size",
  "segments": [{"index", "label", "area", "score", "mask": COCO RLE}, ...]}``.
- ``POST /refer``: ``image`` and ``expression`` (a string) or ``expressions`` (a list); optional ``model``
  and ``format``. Answers ``{"model", "task", "texts", "size", "expressions": [{"index", "text", "score",
  "area", "mask"}, ...]}``.
- ``GET /models``: the models offered (name, task, whether default, whether loaded).
- ``GET /health``: ``{"status": "ok", ...}``; the only endpoint open without the token.

``/segment`` and ``/refer`` take multipart/form-data (the image as a file part) or JSON (the image as
base64). Errors are ``{"error", "message", "hint"}``: 400 an unreadable image or malformed body, 401 no or
a wrong bearer token, 413 a body or image over the limits, 415 neither JSON nor a form, 422 a missing or
wrong field, bad labels or expressions, an unknown model or one of the other task, 503 (with
``Retry-After``) a full queue or a request over its time limit. A 500 is a bug.

This module imports no web framework until it is used, so that the CLI can import it and report a
missing extra as a :class:`~langseg.errors.BadConfigError`; the application itself is in
:mod:`langseg.serve.api_app`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from langseg.errors import BadConfigError
from langseg.serve.service import Limits, Models

if TYPE_CHECKING:
    from fastapi import FastAPI

# How run_server hands its settings to uvicorn's worker processes (they import the app by name).
SETTINGS_ENV = "LANGSEG_SERVE_SETTINGS"
SERVE_EXTRA_HINT = 'pip install "langseg[serve]"'


def require_serve_extra() -> None:
    """Raise :class:`~langseg.errors.BadConfigError` unless FastAPI, uvicorn and python-multipart are
    installed (the extra ``serve``)."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    # python-multipart's module was "multipart" before 0.0.13; starlette imports either.
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        raise BadConfigError(
            f"the HTTP API needs {', '.join(missing)}, which is not installed", hint=SERVE_EXTRA_HINT
        )


def check_settings(limits: Limits, token: str | None) -> None:
    """Raise :class:`~langseg.errors.BadConfigError` for limits that are not positive numbers, or a
    token that could never match a request (empty, spaces, control or non-ASCII characters): an empty
    ``LANGSEG_TOKEN`` must not quietly turn the authentication off."""
    if not isinstance(limits, Limits):
        raise BadConfigError(f"limits must be a Limits, got {type(limits).__name__}")
    for item in dataclasses.fields(limits):
        value = getattr(limits, item.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise BadConfigError(f"the limit {item.name} must be a positive number, got {value!r:.40}")
    if token is not None and (not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]+", token)):
        raise BadConfigError(
            "the token must be printable ASCII without spaces",
            hint="Use a random token, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'.",
        )


def torch_threads(workers: int = 1) -> int:
    """Torch threads for each server process: its share of the cores less one, left to the event loop,
    decoding and building answers (with torch's default, every core, its threads spin-wait against them:
    on two cores the server then ran about a fifth slower than with one thread)."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers - 1)


def _set_torch_threads(threads: int | None) -> None:
    """Apply :func:`torch_threads` unless the user chose (``OMP_NUM_THREADS``) or ``threads`` is None."""
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)


def create_app(models: Models, limits: Limits = Limits(), token: str | None = None) -> FastAPI:
    """The FastAPI application of the HTTP API (see the module docstring).

    Args:
        models: the models offered; each task's default is loaded at startup, the others on first use.
        limits: what one request may ask for (body size, pixels, labels, time, queue places).
        token: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.

    Raises:
        BadConfigError: the extra ``serve`` is missing, or a limit or the token is invalid.
    """
    require_serve_extra()
    check_settings(limits, token)
    if not isinstance(models, Models):
        raise BadConfigError(f"models must be a Models, got {type(models).__name__}")
    from langseg.serve.api_app import build_app

    return build_app(models, limits, token)


def run_server(
    models: list[str] | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    token: str | None = None,
    limits: Limits = Limits(),
    device: str = "auto",
) -> None:
    """Serve the HTTP API with uvicorn until interrupted.

    Args:
        models: the model names (or checkpoint folders) to offer; ``None``: every model whose weights are
            on this machine.
        host, port: where to listen (``127.0.0.1``: this machine only).
        workers: server processes; each loads its own models and has its own inference queue.
        token: the bearer token requests need (``None``: none).
        limits: per-request limits; ``device``: where the models run.

    Each process runs torch with :func:`torch_threads` threads, unless ``OMP_NUM_THREADS`` is set.

    Raises:
        BadConfigError: the extra is missing, or ``workers``, a limit or the token is invalid.
        UnknownModelError: a model name is not registered (checked before the port is bound).
    """
    require_serve_extra()
    import uvicorn

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BadConfigError(f"workers must be a positive integer, got {workers!r:.40}")
    check_settings(limits, token)
    offered = Models(models, device=device)  # unknown names fail here, in the parent, loading nothing
    if workers == 1:
        _set_torch_threads(torch_threads())
        uvicorn.run(create_app(offered, limits, token), host=host, port=port)
        return
    # Several processes import the app by name and build it themselves, from these settings.
    settings = {
        "models": list(offered.names or []),
        "device": device,
        "token": token,
        "limits": dataclasses.asdict(limits),
        "threads": torch_threads(workers),
    }
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    try:
        uvicorn.run(f"{__name__}:app_from_environment", factory=True, host=host, port=port, workers=workers)
    finally:
        os.environ.pop(SETTINGS_ENV, None)


def app_from_environment() -> FastAPI:
    """The application of one uvicorn worker process, built from the settings :func:`run_server` put in
    the environment variable ``LANGSEG_SERVE_SETTINGS``."""
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        raise BadConfigError(
            f"the environment variable {SETTINGS_ENV} is not set",
            hint="Start the server with `langseg serve` or langseg.serve.api.run_server().",
        )
    settings = json.loads(text)
    _set_torch_threads(settings.get("threads"))
    models: Sequence[str] = settings["models"]
    return create_app(
        Models(list(models), device=settings["device"]), Limits(**settings["limits"]), settings["token"]
    )
