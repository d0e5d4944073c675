"""The FastAPI application of :mod:`langseg.serve.api` (import it through
:func:`langseg.serve.api.create_app`, which first checks that the extra ``serve`` is installed).

Routes read their bodies themselves (:mod:`langseg.serve.api_requests`), so one route takes both JSON
and multipart/form-data. A request then goes through three stages, so that the network, the one part
that must run on a single thread (a predictor keeps per-image state), is never kept waiting:

1. decoding the image and preparing the network's input, on worker threads (a few at a time);
2. the network (the predictor's ``infer``), on the :class:`~langseg.serve.service.InferenceQueue`'s
   thread, which bounds the requests in progress (a 503 beyond) and their time;
3. masks at the image size, scores and the JSON (``finish`` and the answer), on the queue's second
   thread, while the network takes the next request. With large images this is half the work: a 512 px
   load ran 1.7 times faster than with every stage on the inference thread.

The event loop only parses, queues and answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from langseg.errors import LangsegError
from langseg.predict import ReferringSet
from langseg.serve import api_schema as schema
from langseg.serve.api_http import (
    BearerToken,
    BodyLimit,
    JSONAnswer,
    error_body,
    error_response,
    http_error_response,
)
from langseg.serve.api_requests import DOCS_HINT, refer_query, segment_query
from langseg.serve.service import (
    TASKS,
    InferenceQueue,
    Limits,
    Models,
    decode_image,
    refer_answer,
    segment_answer,
)

DESCRIPTION = """Language-driven image segmentation over HTTP.

- `POST /segment`: segment an image into labels chosen per request (a semantic model).
- `POST /refer`: the mask of the object each expression refers to (a referring model).

Both take **multipart/form-data** (the image as a file part) or **JSON** (the image as base64). Masks
come back as COCO run-length encodings (`pycocotools.mask.decode`); with `format=png` also as a palette
PNG and an overlay. Every error is `{"error", "message", "hint"}` with a 4xx status (503 when busy).
"""


async def _predictor(models: Models, name: str) -> Any:
    """The model's predictor; one not loaded yet loads off the event loop (once: Models caches it)."""
    return models.get(name) if models.is_loaded(name) else await to_thread.run_sync(models.get, name)


def _prepare(predictor: Any, data: bytes, limits: Limits) -> Any:
    """Decode the upload and turn it into the network's input (reads no predictor state: any thread)."""
    return predictor.prepare(decode_image(data, limits))


def _segment_answer(predictor: Any, name: str, png: bool, pending: Any) -> dict[str, Any]:
    """After the network, on the queue's second thread: masks at the image size, scores, the JSON."""
    return segment_answer(predictor.finish(pending), name, png=png)


def _refer_answer(predictor: Any, name: str, png: bool, pending: Any) -> dict[str, Any]:
    return refer_answer(ReferringSet(predictor.finish(pending)), name, png=png)


def build_app(models: Models, limits: Limits, token: str | None) -> FastAPI:
    """The application; see :func:`langseg.serve.api.create_app`."""
    queue = InferenceQueue(limits)
    # Decoding runs before a queue place is taken: a few at a time bound the memory of decoded images.
    decoding = CapacityLimiter(max(2, os.cpu_count() or 1))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load each task's default model now, so that the first request is not slow.
        for name in dict.fromkeys(models.defaults.values()):
            await to_thread.run_sync(models.get, name)
        yield
        queue.close()

    app = FastAPI(
        title="langseg",
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=JSONAnswer,
    )
    app.state.models, app.state.queue, app.state.limits = models, queue, limits

    # Middleware added last runs first: the token is checked before the body is even counted.
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if token:
        app.add_middleware(BearerToken, token=token)

    _add_error_handlers(app)

    @app.post(
        "/segment",
        summary="Segment an image into the given labels",
        openapi_extra=schema.segment_body(limits),
        responses={200: {"model": schema.SegmentAnswer}, **schema.REQUEST_ERRORS},
    )
    async def segment(request: Request) -> Response:
        query = await segment_query(request, limits)
        name = models.resolve(query.model, "semantic")
        predictor = await _predictor(models, name)
        prepared = await to_thread.run_sync(_prepare, predictor, query.image, limits, limiter=decoding)
        # Only the network runs on the inference thread (a predictor keeps per-image state); what follows
        # runs on the queue's second thread while the next request's network runs.
        then = partial(_segment_answer, predictor, name, query.png)
        # Requests for the same model and labels that wait together share one batched network call.
        key = (name, tuple(query.labels), query.background_threshold)
        # keep_scores (True): each segment's score
        infer_many = partial(
            predictor.infer_many,
            labels=query.labels,
            keep_scores=True,
            background_threshold=query.background_threshold,
        )
        answer = await queue.run_batched(key, infer_many, prepared, then=then)
        return JSONAnswer(answer)

    @app.post(
        "/refer",
        summary="Segment the object each expression refers to",
        openapi_extra=schema.refer_body(limits),
        responses={200: {"model": schema.ReferAnswer}, **schema.REQUEST_ERRORS},
    )
    async def refer(request: Request) -> Response:
        query = await refer_query(request, limits)
        name = models.resolve(query.model, "referring")
        predictor = await _predictor(models, name)
        prepared = await to_thread.run_sync(_prepare, predictor, query.image, limits, limiter=decoding)
        answer = await queue.run(
            predictor.infer,
            prepared,
            query.texts,
            True,
            then=partial(_refer_answer, predictor, name, query.png),
        )
        return JSONAnswer(answer)

    @app.get("/models", summary="The models this server offers", responses=schema.AUTH_ERRORS)
    async def list_models() -> schema.ModelsAnswer:
        return schema.ModelsAnswer(
            models=[
                schema.ModelInfo(
                    name=name,
                    task=models.task_of(name),  # type: ignore[arg-type]
                    default=models.defaults.get(models.task_of(name)) == name,
                    loaded=models.is_loaded(name),
                )
                for task in TASKS
                for name in models.offered(task)
            ]
        )

    @app.get("/health", summary="Whether the server is up (never needs the token)")
    async def health() -> schema.HealthAnswer:
        ready = all(models.is_loaded(name) for name in models.defaults.values())
        return schema.HealthAnswer(
            status="ok", ready=ready, pending=queue.pending, queue_size=limits.queue_size
        )

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, the framework's too, as ``{"error", "message", "hint"}``."""

    async def langseg_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, LangsegError)
        return error_response(error)

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in error.errors()[:5]
        )
        body = error_body("RequestValidationError", f"the request is not valid: {problems}", DOCS_HINT)
        return JSONAnswer(body, 422)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return http_error_response(error.status_code, error.detail, error.headers)

    async def unexpected_error(request: Request, error: Exception) -> Response:
        # A bug: the request gets the same JSON shape, and the server still logs the traceback.
        body = error_body(
            "InternalServerError",
            f"the server failed on this request ({type(error).__name__})",
            "This is a bug in langseg; please report it with the request that caused it.",
        )
        return JSONAnswer(body, 500)

    app.add_exception_handler(LangsegError, langseg_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
