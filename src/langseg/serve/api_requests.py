"""Reading a ``/segment`` or ``/refer`` request, sent as JSON or as multipart/form-data, into one checked
query, so that the routes see neither encoding.

Both encodings carry the same fields. JSON sends the image as base64 and lists as arrays; a form sends
the image as a file part, labels as one comma-separated field or as repeated fields, expressions as
repeated fields. What can be checked without the model is checked here, before the image is decoded
or a queue place taken: which fields, of which types, the labels and expressions (the service's limits
and the predictor's own model-free checks). Every failure is a :class:`~langseg.errors.LangsegError`
that :mod:`langseg.serve.api_http` turns into a 4xx answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from anyio import to_thread
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from langseg.errors import BadExpressionError, BadLabelsError, LangsegError
from langseg.predict.referrer import check_expression_text
from langseg.predict.segmenter import check_labels as check_label_set
from langseg.serve.api_http import InvalidRequestError, MalformedRequestError, UnsupportedMediaTypeError
from langseg.serve.service import Limits, check_expressions, check_labels, decode_base64, split_labels

SEGMENT_FIELDS = frozenset({"image", "labels", "model", "format", "background_threshold"})
REFER_FIELDS = frozenset({"image", "expression", "expressions", "model", "format"})
FORMATS = ("rle", "png")
DOCS_HINT = "See /docs (or /openapi.json) for the fields of each request."
LARGE_BODY = 1 << 18


@dataclass
class SegmentQuery:
    """A checked ``/segment`` request; ``image`` is still the file's bytes (decoded off the event loop)."""

    image: bytes
    labels: list[str]
    model: str | None
    png: bool
    background_threshold: float | None


@dataclass
class ReferQuery:
    """A checked ``/refer`` request."""

    image: bytes
    texts: list[str]
    model: str | None
    png: bool


@dataclass
class FilePart:
    """A file part of a form, read (its size is bounded by the body limit)."""

    filename: str | None
    data: bytes


@dataclass
class Fields:
    """The fields of one request: name -> the values sent (JSON: one each, ``null`` left out; a form: as
    many as the field was repeated)."""

    values: dict[str, list[Any]]
    form: bool

    def all(self, name: str) -> list[Any]:
        return self.values.get(name, [])

    def one(self, name: str, required: bool = False, hint: str = DOCS_HINT) -> Any:
        """The field's single value, ``None`` when absent; more than one is an error."""
        values = self.all(name)
        if len(values) > 1:
            raise InvalidRequestError(
                f"the field {name!r} was sent {len(values)} times", hint="Send it once."
            )
        if not values:
            if required:
                raise InvalidRequestError(f"the field {name!r} is missing", hint=hint)
            return None
        return values[0]


# ------------------------------------------------------------------------------------ bodies


async def read_fields(request: Request, allowed: frozenset[str], limits: Limits) -> Fields:
    """The request's fields, by its Content-Type; unknown fields are an error (a typo such as ``label``
    would otherwise be silently ignored)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        fields = await _json_fields(request)
    elif media_type == "multipart/form-data":
        fields = await _form_fields(request, limits)
    else:
        shown = repr(media_type[:60]) if media_type else "missing"
        raise UnsupportedMediaTypeError(
            f"the Content-Type is {shown}, not application/json or multipart/form-data"
        )
    unknown = sorted(set(fields.values) - allowed)
    if unknown:
        raise InvalidRequestError(
            f"unknown field {unknown[0]!r:.60}"
            + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""),
            hint=f"The fields of this request are: {', '.join(sorted(allowed))}.",
        )
    return fields


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")  # Python's json reads NaN and Infinity; JSON has neither


async def _json_fields(request: Request) -> Fields:
    try:
        body = await request.body()
    except ClientDisconnect:
        raise MalformedRequestError("the client disconnected before sending the whole body") from None
    parse = partial(json.loads, body, parse_constant=_not_json_constant)
    try:
        # A large body (base64 images reach megabytes) is parsed off the event loop, not to stall it.
        data = parse() if len(body) < LARGE_BODY else await to_thread.run_sync(parse)
    except RecursionError:
        raise MalformedRequestError("the JSON body is nested too deeply") from None
    except ValueError as err:  # also a body that is not UTF-8, and integers of over 4300 digits
        raise MalformedRequestError(f"the body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(
            f"the JSON body must be an object, got {_kind(data)}",
            hint='Send {"image": "<base64>", "labels": ["cat", "other"]}.',
        )
    return Fields({key: [value] for key, value in data.items() if value is not None}, form=False)


async def _form_fields(request: Request, limits: Limits) -> Fields:
    try:
        # Few files and fields: more than a request can use is refused while parsing, not after.
        form = await request.form(max_files=4, max_fields=limits.max_labels + limits.max_expressions + 16)
    except HTTPException as err:  # starlette's answer to malformed multipart data
        raise MalformedRequestError(f"the multipart body cannot be read: {err.detail}") from None
    except ClientDisconnect:
        raise MalformedRequestError("the client disconnected before sending the whole body") from None
    values: dict[str, list[Any]] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = FilePart(value.filename, await value.read())
            values.setdefault(key, []).append(value)
    finally:
        await form.close()
    return Fields(values, form=True)


# ------------------------------------------------------------------------------------ fields


def _kind(value: Any) -> str:
    """What a value is, in JSON's words (a form's file part is a file)."""
    if isinstance(value, FilePart):
        return "a file"
    names = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
    }
    return names.get(type(value), "an object")


def _text(value: Any, what: str, error: type[LangsegError] = InvalidRequestError) -> str:
    """``value`` if it is a string that can be written as UTF-8."""
    if not isinstance(value, str):
        raise error(f"{what} must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry "\ud800", a lone surrogate: not text
        raise error(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def image_bytes(fields: Fields) -> bytes:
    """The image file's bytes: a file part of a form, or base64 in JSON."""
    value = fields.one("image", required=True, hint="Send the image as a file part, or as base64 in JSON.")
    if fields.form:
        if not isinstance(value, FilePart):
            raise InvalidRequestError(
                "the field 'image' must be a file part, got a text field",
                hint="Send the file itself, e.g. curl -F image=@photo.jpg (or base64 in a JSON body).",
            )
        return value.data
    return decode_base64(_text(value, "the field 'image'"))


