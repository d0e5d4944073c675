"""The OpenAPI description of :mod:`langseg.serve.api`: the two encodings of each request body (the routes
read the body themselves, so FastAPI cannot infer them) and the shapes of the answers and errors.

The answer models only document: the routes return the JSON that :mod:`langseg.serve.service` builds,
without validating it again.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from langseg.serve.service import Limits


class ErrorAnswer(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="The kind of error: a langseg error class name, e.g. BadImageError.")
    message: str = Field(description="What was wrong with the request.")
    hint: str = Field(description="What to do about it.")


class RLE(BaseModel):
    """A mask as COCO run-length encoding (``pycocotools.mask.decode`` reads it)."""

    size: list[int] = Field(description="[height, width]")
    counts: str


class Segment(BaseModel):
    index: int = Field(description="The label's position in labels: the mask's pixel value.")
    label: str
    area: float = Field(description="Share of the image, in (0, 1].")
    score: float = Field(description="The mean probability of this label over its own pixels.")
    mask: RLE


class SegmentAnswer(BaseModel):
    model: str
    task: Literal["semantic"]
    labels: list[str]
    size: list[int] = Field(description="[height, width] of the image.")
    segments: list[Segment] = Field(description="The labels that cover any pixel.")
    mask_png: str | None = Field(None, description='With format "png": the label map, base64 palette PNG.')
    overlay_png: str | None = Field(None, description='With format "png": the overlay, base64 PNG.')


class Expression(BaseModel):
    index: int = Field(description="The expression's value in mask_png (from 1).")
    text: str
    score: float = Field(description="The model's confidence in the mask, in [0, 1].")
    area: float
    mask: RLE


class ReferAnswer(BaseModel):
    model: str
    task: Literal["referring"]
    texts: list[str]
    size: list[int]
    expressions: list[Expression]
    mask_png: str | None = Field(None, description='With format "png": 0 nothing, k expression k.')
    overlay_png: str | None = None


class ModelInfo(BaseModel):
    name: str
    task: Literal["semantic", "referring"]
    default: bool = Field(description="Whether a request without 'model' gets this one.")
    loaded: bool


class ModelsAnswer(BaseModel):
    models: list[ModelInfo]


class HealthAnswer(BaseModel):
    status: Literal["ok"]
    ready: bool = Field(description="Whether the default models are loaded.")
    pending: int = Field(description="Requests waiting or running now.")
    queue_size: int


# A 16 x 16 PNG (a red square on grey): the examples run as they are in /docs.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAALUlEQVR42mNsaGhgIAUwMZAIaK+BBZkTM28eVkVLkpIGsx+GgwYW"
    "XOE9hPwAAGhWBgzeJzXEAAAAAElFTkSuQmCC"
)
_MODEL = {"type": "string", "description": "A model this server offers (GET /models); default: the task's."}
_FORMAT = {
    "type": "string",
    "enum": ["rle", "png"],
    "default": "rle",
    "description": 'rle: masks as COCO RLE; png: also "mask_png" and "overlay_png" (base64 PNG).',
}
_THRESHOLD = {
    "type": "number",
    "exclusiveMinimum": 0,
    "exclusiveMaximum": 1,
    "description": "Pixels whose top probability is lower go to the label 'background' (or 'other').",
}
_IMAGE_FILE = {"type": "string", "format": "binary", "description": "An image file (PNG, JPEG, ...)."}
_IMAGE_BASE64 = {
    "type": "string",
    "format": "byte",
    "description": "The image file as base64 (a data: URL prefix is allowed).",
}


def _body(form: dict[str, Any], json_: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is either multipart/form-data or JSON."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": json_, "example": example},
            },
        }
    }


def _texts(most: int, chars: int, description: str) -> dict[str, Any]:
    """A list of texts, each with a visible character (the server's limits as bounds)."""
    item = {"type": "string", "minLength": 1, "maxLength": chars, "pattern": "\\S"}
    return {"type": "array", "items": item, "minItems": 1, "maxItems": most, "description": description}


def segment_body(limits: Limits) -> dict[str, Any]:
    """The ``/segment`` request body, with this server's limits."""
    text = {"type": "string", "description": "Comma-separated labels, e.g. 'cat, sofa, other'."}
    labels = _texts(limits.max_labels, limits.max_label_chars, "Two or more distinct labels.")
    fields = {"model": _MODEL, "format": _FORMAT, "background_threshold": _THRESHOLD}
    return _body(
        form={
            "type": "object",
            "required": ["image", "labels"],
            "properties": {
                "image": _IMAGE_FILE,
                "labels": {
                    **text,
                    "description": text["description"] + " Or repeat the field, a label each.",
                },
                **fields,
            },
        },
        json_={
            "type": "object",
            "required": ["image", "labels"],
            "additionalProperties": False,
            "properties": {
                "image": _IMAGE_BASE64,
                "labels": {"anyOf": [{**labels, "minItems": 2, "uniqueItems": True}, text]},
                **fields,
            },
        },
        example={"image": EXAMPLE_IMAGE, "labels": ["red square", "background"]},
    )


def refer_body(limits: Limits) -> dict[str, Any]:
    """The ``/refer`` request body, with this server's limits."""
    one = {"type": "string", "minLength": 1, "maxLength": limits.max_expression_chars, "pattern": "\\S"}
    many = _texts(limits.max_expressions, limits.max_expression_chars, "Expressions, each naming one object.")
    fields = {"model": _MODEL, "format": _FORMAT}
    return _body(
        form={
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": _IMAGE_FILE,
                "expression": {**one, "description": "One expression (or repeat the field 'expressions')."},
                "expressions": many,
                **fields,
            },
        },
        json_={
            "type": "object",
            "required": ["image"],
            "additionalProperties": False,
            "description": "Send 'expression' or 'expressions', not both.",
            "properties": {"image": _IMAGE_BASE64, "expression": one, "expressions": many, **fields},
        },
        example={"image": EXAMPLE_IMAGE, "expression": "the red square"},
    )


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorAnswer, "description": description}


AUTH_ERRORS = {401: _error("A bearer token is needed (the server was started with one) and was not sent.")}
REQUEST_ERRORS = {
    **AUTH_ERRORS,
    400: _error("The image cannot be read (not an image, truncated, bad base64), or the body is malformed."),
    413: _error("The body or the image is over the server's limits."),
    415: _error("The body is neither JSON nor multipart/form-data."),
    422: _error("A field is missing, of the wrong type or value; bad labels or expressions; unknown model."),
    503: _error("The queue is full or the request timed out; retry after the Retry-After seconds."),
}
