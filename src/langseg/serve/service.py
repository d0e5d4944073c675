"""What the web demo and the HTTP API share: the models they may serve (each loaded once), the limits on
a request, checking and decoding what a request sends, running inference off the caller's thread with a
bounded queue, and the JSON a result becomes.

Nothing here imports a web framework: :mod:`langseg.serve.api` (FastAPI) and :mod:`langseg.serve.demo`
(Gradio) wire it to theirs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from langseg.errors import (
    BadExpressionError,
    BadLabelsError,
    RequestTooLargeError,
    ServiceBusyError,
    UnknownModelError,
)

T = TypeVar("T")
TASKS = ("semantic", "referring")
DEFAULT_MODELS = {"semantic": "lseg-shapes", "referring": "vlt-shapes"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over a limit is a clear 4xx error, never a crash.

    Attributes:
        max_body_bytes: the whole request body (an upload, or base64 JSON: a third larger).
        max_pixels: image width x height, read from the header before decoding (decompression bombs).
        max_labels, max_label_chars: labels per ``/segment`` request, and characters per label.
        max_expressions, max_expression_chars: expressions per ``/refer`` request, and their length.
        timeout_s: how long a request may wait and run before it is answered 503.
        queue_size: requests waiting or running at once; one more is answered 503 at once.
    """

    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 16_000_000
    max_labels: int = 64
    max_label_chars: int = 200
    max_expressions: int = 16
    max_expression_chars: int = 500
    timeout_s: float = 60.0
    queue_size: int = 8