def labels_of(fields: Fields, limits: Limits) -> list[str]:
    """The labels: one comma-separated string, a JSON array, or repeated form fields."""
    values = fields.all("labels")
    if not values:
        raise InvalidRequestError(
            "the field 'labels' is missing",
            hint='Send "labels": ["cat", "sofa", "other"] (or "cat, sofa, other").',
        )
    if fields.form:
        texts = [_text(v, "the field 'labels'") for v in values]
        labels = split_labels(texts[0] if len(texts) == 1 else texts)
    elif isinstance(values[0], str):
        labels = split_labels(_text(values[0], "labels", BadLabelsError))
    elif isinstance(values[0], list):
        labels = split_labels([_text(v, "every label", BadLabelsError) for v in values[0]])
    else:
        raise BadLabelsError(
            f"labels must be an array of strings or one comma-separated string, got {_kind(values[0])}"
        )
    return check_labels(labels, limits)


def threshold_of(fields: Fields) -> float | None:
    """``background_threshold`` as a float (range-checked with the labels), or ``None``."""
    value = fields.one("background_threshold")
    if fields.form and value is not None:
        value = _text(value, "the field 'background_threshold'").strip() or None
        try:
            return None if value is None else float(value)
        except ValueError:
            raise InvalidRequestError(f"background_threshold must be a number, got {value!r:.40}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"background_threshold must be a number, got {_kind(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise InvalidRequestError("background_threshold must be in (0, 1), got a huge integer") from None


def model_of(fields: Fields) -> str | None:
    value = fields.one("model")
    return None if value is None else (_text(value, "the field 'model'") or None)


def png_of(fields: Fields) -> bool:
    """Whether the answer also carries the PNG mask and overlay (``format`` "png"; default "rle")."""
    value = fields.one("format")
    if value is None or value == "":
        return False
    if value not in FORMATS:
        shown = repr(value[:40]) if isinstance(value, str) else _kind(value)
        raise InvalidRequestError(
            f"format must be rle or png, got {shown}", hint='Send "format": "rle" or "png".'
        )
    return value == "png"


def expressions_of(fields: Fields, limits: Limits) -> list[str]:
    """The expressions: ``expression`` (one string) or ``expressions`` (a JSON array / repeated fields)."""
    one, many = fields.all("expression"), fields.all("expressions")
    if one and many:
        raise InvalidRequestError("send either 'expression' or 'expressions', not both")
    if not one and not many:
        raise InvalidRequestError(
            "the field 'expression' is missing",
            hint='Send "expression": "the red square" (or "expressions": ["...", "..."]).',
        )
    if fields.form:
        texts = [_text(v, "every expression", BadExpressionError) for v in one or many]
        if len(one) > 1:
            raise InvalidRequestError(
                "the field 'expression' was sent twice", hint="Repeat 'expressions' instead."
            )
    elif one:
        texts = [_text(one[0], "expression", BadExpressionError)]
    elif isinstance(many[0], list):
        texts = [_text(v, "every expression", BadExpressionError) for v in many[0]]
    else:
        raise BadExpressionError(
            f"expressions must be an array of strings, got {_kind(many[0])}",
            hint='For one expression send "expression": "the red square".',
        )
    check_expressions(texts, limits)
    return [check_expression_text(text) for text in texts]


async def segment_query(request: Request, limits: Limits) -> SegmentQuery:
    """The checked fields of a ``/segment`` request."""
    fields = await read_fields(request, SEGMENT_FIELDS, limits)
    labels, threshold = labels_of(fields, limits), threshold_of(fields)
    # The predictor's own checks (empty, duplicate or a single label; a threshold without a background
    # label), made now so that a bad label set takes no queue place and no image decoding.
    check_label_set(labels, threshold)
    return SegmentQuery(image_bytes(fields), labels, model_of(fields), png_of(fields), threshold)


async def refer_query(request: Request, limits: Limits) -> ReferQuery:
    """The checked fields of a ``/refer`` request."""
    fields = await read_fields(request, REFER_FIELDS, limits)
    texts = expressions_of(fields, limits)
    return ReferQuery(image_bytes(fields), texts, model_of(fields), png_of(fields))
