"""The HTTP API of ``langseg serve`` (:mod:`langseg.serve.api`), served for real by uvicorn on loopback.

The answers are checked against the library: each mask decoded from the COCO RLE (or the PNG) equals the
one ``Segmenter.segment`` / ``Referrer.refer_all`` give for the same image, in both request encodings.
Every kind of bad input is answered with its 4xx status and the JSON error shape; the limits (body size,
by length and while streaming, image pixels), the bearer token, the queue (503 when full or too slow),
``/models`` and the OpenAPI schema are checked. Two fuzzers assert that no request gets a 5xx:
schemathesis, from the schema (which the answers must also conform to), and hypothesis, with fields
mostly plausible (a real image, label words) so that requests also reach the model.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as coco_mask
from schemathesis.checks import (  # type: ignore[attr-defined]
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from langseg.data import ShapeWorldConfig, render_scene
from langseg.data.shape_expressions import all_expressions
from langseg.errors import BadConfigError, ServiceBusyError
from langseg.predict import ReferringSet
from langseg.serve import api
from langseg.serve.service import InferenceQueue, Limits, Models

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Random expressions name nothing the model knows: the predictor warns, as it should.
    pytest.mark.filterwarnings("ignore::langseg.predict.ExpressionWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools, numpy 2
]

LABELS = ["red circle", "blue square", "green triangle", "yellow star", "background"]
BACKGROUNDS = ("plain", "noise", "texture")
MAX_PIXELS = 160 * 160  # the main app's limit: a 200 x 200 image is over it, in a small body


def world(index: int, size: int = 64) -> Any:
    """A ShapeWorld scene (image and objects); backgrounds cycle plain, noise, texture."""
    config = ShapeWorldConfig(size=size, background=BACKGROUNDS[index % 3])  # type: ignore[arg-type]
    return render_scene(seed=7, index=index, config=config)


def scene(index: int, size: int = 64) -> np.ndarray:
    return world(index, size).image


def texts_for(index: int) -> list[str]:
    """Expressions for two different objects of ``scene(index)``, each naming one object uniquely."""
    first: dict[int, str] = {}
    for expression in all_expressions(world(index)):
        first.setdefault(expression.target, expression.text)
    return list(first.values())[:2]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ servers


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the port is ours from now on: no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def models() -> Models:
    """One Models for every app here: each model loads once (the apps share the loaded predictors)."""
    return Models(["lseg-shapes", "vlt-shapes"], device="cpu")


@pytest.fixture(scope="module")
def base(models: Models) -> Iterator[str]:
    app = api.create_app(models, Limits(max_pixels=MAX_PIXELS))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=60) as session:
        yield session


def wait_idle(app: Any) -> None:
    """Wait until the app's inference queue has nothing waiting or running (a timed-out call finishes
    in the background; the next test must not share the predictor with it)."""
    deadline = time.monotonic() + 30
    while app.state.queue.pending:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------------ requests


def segment_request(
    client: httpx.Client, image: np.ndarray, labels: list[str], encoding: str, **extra: Any
) -> httpx.Response:
    """POST /segment in one of the two encodings."""
    if encoding == "json":
        body = {"image": base64.b64encode(png_bytes(image)).decode(), "labels": labels, **extra}
        return client.post("/segment", json=body)
    files = {"image": ("scene.png", png_bytes(image), "image/png")}
    return client.post("/segment", files=files, data={"labels": ", ".join(labels), **extra})


def decode(rle: dict[str, Any]) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def index_map(answer: dict[str, Any]) -> np.ndarray:
    """The label index of each pixel, from the answer's RLE masks (-1 where none: must not remain)."""
    mask = np.full(answer["size"], -1)
    for segment in answer["segments"]:
        pixels = decode(segment["mask"])
        assert not (pixels & (mask >= 0)).any(), "segments overlap"
        mask[pixels] = segment["index"]
    return mask


# ------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_segment_masks_equal_the_library(client: httpx.Client, segmenter: Any, encoding: str) -> None:
    for index in range(4):
        image = scene(index)
        response = segment_request(client, image, LABELS, encoding)
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = segmenter.segment(image, LABELS, keep_scores=True)
        assert answer["model"] == "lseg-shapes" and answer["task"] == "semantic"
        assert answer["labels"] == LABELS and answer["size"] == [64, 64]
        np.testing.assert_array_equal(index_map(answer), expected.mask)
        assert [s["label"] for s in answer["segments"]] == list(expected.areas())
        for segment in answer["segments"]:
            assert segment["area"] == pytest.approx(expected.areas()[segment["label"]], abs=1e-12)
            assert segment["score"] == pytest.approx(expected.label_scores()[segment["label"]], abs=1e-5)


