"""Reading annotation files that may be malformed: one :class:`~langseg.errors.BadDataError` naming the
file (and the entry) and what was expected, never a ``KeyError`` or ``UnicodeDecodeError`` traceback.

Used by every loader of :mod:`langseg.data` for list files, JSON annotations and COCO segmentations.
COCO segmentations are checked *before* pycocotools sees them: its C decoder loops for ever on negative
RLE run lengths and on polygons with infinite or astronomically large coordinates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from langseg.errors import BadDataError

__all__ = ["check_segmentation", "entry_field", "read_json", "read_text", "short"]

DEFAULT_HINT = "Re-download or re-extract the file; see docs/data.md for the expected layout."


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (annotation values can be megabytes long)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (dict, list, tuple)) and len(value) > 8:
        return f"<a {type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path, what: str, hint: str = DEFAULT_HINT) -> str:
    """The UTF-8 text of ``path``; BadDataError if missing, unreadable or not UTF-8 (with the byte)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadDataError(f"cannot read {what} {path}: {err.strerror or err}", hint=hint) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadDataError(
            f"{what} {path} is not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x})", hint=hint
        ) from None


def read_json(path: Path, what: str, hint: str = DEFAULT_HINT, expect: type = dict) -> Any:
    """The JSON in ``path``, which must be of type ``expect`` (a mapping by default)."""
    text = read_text(path, what, hint)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadDataError(
            f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", hint=hint
        ) from None
    except RecursionError:
        raise BadDataError(f"{what} {path} is nested too deeply to read", hint=hint) from None
    if not isinstance(data, expect):
        kind = "an object {...}" if expect is dict else "a list [...]"
        raise BadDataError(f"{what} {path} must hold {kind}, not {type(data).__name__}", hint=hint)
    return data


def entry_field(
    entry: Any, key: str, types: type | tuple[type, ...], where: str, hint: str = DEFAULT_HINT
) -> Any:
    """``entry[key]``, which must exist and be of ``types``; ``where`` names the entry and its file."""
    if not isinstance(entry, dict):
        raise BadDataError(f"{where}: expected an object with {key!r}, got {short(entry)}", hint=hint)
    if key not in entry:
        raise BadDataError(f"{where} lacks {key!r} (keys: {short(sorted(map(str, entry)))})", hint=hint)
    value = entry[key]
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if not isinstance(value, types) or bad_bool:
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadDataError(f"{where}: {key!r} must be {names}, got {short(value)}", hint=hint)
    return value


def _string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in Python, bounded)."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("the RLE string ends inside a number")
            code = ord(counts[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[pos]!r} is not in an RLE string")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            pos, shift = pos + 1, shift + 1
            if shift > 13:
                raise ValueError("an RLE run length is too long")
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_segmentation(
    segmentation: Any, height: int, width: int, where: str, hint: str = DEFAULT_HINT
) -> None:
    """BadDataError unless ``segmentation`` is a COCO polygon list or RLE that decodes to ``H x W``."""

    def fail(why: str) -> BadDataError:
        return BadDataError(f"{where}: bad segmentation ({why}): {short(segmentation, 60)}", hint=hint)

    if isinstance(segmentation, list):
        if not segmentation:
            raise fail("an empty polygon list")
        limit = 2 * max(height, width, 1)
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                raise fail("each polygon must be a list of at least 3 x, y pairs")
            for v in polygon:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise fail("polygon coordinates must be finite numbers")
                if not -limit <= v <= limit:
                    raise fail(f"a coordinate {v} lies far outside the {width} x {height} image")
        return
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise fail("expected polygons [[x, y, ...]] or an RLE {size, counts}")
    size = segmentation["size"]
    if not isinstance(size, list) or len(size) != 2 or list(size) != [height, width]:
        raise fail(f"its size must be [{height}, {width}], the image's")
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            raise fail("compressed counts must be ASCII") from None
    if isinstance(counts, str):
        try:
            runs = _string_counts(counts)
        except ValueError as err:
            raise fail(str(err)) from None
    elif isinstance(counts, list):
        runs = counts
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in runs):
            raise fail("run lengths must be integers")
    else:
        raise fail("counts must be a list of run lengths or a compressed string")
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise fail(f"run lengths must be >= 0 and sum to {height} x {width} = {height * width}")
