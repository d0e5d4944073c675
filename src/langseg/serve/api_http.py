"""The HTTP side of :mod:`langseg.serve.api`: errors as status codes and one JSON shape, and the two checks
that run before any route (the bearer token and the body size), written as plain ASGI middleware so they
see the raw request: the size of a chunked body is known only while it streams in.

Every error answer is ``{"error": kind, "message": ..., "hint": ...}``: ``kind`` is the
:class:`~langseg.errors.LangsegError` subclass name (or, for the framework's own errors, a name such as
``NotFound``), ``message`` says what was wrong with the request, ``hint`` what to do about it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

from langseg.errors import (
    BadExpressionError,
    BadImageError,
    BadLabelsError,
    LangsegError,
    MissingWeightsError,
    RequestTooLargeError,
    ServiceBusyError,
    UnknownModelError,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_S = 2  # what a 503 asks the client to wait: a queue place frees within a request's time


class InvalidRequestError(LangsegError, ValueError):
    """A request field is missing, of the wrong type, not known, or has a value the server does not offer."""

    default_hint = "See /docs (or /openapi.json) for the fields of each request."


class MalformedRequestError(LangsegError, ValueError):
    """The body is not what its Content-Type says: invalid JSON, broken multipart data."""

    default_hint = "Send a JSON object (Content-Type: application/json) or multipart/form-data."


class UnsupportedMediaTypeError(LangsegError, ValueError):
    """The body is neither JSON nor multipart/form-data."""

    default_hint = (
        "Send Content-Type: application/json (the image as base64) or multipart/form-data (the image "
        "as a file part)."
    )


class UnauthorizedError(LangsegError, PermissionError):
    """The server wants a bearer token and the request has none, or another one."""

    default_hint = (
        "Send the header 'Authorization: Bearer <token>' with the token the server was started with."
    )


# The first class an error is an instance of gives its status (subclasses before their bases).
STATUS_CODES: tuple[tuple[type[LangsegError], int], ...] = (
    (UnauthorizedError, 401),
    (BadImageError, 400),
    (MalformedRequestError, 400),
    (UnsupportedMediaTypeError, 415),
    (RequestTooLargeError, 413),
    (BadLabelsError, 422),
    (BadExpressionError, 422),
    # A model name in the body, not a resource in the path: the request is wrong, the URL is not (422).
    (UnknownModelError, 422),
    (InvalidRequestError, 422),
    (ServiceBusyError, 503),
    # The server was started with a model whose weights are gone: the server's fault, not the request's.
    (MissingWeightsError, 500),
)


def status_of(error: LangsegError) -> int:
    """The HTTP status of a langseg error; any other one was caused by the request (400)."""
    for cls, status in STATUS_CODES:
        if isinstance(error, cls):
            return status
    return 400


class JSONAnswer(JSONResponse):
    """A JSON response whose text survives any string: a lone surrogate (JSON allows ``"\\ud800"`` in a
    request, and error messages quote what was sent) is written as its JSON escape instead of failing
    to encode as UTF-8 (a 500 for nothing)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        # backslashreplace writes U+D800 as the six characters \ud800: exactly its JSON escape.
        return text.encode("utf-8", "backslashreplace")


def error_body(kind: str, message: str, hint: str) -> dict[str, str]:
    return {"error": kind, "message": message, "hint": hint}


def error_response(error: LangsegError, status: int | None = None) -> JSONAnswer:
    """The JSON answer of a langseg error, with the headers its status calls for."""
    status = status_of(error) if status is None else status
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONAnswer(error_body(type(error).__name__, error.message, error.hint), status, headers)


def http_error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONAnswer:
    """The JSON answer of the framework's own HTTP errors (an unknown path: 404, a wrong method: 405)."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else f"HTTP {status}"
    kind = phrase.title().replace(" ", "").replace("-", "")  # "Method Not Allowed" -> "MethodNotAllowed"
    message = detail if isinstance(detail, str) and detail else phrase
    hint = "See /docs (or /openapi.json) for the endpoints and their methods."
    return JSONAnswer(error_body(kind, message, hint), status, headers)


async def _send_error(send: Send, error: LangsegError) -> None:
    """Answer a request with ``error`` from ASGI middleware (before any route ran)."""
    response = error_response(error)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": [*response.raw_headers, (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class BearerToken:
    """Answers 401 to any request but ``GET /health`` that lacks ``Authorization: Bearer <token>``."""

    open_paths = frozenset({"/health"})  # load balancers probe it without credentials

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        await _send_error(send, UnauthorizedError("this server needs a bearer token"))

    def _authorised(self, scope: Scope) -> bool:
        scheme, _, credentials = (_header(scope, b"authorization") or b"").partition(b" ")
        # compare_digest on bytes takes the same time wherever the first difference is (no timing leak).
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)


class BodyLimit:
    """Refuses a request body over ``max_bytes`` (413): at once by its Content-Length, and for a chunked
    body (no length announced) as soon as the bytes read so far pass the limit, so that no route ever
    holds more than ``max_bytes`` of one request in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"the request body is {size}, over this server's limit of {self.max_bytes:,} bytes",
            hint="Send a smaller image (resize or compress it), or start the server with a higher "
            "--max-body-bytes.",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await _send_error(send, self._too_large(f"{int(length):,} bytes"))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; the app's LangsegError handler answers 413.
                    raise self._too_large(f"more than {self.max_bytes:,} bytes")
            return message

        await self.app(scope, counting_receive, send)