def test_segment_background_threshold_and_model(client: httpx.Client, segmenter: Any) -> None:
    image = scene(5)
    response = segment_request(client, image, LABELS, "json", background_threshold=0.9, model="lseg-shapes")
    assert response.status_code == 200, response.text
    expected = segmenter.segment(image, LABELS, background_threshold=0.9)
    np.testing.assert_array_equal(index_map(response.json()), expected.mask)
    form = segment_request(client, image, LABELS, "multipart", background_threshold="0.9")
    np.testing.assert_array_equal(index_map(form.json()), expected.mask)
    # A threshold this high sends more pixels to the background than none does.
    plain = segmenter.segment(image, LABELS).mask
    assert (expected.mask == 4).sum() > (plain == 4).sum()


def test_segment_repeated_label_fields_and_comma_string(client: httpx.Client, segmenter: Any) -> None:
    image = scene(6)
    expected = segmenter.segment(image, LABELS).mask
    files = {"image": ("a.png", png_bytes(image), "image/png")}
    repeated = client.post("/segment", files=files, data={"labels": LABELS})
    as_text = client.post(
        "/segment", json={"image": base64.b64encode(png_bytes(image)).decode(), "labels": ", ".join(LABELS)}
    )
    for response in (repeated, as_text):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(index_map(response.json()), expected)


def test_form_fields_not_utf8_are_read_as_latin1(client: httpx.Client) -> None:
    """Starlette reads a form field that is not UTF-8 as Latin-1 (what such a client likely sent): the
    labels arrive as text, never as a server error."""
    files = {"image": ("a.png", GOOD_PNG, "image/png"), "labels": (None, b"caf\xe9, th\xe9")}
    response = client.post("/segment", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["labels"] == ["café", "thé"]


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_segment_png_format(client: httpx.Client, segmenter: Any, encoding: str) -> None:
    image = scene(2)
    response = segment_request(client, image, LABELS, encoding, format="png")
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = segmenter.segment(image, LABELS).mask
    with Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))) as mask_png:
        assert mask_png.mode == "P"
        np.testing.assert_array_equal(np.asarray(mask_png), expected)
    with Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"]))) as overlay:
        assert overlay.size[1] >= 64 and overlay.size[0] == 64  # the legend may add rows below
    np.testing.assert_array_equal(index_map(answer), expected)
    rle_only = segment_request(client, image, LABELS, encoding).json()
    assert "mask_png" not in rle_only and "overlay_png" not in rle_only


def refer_request(client: httpx.Client, image: np.ndarray, encoding: str, **fields: Any) -> httpx.Response:
    if encoding == "json":
        return client.post("/refer", json={"image": base64.b64encode(png_bytes(image)).decode(), **fields})
    return client.post("/refer", files={"image": ("a.png", png_bytes(image), "image/png")}, data=fields)


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_refer_masks_equal_the_library(client: httpx.Client, referrer: Any, encoding: str) -> None:
    for index in range(3):
        image, texts = scene(index), texts_for(index)
        response = refer_request(client, image, encoding, expressions=texts)
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = referrer.refer_all(image, texts, keep_scores=True)
        assert answer["model"] == "vlt-shapes" and answer["texts"] == texts and answer["size"] == [64, 64]
        for k, (item, result) in enumerate(zip(answer["expressions"], expected, strict=True), start=1):
            assert item["index"] == k and item["text"] == result.text
            np.testing.assert_array_equal(decode(item["mask"]), result.mask)
            assert item["score"] == pytest.approx(result.score, abs=1e-5)
            assert item["area"] == pytest.approx(result.mask.mean(), abs=1e-12)
        assert all(result.mask.any() for result in expected)  # not a comparison of empty masks
        one = refer_request(client, image, encoding, expression=texts[1]).json()
        assert one["texts"] == [texts[1]]
        np.testing.assert_array_equal(decode(one["expressions"][0]["mask"]), expected[1].mask)


def test_refer_png_format(client: httpx.Client, referrer: Any) -> None:
    image, texts = scene(4), [*texts_for(4), "the red square"]
    answer = refer_request(client, image, "json", expressions=texts, format="png").json()
    expected = ReferringSet(referrer.refer_all(image, texts, keep_scores=True)).mask
    with Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))) as mask_png:
        np.testing.assert_array_equal(np.asarray(mask_png), expected)
    assert set(np.unique(expected)) >= {0, 1, 2}  # not a comparison of empty masks


def test_concurrent_requests_each_get_their_own_image(client: httpx.Client, segmenter: Any) -> None:
    """The predictor keeps per-image state: requests racing for it must still get their own masks."""
    images = [scene(i) for i in range(3)] * 3
    expected = [segmenter.segment(image, LABELS).mask for image in images[:3]] * 3
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda im: segment_request(client, im, LABELS, "json"), images))
    for response, mask in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(index_map(response.json()), mask)


def test_models_and_health(client: httpx.Client) -> None:
    assert client.get("/models").json() == {
        "models": [
            {"name": "lseg-shapes", "task": "semantic", "default": True, "loaded": True},
            {"name": "vlt-shapes", "task": "referring", "default": True, "loaded": True},
        ]
    }
    health = client.get("/health").json()
    assert health == {"status": "ok", "ready": True, "pending": 0, "queue_size": Limits().queue_size}