@dataclass
class Models:
    """The models a server offers, each loaded on first use and then kept (thread-safe).

    Args:
        names: the model names (or checkpoint folders) offered; ``None``: every registered model whose
            weights are on this machine (:func:`usable_models`).
        device: where they run (see :func:`langseg.api.load`).
        defaults: task -> the model a request without ``model`` gets.
    """

    names: Sequence[str] | None = None
    device: str = "auto"
    defaults: dict[str, str] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _tasks: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        from langseg.api import model_entry

        names = list(self.names) if self.names is not None else usable_models()
        self._tasks = {name: model_entry(name).task for name in names}  # unknown names fail here
        for task in TASKS:
            offered = [n for n in names if self._tasks[n] == task]
            if task not in self.defaults and offered:
                preferred = DEFAULT_MODELS[task]
                self.defaults[task] = preferred if preferred in offered else offered[0]
        self.names = names

    def offered(self, task: str | None = None) -> list[str]:
        """The model names offered, optionally for one task."""
        return [n for n, t in self._tasks.items() if task is None or t == task]

    def task_of(self, name: str) -> str:
        return self._tasks[name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def resolve(self, name: str | None, task: str) -> str:
        """The model to use for ``task``: ``name``, or the task's default; raises
        :class:`UnknownModelError` for a model not offered or of the other task."""
        if name is None or name == "":
            if task not in self.defaults:
                raise UnknownModelError(f"this server offers no {task} model", hint=self._hint(task))
            return self.defaults[task]
        if name not in self._tasks:
            raise UnknownModelError(
                f"this server does not offer the model {name!r:.100}", hint=self._hint(task)
            )
        if self._tasks[name] != task:
            raise UnknownModelError(
                f"{name} is a {self._tasks[name]} model, not a {task} one", hint=self._hint(task)
            )
        return name

    def _hint(self, task: str) -> str:
        offered = self.offered(task)
        return f"Use one of: {', '.join(offered)}." if offered else "Start the server with a model for it."

    def get(self, name: str) -> Any:
        """The predictor of an offered model, loaded on first use."""
        with self._lock:
            if name not in self._loaded:
                from langseg.api import load

                self._loaded[name] = load(name, device=self.device)
            return self._loaded[name]


def usable_models(task: str | None = None) -> list[str]:
    """Registered models whose weights are on this machine now (no download needed)."""
    from langseg.api import list_models

    return list_models(task=task, pretrained=True)


# ------------------------------------------------------------------------------------ requests


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """``H x W x 3`` uint8 from the bytes of an image file, refusing (before decoding) more pixels than
    ``limits.max_pixels``; raises :class:`~langseg.errors.BadImageError` or
    :class:`~langseg.errors.RequestTooLargeError`."""
    from PIL import Image

    from langseg.predict.images import load_image

    try:
        with Image.open(io.BytesIO(data)) as header:  # the header only: sizes before any decoding
            width, height = header.size
    except Exception:  # not an image, or over PIL's own limit: load_image says which, clearly
        width = height = 0
    if width * height > limits.max_pixels:
        raise RequestTooLargeError(
            f"the image has {width} x {height} = {width * height:,} pixels, over this server's limit of "
            f"{limits.max_pixels:,}",
            hint="Resize the image, or start the server with a higher --max-pixels.",
        )
    return load_image(data)


def decode_base64(text: str) -> bytes:
    """The bytes of a base64 string (standard alphabet, padding optional, a ``data:`` URL prefix allowed);
    raises :class:`~langseg.errors.BadImageError`."""
    from langseg.errors import BadImageError

    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (ValueError, TypeError) as err:
        raise BadImageError(
            f"the image is not valid base64 ({err})", hint="Send the image file's bytes as standard base64."
        ) from err


def split_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels from a comma-separated string or a list (each item stripped)."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    return [str(item).strip() for item in items]


def check_labels(labels: list[str], limits: Limits) -> list[str]:
    """``labels`` within the limits (the predictor makes the other checks); raises BadLabelsError."""
    if len(labels) > limits.max_labels:
        raise BadLabelsError(
            f"{len(labels)} labels, over this server's limit of {limits.max_labels}",
            hint="Send fewer labels per request.",
        )
    for label in labels:
        if len(label) > limits.max_label_chars:
            raise BadLabelsError(
                f"a label of {len(label)} characters, over this server's limit of {limits.max_label_chars}",
                hint="Use short labels: a few words each.",
            )
    return labels


def check_expressions(texts: list[str], limits: Limits) -> list[str]:
    """``texts`` within the limits (the predictor makes the other checks); raises BadExpressionError."""
    if not texts:
        raise BadExpressionError("no expression given", hint='Send "expression": "the red square".')
    if len(texts) > limits.max_expressions:
        raise BadExpressionError(
            f"{len(texts)} expressions, over this server's limit of {limits.max_expressions}",
            hint="Send fewer expressions per request.",
        )
    for text in texts:
        if len(text) > limits.max_expression_chars:
            raise BadExpressionError(
                f"an expression of {len(text)} characters, over this server's limit of "
                f"{limits.max_expression_chars}",
                hint="Describe the object in one short sentence.",
            )
    return texts


# ------------------------------------------------------------------------------------ running


class InferenceQueue:
    """Runs blocking calls (inference) on one worker thread, off the event loop, in arrival order.

    A predictor keeps per-image state, so one thread serves them all; at most ``limits.queue_size``
    calls wait or run at once, and one more raises :class:`ServiceBusyError` at once (a 503), as does a
    call not finished within ``limits.timeout_s`` (it still completes in the background and frees its
    place then).

    A call may name a second stage, ``then(result)``, run on a second thread (in arrival order too): the
    work after the network that reads no predictor state (a predictor's ``finish``, building the answer),
    so that the worker starts the next request's network meanwhile. The place is held until both are done.

    :meth:`submit_batched` lets requests that can share a network call (the same model and labels) wait
    together: the worker takes all those waiting when it gets to them, up to ``max_batch``, in one call.
    Nothing waits on purpose for a batch to fill: a lone request runs at once, and a batch is what came
    in while the worker was busy.
    """

    def __init__(self, limits: Limits, max_batch: int = 8) -> None:
        self.limits = limits
        self.max_batch = max_batch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="langseg-infer")
        self._after = ThreadPoolExecutor(1, thread_name_prefix="langseg-finish")
        self._places = threading.BoundedSemaphore(limits.queue_size)
        self._waiting: dict[Hashable, list[tuple[Any, Future]]] = {}  # batchable requests, by key
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Calls waiting or running now."""
        return self.limits.queue_size - self._places._value  # type: ignore[attr-defined]

    def submit(
        self, call: Callable[..., Any], *args: Any, then: Callable[[Any], Any] | None = None
    ) -> Future:
        """``call(*args)`` on the worker thread (and ``then`` of its result on the second one): a
        concurrent future; raises ServiceBusyError when full."""
        self._take_place()
        try:
            first = self._pool.submit(call, *args)
        except BaseException:
            self._places.release()
            raise
        return self._chain(first, then)

    def _take_place(self) -> None:
        """Hold one of the ``queue_size`` places, or raise :class:`ServiceBusyError` at once."""
        if not self._places.acquire(blocking=False):
            raise ServiceBusyError(
                f"the server is busy ({self.limits.queue_size} requests waiting or running)",
                hint="Retry in a few seconds.",
            )

    def submit_batched(
        self,
        key: Hashable,
        call_many: Callable[[list[Any]], Sequence[Any]],
        item: Any,
        then: Callable[[Any], Any] | None = None,
    ) -> Future:
        """Like :meth:`submit`, for ``item`` of a call that takes many: ``call_many(items)`` gives one
        result per item, in order. Items of equal ``key`` waiting together share one call (``key`` must
        say everything besides the item that ``call_many`` depends on)."""
        self._take_place()
        first: Future = Future()
        try:
            with self._lock:
                group = self._waiting.setdefault(key, [])
                group.append((item, first))
                if len(group) == 1:  # the first one waiting asks the worker to take the group
                    self._pool.submit(self._run_batch, key, call_many)
        except BaseException:
            self._places.release()
            raise
        return self._chain(first, then)

    def _run_batch(self, key: Hashable, call_many: Callable[[list[Any]], Sequence[Any]]) -> None:
        """On the worker thread: one call for (up to ``max_batch`` of) the items waiting under ``key``."""
        with self._lock:
            group = self._waiting.pop(key, [])
            if len(group) > self.max_batch:
                self._waiting[key] = group[self.max_batch :]
                self._pool.submit(self._run_batch, key, call_many)
        batch = [
            (item, future)
            for item, future in group[: self.max_batch]
            if future.set_running_or_notify_cancel()
        ]
        if not batch:
            return
        try:
            results = call_many([item for item, _ in batch])
        except BaseException as err:  # the same call for each: the same failure for each
            for _, future in batch:
                future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    def _chain(self, first: Future, then: Callable[[Any], Any] | None) -> Future:
        """``first``'s outcome, after ``then`` of it on the second thread; the place freed at the end."""
        if then is None:
            first.add_done_callback(lambda _: self._places.release())
            return first
        done: Future = Future()

        def finish(second: Future) -> None:
            self._places.release()  # before the caller hears of it: the place is free when it does
            _settle(done, second)

        def chain(future: Future) -> None:
            try:
                self._after.submit(then, future.result()).add_done_callback(finish)
            except BaseException:  # the call failed, was cancelled, or the queue closed: that is the answer
                finish(future)

        first.add_done_callback(chain)
        return done

    async def run(self, call: Callable[..., T], *args: Any, then: Callable[[T], Any] | None = None) -> Any:
        """Await ``call(*args)`` (then ``then`` of it) from an event loop; raises ServiceBusyError when
        full or too slow."""
        return await self._await(self.submit(call, *args, then=then))

    async def run_batched(
        self,
        key: Hashable,
        call_many: Callable[[list[Any]], Sequence[Any]],
        item: Any,
        then: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Await :meth:`submit_batched` from an event loop; raises ServiceBusyError when full or too slow."""
        return await self._await(self.submit_batched(key, call_many, item, then=then))

    async def _await(self, submitted: Future) -> Any:
        future = asyncio.wrap_future(submitted)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.timeout_s)
        except TimeoutError:
            raise ServiceBusyError(
                f"the request did not finish within {self.limits.timeout_s:g} s",
                hint="Retry later or with a smaller image; the server may be overloaded.",
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._after.shutdown(wait=True, cancel_futures=True)
        with self._lock:  # batchable requests whose turn never came: cancelled, never left hanging
            for group in self._waiting.values():
                for _, future in group:
                    future.cancel()
            self._waiting.clear()


def _settle(target: Future, source: Future) -> None:
    """Give ``target`` the outcome of the finished ``source``."""
    if target.done():  # cancelled by its awaiter meanwhile
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


# ------------------------------------------------------------------------------------ answers


def png_base64(image: Any) -> str:
    """A PIL image as base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def segment_answer(result: Any, model: str, png: bool = False) -> dict[str, Any]:
    """The JSON of a :class:`~langseg.predict.SegmentationResult`: ``model``, ``labels``, ``size``,
    ``segments`` (index, label, area, score, COCO RLE ``mask``), and with ``png`` the palette mask
    (``mask_png``) and the overlay (``overlay_png``) as base64 PNG."""
    answer = {"model": model, "task": "semantic", **result.to_dict()}
    if png:
        answer["mask_png"] = png_base64(result.mask_image())
        answer["overlay_png"] = png_base64(result.overlay())
    return answer


def refer_answer(results: Any, model: str, png: bool = False) -> dict[str, Any]:
    """The JSON of a :class:`~langseg.predict.ReferringSet`: ``model``, ``texts``, ``size``,
    ``expressions`` (index, text, score, area, COCO RLE ``mask``), and with ``png`` the palette mask
    (0 = nothing, k = expression k) and the overlay as base64 PNG."""
    answer = {"model": model, "task": "referring", **results.to_dict()}
    if png:
        answer["mask_png"] = png_base64(results.mask_image())
        answer["overlay_png"] = png_base64(results.overlay())
    return answer