def test_default_models_load_at_startup() -> None:
    """Before any request, the lifespan has loaded each task's default (a fresh Models: nothing cached)."""
    models = Models(["vlt-shapes"], device="cpu")
    assert not models.is_loaded("vlt-shapes")
    with serving(api.create_app(models)) as url:
        assert models.is_loaded("vlt-shapes")
        assert httpx.get(f"{url}/health").json()["ready"] is True


def test_framework_validation_errors_have_the_same_shape(models: Models) -> None:
    app = api.create_app(models)

    @app.get("/probe")
    async def probe(count: int) -> dict[str, int]:  # FastAPI validates the query: "x" is a 422
        return {"count": count}

    with serving(app) as url:
        assert httpx.get(f"{url}/probe", params={"count": 3}).json() == {"count": 3}
        body = check_error(httpx.get(f"{url}/probe", params={"count": "x"}), 422, "RequestValidationError")
        assert "count" in body["message"]


def test_openapi_documents_both_encodings_and_the_errors(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    for path, required in (("/segment", {"image", "labels"}), ("/refer", {"image"})):
        operation = schema["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert content["application/json"]["schema"]["properties"]["image"]["format"] == "byte"
        assert set(content["application/json"]["schema"]["required"]) == required
        assert {"200", "400", "401", "413", "415", "422", "503"} <= set(operation["responses"])
        assert operation["responses"]["422"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorAnswer"
        }
    assert set(schema["components"]["schemas"]["ErrorAnswer"]["required"]) == {"error", "message", "hint"}
    segment = schema["components"]["schemas"]["Segment"]["properties"]
    assert {"index", "label", "area", "score", "mask"} == set(segment)
    assert {"/segment", "/refer", "/models", "/health"} == set(schema["paths"])
    labels = schema["paths"]["/segment"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert labels["properties"]["labels"]["anyOf"][0]["maxItems"] == Limits().max_labels  # this server's
    for path in ("/segment", "/refer"):  # the documented examples run as they are
        example = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert client.post(path, json=example).status_code == 200


# ------------------------------------------------------------------------------------ bad input


def _png_of_size(width: int, height: int) -> bytes:
    return png_bytes(np.zeros((height, width, 3), np.uint8))


GOOD_PNG = png_bytes(scene(0))
GOOD_B64 = base64.b64encode(GOOD_PNG).decode()
Request = Callable[[httpx.Client], httpx.Response]


def form(path: str, image: bytes | None = GOOD_PNG, **data: Any) -> Request:
    """A multipart/form-data request (text fields sent as parts too, so it is one without a file)."""
    parts: list[tuple[str, Any]] = [] if image is None else [("image", ("x.png", image, "image/png"))]
    for key, value in data.items():
        parts += [
            (key, (None, str(item).encode())) for item in (value if isinstance(value, list) else [value])
        ]
    return lambda c: c.post(path, files=parts)


def as_json(path: str, **body: Any) -> Request:
    return lambda c: c.post(path, json=body)


def raw(path: str, content: bytes | str, content_type: str | None = "application/json") -> Request:
    """A body as written (``IMAGE`` in a text body stands for the base64 of a good image)."""
    content = content.replace("IMAGE", GOOD_B64) if isinstance(content, str) else content
    headers = {} if content_type is None else {"content-type": content_type}
    return lambda c: c.post(path, content=content, headers=headers)


TWO = "a, b"
BAD_REQUESTS: dict[str, tuple[Request, int, str]] = {
    # the image
    "not an image": (form("/segment", b"hello, world", labels=TWO), 400, "BadImageError"),
    "truncated image": (form("/segment", GOOD_PNG[: len(GOOD_PNG) // 2], labels=TWO), 400, "BadImageError"),
    "empty file": (form("/segment", b"", labels=TWO), 400, "BadImageError"),
    "bad base64": (as_json("/segment", image="!!not base64!!", labels=["a", "b"]), 400, "BadImageError"),
    "base64 of text": (
        as_json("/segment", image=base64.b64encode(b"text").decode(), labels=TWO),
        400,
        "BadImageError",
    ),
    "NUL in base64": (as_json("/segment", image="iVBO\x00", labels=TWO), 400, "BadImageError"),
    "non-ASCII base64": (as_json("/refer", image="ïmage", expression="a dog"), 400, "BadImageError"),
    "too many pixels": (form("/segment", _png_of_size(200, 200), labels=TWO), 413, "RequestTooLargeError"),
    "too many pixels, json": (
        as_json("/refer", image=base64.b64encode(_png_of_size(1000, 30)).decode(), expression="a dog"),
        413,
        "RequestTooLargeError",
    ),
    "image missing": (form("/segment", None, labels=TWO), 422, "InvalidRequestError"),
    "image missing, json": (as_json("/segment", labels=["a", "b"]), 422, "InvalidRequestError"),
    "image null": (as_json("/segment", image=None, labels=["a", "b"]), 422, "InvalidRequestError"),
    "image a dict": (as_json("/segment", image={"a": 1}, labels=["a", "b"]), 422, "InvalidRequestError"),
    "image a number": (as_json("/refer", image=12, expression="a dog"), 422, "InvalidRequestError"),
    "image a text field": (
        lambda c: c.post("/segment", files={"image": (None, GOOD_B64.encode()), "labels": (None, b"a, b")}),
        422,
        "InvalidRequestError",
    ),
    "two images": (
        lambda c: c.post(
            "/segment",
            data={"labels": TWO},
            files=[("image", ("a.png", GOOD_PNG)), ("image", ("b.png", GOOD_PNG))],
        ),
        422,
        "InvalidRequestError",
    ),
    # the labels
    "labels missing": (form("/segment"), 422, "InvalidRequestError"),
    "labels empty list": (as_json("/segment", image=GOOD_B64, labels=[]), 422, "BadLabelsError"),
    "labels empty string": (form("/segment", labels=""), 422, "BadLabelsError"),
    "labels only commas": (form("/segment", labels=" , ,"), 422, "BadLabelsError"),
    "one label": (as_json("/segment", image=GOOD_B64, labels=["cat"]), 422, "BadLabelsError"),
    "one label, form": (form("/segment", labels="cat"), 422, "BadLabelsError"),
    "duplicate labels": (
        as_json("/segment", image=GOOD_B64, labels=["cat", "dog", "cat"]),
        422,
        "BadLabelsError",
    ),
    "labels a number": (as_json("/segment", image=GOOD_B64, labels=5), 422, "BadLabelsError"),
    "labels an object": (as_json("/segment", image=GOOD_B64, labels={"a": "b"}), 422, "BadLabelsError"),
    "labels of numbers": (as_json("/segment", image=GOOD_B64, labels=[1, 2]), 422, "BadLabelsError"),
    "labels of lists": (as_json("/segment", image=GOOD_B64, labels=[["a"], ["b"]]), 422, "BadLabelsError"),
    "labels of nulls": (as_json("/segment", image=GOOD_B64, labels=[None, "b"]), 422, "BadLabelsError"),
    "NUL label": (as_json("/segment", image=GOOD_B64, labels=["\x00", "cat"]), 422, "BadLabelsError"),
    "lone surrogate label": (
        raw("/segment", '{"image": "IMAGE", "labels": ["\\ud800", "b"]}'),
        422,
        "BadLabelsError",
    ),
    "too many labels": (
        as_json("/segment", image=GOOD_B64, labels=[f"l{i}" for i in range(65)]),
        422,
        "BadLabelsError",
    ),
    "too long a label": (as_json("/segment", image=GOOD_B64, labels=["a" * 201, "b"]), 422, "BadLabelsError"),
    "labels a file": (
        lambda c: c.post("/segment", files={"image": ("a.png", GOOD_PNG), "labels": ("l.txt", b"a, b")}),
        422,
        "InvalidRequestError",
    ),
    "non-UTF-8 label field": (
        lambda c: c.post("/segment", files={"image": ("a.png", GOOD_PNG), "labels": (None, b"\xff\xfe\x00")}),
        422,
        "BadLabelsError",
    ),
    # the threshold
    "threshold not a number": (
        form("/segment", labels="a, background", background_threshold="high"),
        422,
        "InvalidRequestError",
    ),
    "threshold out of range": (
        as_json("/segment", image=GOOD_B64, labels=["a", "background"], background_threshold=1.5),
        422,
        "BadLabelsError",
    ),
    "threshold a boolean": (
        as_json("/segment", image=GOOD_B64, labels=["a", "background"], background_threshold=True),
        422,
        "InvalidRequestError",
    ),
    "threshold a string": (
        as_json("/segment", image=GOOD_B64, labels=["a", "background"], background_threshold="0.5"),
        422,
        "InvalidRequestError",
    ),
    "threshold a huge int": (
        raw(
            "/segment",
            '{"image": "IMAGE", "labels": "a, background", "background_threshold": 1' + "0" * 400 + "}",
        ),
        422,
        "InvalidRequestError",
    ),
    "threshold NaN": (
        raw("/segment", '{"image": "IMAGE", "labels": "a, background", "background_threshold": NaN}'),
        400,
        "MalformedRequestError",
    ),
    "threshold inf, form": (
        form("/segment", labels="a, background", background_threshold="inf"),
        422,
        "BadLabelsError",
    ),
    "threshold without background": (
        form("/segment", labels="a, b", background_threshold="0.5"),
        422,
        "BadLabelsError",
    ),
    # model and format
    "unknown model": (form("/segment", labels=TWO, model="no-such-model"), 422, "UnknownModelError"),
    "model of the other task": (form("/segment", labels=TWO, model="vlt-shapes"), 422, "UnknownModelError"),
    "model of the other task, refer": (
        as_json("/refer", image=GOOD_B64, expression="a dog", model="lseg-shapes"),
        422,
        "UnknownModelError",
    ),
    "model a number": (as_json("/segment", image=GOOD_B64, labels=TWO, model=3), 422, "InvalidRequestError"),
    "unknown format": (form("/segment", labels=TWO, format="jpeg"), 422, "InvalidRequestError"),
    "format a list": (
        as_json("/refer", image=GOOD_B64, expression="a dog", format=["png"]),
        422,
        "InvalidRequestError",
    ),
    "unknown field": (
        as_json("/segment", image=GOOD_B64, labels=TWO, label="cat"),
        422,
        "InvalidRequestError",
    ),
    # the body
    "invalid JSON": (raw("/segment", "{'image': 1"), 400, "MalformedRequestError"),
    "empty JSON body": (raw("/segment", ""), 400, "MalformedRequestError"),
    "JSON not UTF-8": (raw("/segment", b'{"labels": "\xff\xfe"}'), 400, "MalformedRequestError"),
    "JSON an array": (raw("/segment", "[1, 2]"), 422, "InvalidRequestError"),
    "JSON a string with NUL": (raw("/segment", '"\\u0000"'), 422, "InvalidRequestError"),
    "JSON nested deeply": (raw("/segment", "[" * 200_000 + "]" * 200_000), 400, "MalformedRequestError"),
    "JSON integer of 5000 digits": (
        raw("/segment", '{"labels": 1' + "0" * 5000 + "}"),
        400,
        "MalformedRequestError",
    ),
    "text/plain": (raw("/segment", "image=1", "text/plain"), 415, "UnsupportedMediaTypeError"),
    "no content type": (raw("/refer", b"\x89PNG", None), 415, "UnsupportedMediaTypeError"),
    "urlencoded form": (lambda c: c.post("/segment", data={"labels": TWO}), 415, "UnsupportedMediaTypeError"),
    "multipart without boundary": (
        raw("/segment", b"--x\r\n", "multipart/form-data"),
        400,
        "MalformedRequestError",
    ),
    "multipart with no parts": (
        raw("/segment", b"--x\r\nbroken", "multipart/form-data; boundary=x"),
        422,
        "InvalidRequestError",
    ),
    # the expressions
    "expression missing": (form("/refer"), 422, "InvalidRequestError"),
    "expression and expressions": (
        as_json("/refer", image=GOOD_B64, expression="a", expressions=["b"]),
        422,
        "InvalidRequestError",
    ),
    "expressions a string": (
        as_json("/refer", image=GOOD_B64, expressions="the dog"),
        422,
        "BadExpressionError",
    ),
    "expressions empty": (as_json("/refer", image=GOOD_B64, expressions=[]), 422, "BadExpressionError"),
    "expressions of numbers": (as_json("/refer", image=GOOD_B64, expressions=[1]), 422, "BadExpressionError"),
    "expression a number": (as_json("/refer", image=GOOD_B64, expression=1), 422, "BadExpressionError"),
    "expression empty": (form("/refer", expression="   "), 422, "BadExpressionError"),
    "expression without words": (form("/refer", expression="!!! 123"), 422, "BadExpressionError"),
    "too many expressions": (
        as_json("/refer", image=GOOD_B64, expressions=["a dog"] * 17),
        422,
        "BadExpressionError",
    ),
    "too long an expression": (
        as_json("/refer", image=GOOD_B64, expression="dog " * 200),
        422,
        "BadExpressionError",
    ),
    "expression twice in a form": (form("/refer", expression=["a dog", "a cat"]), 422, "InvalidRequestError"),
    "labels on /refer": (form("/refer", labels=TWO), 422, "InvalidRequestError"),
    # routes
    "GET /segment": (lambda c: c.get("/segment"), 405, "MethodNotAllowed"),
    "unknown path": (lambda c: c.get("/nothing"), 404, "NotFound"),
}


def check_error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message", "hint"} and body["error"] == kind, body
    assert (
        isinstance(body["message"], str)
        and body["message"]
        and isinstance(body["hint"], str)
        and body["hint"]
    )
    return body


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error(client: httpx.Client, name: str) -> None:
    send, status, kind = BAD_REQUESTS[name]
    check_error(send(client), status, kind)


def test_errors_say_what_was_wrong(client: httpx.Client) -> None:
    body = check_error(form("/segment", labels=TWO, model="no-such-model")(client), 422, "UnknownModelError")
    assert "no-such-model" in body["message"] and "lseg-shapes" in body["hint"]
    body = check_error(
        form("/segment", _png_of_size(200, 200), labels=TWO)(client), 413, "RequestTooLargeError"
    )
    assert "40,000" in body["message"] and f"{MAX_PIXELS:,}" in body["message"]
    # A lone surrogate sent in JSON comes back escaped (the answer is still valid JSON).
    body = check_error(
        raw("/segment", '{"image": "IMAGE", "labels": "a", "\\udcff": 1}')(client),
        422,
        "InvalidRequestError",
    )
    assert "udcff" in body["message"]


# ------------------------------------------------------------------------------------ limits


def test_body_limit_by_length_and_while_streaming(models: Models) -> None:
    limit = len(GOOD_B64) + 200  # a request with this image passes, one with a larger body does not
    app = api.create_app(models, Limits(max_body_bytes=limit))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        small = c.post("/segment", json={"image": GOOD_B64, "labels": TWO})
        assert small.status_code == 200, small.text
        check_error(
            c.post("/segment", json={"image": GOOD_B64 + "A" * 400, "labels": TWO}),
            413,
            "RequestTooLargeError",
        )
        big_png = png_bytes(scene(1, size=128))
        assert len(big_png) > limit
        check_error(
            c.post("/segment", files={"image": ("a.png", big_png)}, data={"labels": TWO}),
            413,
            "RequestTooLargeError",
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
            body = json.dumps({"image": GOOD_B64 + "A" * 4000, "labels": TWO}).encode()
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        request = c.build_request(
            "POST", "/segment", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
        body = check_error(c.send(request), 413, "RequestTooLargeError")
        assert f"{limit:,}" in body["message"]

        def small_chunks() -> Iterator[bytes]:
            yield json.dumps({"image": GOOD_B64, "labels": TWO}).encode()

        streamed = c.post("/segment", content=small_chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 200, streamed.text


def test_bearer_token(models: Models) -> None:
    app = api.create_app(models, token="s3cret-token")
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        for path in ("/models", "/openapi.json", "/docs"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
                response = c.get(path, headers=headers)
                check_error(response, 401, "UnauthorizedError")
                assert response.headers["www-authenticate"] == "Bearer"
        check_error(form("/segment", labels=TWO)(c), 401, "UnauthorizedError")
        assert c.get("/health").status_code == 200
        good = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/models", headers=good).status_code == 200
        files = {"image": ("a.png", GOOD_PNG)}
        assert c.post("/segment", files=files, data={"labels": TWO}, headers=good).status_code == 200


@contextmanager
def blocked_segmenter(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The served segmenter, made to wait for ``release`` (after setting ``entered``) on each call of
    its network."""
    predictor = models.get("lseg-shapes")
    entered, release = threading.Event(), threading.Event()
    original = predictor.infer

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(predictor, "infer", slow)
    try:
        yield entered, release
    finally:
        release.set()


def test_503_when_the_queue_is_full(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    app = api.create_app(models, Limits(queue_size=1))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(1) as pool:
        with blocked_segmenter(models, monkeypatch) as (entered, release):
            first = pool.submit(form("/segment", labels=TWO), c)
            assert entered.wait(30)  # the one queue place is taken
            busy = c.post("/segment", files={"image": ("a.png", GOOD_PNG)}, data={"labels": TWO})
            body = check_error(busy, 503, "ServiceBusyError")
            assert busy.headers["retry-after"].isdigit() and "busy" in body["message"]
            release.set()
            assert first.result(30).status_code == 200
        wait_idle(app)
        assert form("/segment", labels=TWO)(c).status_code == 200  # the place is free again


def test_503_when_a_request_times_out(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    app = api.create_app(models, Limits(timeout_s=0.3))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with blocked_segmenter(models, monkeypatch):
            started = time.monotonic()
            body = check_error(form("/segment", labels=TWO)(c), 503, "ServiceBusyError")
            assert 0.3 <= time.monotonic() - started < 10 and "0.3 s" in body["message"]
        wait_idle(app)


def test_inference_queue_second_stage() -> None:
    """``then`` runs on a second thread: the worker takes the next call meanwhile; errors of either stage
    reach the caller, and the place is free by the time they do."""
    queue = InferenceQueue(Limits(queue_size=2))
    try:
        assert queue.submit(lambda x: x + 1, 1, then=lambda y: y * 10).result(5) == 20
        assert queue.pending == 0
        with pytest.raises(ZeroDivisionError):
            queue.submit(lambda: 1 / 0, then=str).result(5)
        with pytest.raises(ValueError):
            queue.submit(lambda: "x", then=int).result(5)
        assert queue.pending == 0
        gate = threading.Event()
        first = queue.submit(lambda: 1, then=lambda _: gate.wait(5))
        second = queue.submit(lambda: 2)
        assert second.result(5) == 2 and not first.done()  # the network is not held up by stage two
        third = queue.submit(gate.wait, 5)  # the last place (`first` holds one until its stage two ends)
        with pytest.raises(ServiceBusyError):
            queue.submit(lambda: 4)
        gate.set()
        assert first.result(5) is True and third.result(5) is True
        assert queue.submit(lambda: 4).result(5) == 4
    finally:
        queue.close()


def test_inference_queue_batches_what_waits_together() -> None:
    """Requests of one key that wait while the worker is busy share one call (up to max_batch), in order;
    other keys get their own calls; a failing call fails each of its requests and frees their places."""
    queue = InferenceQueue(Limits(queue_size=16), max_batch=3)
    calls: list[tuple[str, list[int]]] = []

    def times(factor: int) -> Any:
        def call_many(items: list[int]) -> list[int]:
            calls.append((f"x{factor}", list(items)))
            return [item * factor for item in items]

        return call_many

    try:
        gate = threading.Event()
        blocker = queue.submit(gate.wait, 5)  # the worker is busy: what follows waits
        tens = [queue.submit_batched("ten", times(10), i, then=lambda r: r + 1) for i in range(5)]
        twos = [queue.submit_batched("two", times(2), i) for i in range(2)]
        gate.set()
        assert blocker.result(5) is True
        assert [f.result(5) for f in tens] == [1, 11, 21, 31, 41]
        assert [f.result(5) for f in twos] == [0, 2]
        assert calls == [("x10", [0, 1, 2]), ("x2", [0, 1]), ("x10", [3, 4])]
        assert queue.submit_batched("ten", times(10), 7).result(5) == 70  # alone: no waiting for company
        wait = time.monotonic() + 5
        while queue.pending and time.monotonic() < wait:
            time.sleep(0.01)
        assert queue.pending == 0

        def broken(items: list[int]) -> list[int]:
            raise ValueError("bad labels")

        gate.clear()
        blocker = queue.submit(gate.wait, 5)
        failing = [queue.submit_batched("bad", broken, i) for i in range(2)]
        gate.set()
        for future in failing:
            with pytest.raises(ValueError, match="bad labels"):
                future.result(5)
        blocker.result(5)
        assert queue.pending == 0
    finally:
        queue.close()


def test_concurrent_segment_requests_share_batches(
    models: Models, segmenter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that queue up behind a busy network go through it together, each still given its own
    image's masks (equal to the library's)."""
    app = api.create_app(models, Limits(queue_size=16))
    served = models.get("lseg-shapes")
    sizes: list[int] = []
    infer_many = served.infer_many
    monkeypatch.setattr(
        served, "infer_many", lambda items, **kw: sizes.append(len(items)) or infer_many(items, **kw)
    )
    images = [scene(i) for i in range(6)]
    expected = [segmenter.segment(image, LABELS).mask for image in images]
    with (
        serving(app) as url,
        httpx.Client(base_url=url, timeout=60) as c,
        ThreadPoolExecutor(6) as pool,
        blocked_segmenter(models, monkeypatch) as (entered, release),
    ):
        first = pool.submit(segment_request, c, images[0], LABELS, "json")
        assert entered.wait(30)  # the network is busy with the first request
        rest = [pool.submit(segment_request, c, image, LABELS, "json") for image in images[1:]]
        deadline = time.monotonic() + 30
        while app.state.queue.pending < len(images) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        responses = [first.result(60)] + [f.result(60) for f in rest]
    for response, mask in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(index_map(response.json()), mask)
    assert sizes[0] == 1 and sorted(sizes[1:]) == [5], sizes


# ------------------------------------------------------------------------------------ settings


def test_missing_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a)
    )
    with pytest.raises(BadConfigError, match="uvicorn") as info:
        api.require_serve_extra()
    assert info.value.hint == 'pip install "langseg[serve]"'


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token": ""},
        {"token": " x"},
        {"token": "tök"},
        {"limits": Limits(queue_size=0)},
        {"limits": Limits(timeout_s=-1)},
    ],
)
def test_bad_settings_are_config_errors(models: Models, kwargs: dict[str, Any]) -> None:
    with pytest.raises(BadConfigError):
        api.create_app(models, **kwargs)


def test_run_server_hands_settings_to_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several workers uvicorn imports the app by name; each builds it from the environment."""
    import torch

    calls: list[tuple[Any, dict[str, Any], Any]] = []
    threads: list[int] = []

    def fake_run(app: Any, **kwargs: Any) -> None:
        built = api.app_from_environment() if kwargs.get("factory") else app
        calls.append((app, kwargs, built))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    limits = Limits(max_labels=5, timeout_s=3.5)
    api.run_server(["vlt-shapes"], port=8123, workers=3, token="t0ken", limits=limits, device="cpu")
    app, kwargs, built = calls[0]
    assert app == "langseg.serve.api:app_from_environment"
    assert kwargs == {"factory": True, "host": "127.0.0.1", "port": 8123, "workers": 3}
    assert built.state.limits == limits and built.state.models.offered() == ["vlt-shapes"]
    assert threads == [16 // 3 - 1]  # each worker: its share of the cores, one left for the rest
    assert api.SETTINGS_ENV not in os.environ  # removed again after the run
    api.run_server(["vlt-shapes"], workers=1)
    assert calls[1][1] == {"host": "127.0.0.1", "port": 8000} and threads[1] == 15
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
    api.run_server(["vlt-shapes"])
    assert len(threads) == 2
    with pytest.raises(BadConfigError):
        api.run_server(["vlt-shapes"], workers=0)
    with pytest.raises(BadConfigError):
        api.app_from_environment()


# ------------------------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def api_schema(base: str) -> Any:
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_from_the_schema_gets_a_server_error(case: Any) -> None:
    """Schema-driven requests, valid and invalid (wrong types, random bytes as images, missing fields):
    none may get a 5xx."""
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
        timeout=60,
    )


# Hypothesis directly: fields that are mostly plausible (a real image, label words), sometimes of a wrong
# type or value, in both encodings, so that requests also get past the checks into inference.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
WORDS = st.sampled_from(
    ["red circle", "blue square", "star", "background", "other", "cat; kitten", "Ünïcode"]
)
LABEL_SETS = st.lists(WORDS, min_size=2, max_size=5, unique=True)  # valid label sets
TEXTS = st.lists(st.one_of(WORDS, st.text(max_size=10)), max_size=5)  # often invalid ones
PHRASES = st.sampled_from(["the red square", "the star", "the large circle on the left", "blue", "zzz"])
GOOD_IMAGE = st.sampled_from([GOOD_PNG, png_bytes(scene(3, size=32))])
IMAGES = st.one_of(
    GOOD_IMAGE,
    GOOD_IMAGE,
    st.binary(max_size=64),
    st.integers(1, len(GOOD_PNG) - 1).map(lambda cut: GOOD_PNG[:cut]),
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` about nine times in ten, else a value of any JSON type (one_of would draw the junk far
    more often: hypothesis favours the branches that vary most)."""
    return st.tuples(st.integers(0, 9), good, JUNK).map(lambda drawn: drawn[2] if drawn[0] == 4 else drawn[1])


SEGMENT_FIELDS = st.one_of(
    st.fixed_dictionaries(
        {"image": mostly(IMAGES), "labels": mostly(st.one_of(LABEL_SETS, LABEL_SETS.map(", ".join), TEXTS))},
        optional={
            "model": mostly(st.sampled_from(["lseg-shapes", "lseg-shapes", "", "nope", "vlt-shapes"])),
            "format": mostly(st.sampled_from(["rle", "png", "png", "PNG", ""])),
        },
    ),
    st.fixed_dictionaries(
        {
            "image": mostly(IMAGES),
            "labels": mostly(LABEL_SETS.map(lambda labels: list(dict.fromkeys([*labels, "background"])))),
            "background_threshold": mostly(st.one_of(st.floats(0.01, 0.99), st.floats())),
        }
    ),
)
REFER_EXTRA = {
    "model": mostly(st.sampled_from(["vlt-shapes", "vlt-shapes", "lseg-shapes", "x"])),
    "format": mostly(st.sampled_from(["rle", "png", "png", "jpeg"])),
}
REFER_FIELDS = st.one_of(
    st.fixed_dictionaries(
        {"image": mostly(IMAGES), "expression": mostly(st.one_of(PHRASES, st.text(max_size=12)))},
        optional=REFER_EXTRA,
    ),
    st.fixed_dictionaries(
        {
            "image": mostly(IMAGES),
            "expressions": mostly(st.one_of(st.lists(PHRASES, min_size=1, max_size=3), TEXTS)),
        },
        optional=REFER_EXTRA,
    ),
    st.fixed_dictionaries(
        {}, optional={"image": IMAGES, "expression": PHRASES, "expressions": TEXTS, **REFER_EXTRA}
    ),
)


def send_fields(client: httpx.Client, path: str, fields: dict[str, Any], encoding: str) -> httpx.Response:
    """``fields`` as JSON (bytes as base64) or as a form (bytes as a file, lists as repeated fields, the
    rest as text: UTF-8, or the raw bytes of its repr for strings that are not)."""
    if encoding == "json":
        body = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in fields.items()}
        # json.dumps, not httpx's json=: a generated inf or NaN goes out as the non-standard literal
        # (Infinity, NaN) that some clients send, which the server must refuse with a 4xx.
        text = json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return client.post(path, content=text, headers={"Content-Type": "application/json"})
    parts: list[tuple[str, Any]] = []
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bytes):
                parts.append((key, ("f.png", item, "image/png")))
            else:
                parts.append((key, (None, str(item).encode("utf-8", "surrogateescape"))))
    return client.post(path, files=parts or {"nothing": (None, b"")})


@given(fields=SEGMENT_FIELDS, encoding=st.sampled_from(["json", "multipart"]))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_segment_requests_never_get_a_server_error(
    client: httpx.Client, fields: dict[str, Any], encoding: str
) -> None:
    response = send_fields(client, "/segment", fields, encoding)
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert (index_map(body) >= 0).all()  # every pixel in exactly one segment
        assert all(0 < s["area"] <= 1 and 0 <= s["score"] <= 1 for s in body["segments"])
    else:
        assert set(body) == {"error", "message", "hint"}


@given(fields=REFER_FIELDS, encoding=st.sampled_from(["json", "multipart"]))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_refer_requests_never_get_a_server_error(
    client: httpx.Client, fields: dict[str, Any], encoding: str
) -> None:
    response = send_fields(client, "/refer", fields, encoding)
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert len(body["expressions"]) == len(body["texts"]) >= 1
        assert all(decode(e["mask"]).shape == tuple(body["size"]) for e in body["expressions"])
    else:
        assert set(body) == {"error", "message", "hint"}
