"""The manifest of an exported folder (``manifest.json``): what the graphs are and everything the ONNX
predictor needs around them (preprocessing, test-time plan, prompt templates, tokeniser, thresholds).

Written last, so a folder with a manifest is complete; read with every field checked, so a damaged or
foreign file is a :class:`~langseg.errors.BadDataError` that says what to do, never a crash later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langseg.errors import BadDataError, MissingWeightsError

MANIFEST_NAME = "manifest.json"
FORMAT = "langseg-onnx"
FORMAT_VERSION = 1
# The graphs each task's folder holds (file NAME.onnx each).
TASK_GRAPHS = {"semantic": ("image", "text", "classify"), "referring": ("model",)}
REEXPORT_HINT = "Export the model again: langseg export MODEL --format onnx --out DIR --overwrite."


def is_exported_folder(path: Any) -> bool:
    """Whether ``path`` is a folder holding a :data:`MANIFEST_NAME` (cheap: nothing is read)."""
    try:
        folder = Path(path)
        return folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    except (TypeError, ValueError, OSError):  # not a path, a NUL byte, a name too long
        return False


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` (JSON-able) as ``folder / manifest.json``."""
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _field(manifest: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise BadDataError(f"{path}: {key!r} is missing or malformed (got {value!r:.80})", hint=REEXPORT_HINT)
    return value


def read_manifest(folder: Path) -> dict[str, Any]:
    """The checked manifest of an exported ``folder``.

    Raises:
        MissingWeightsError: the manifest or one of the graph files it names is missing.
        BadDataError: the manifest is not JSON, not a langseg ONNX manifest, of a newer format, or
            names its task, family or graphs wrongly.
    """
    path = folder / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise MissingWeightsError(f"{folder} has no {MANIFEST_NAME}", hint=REEXPORT_HINT) from err
    except (OSError, UnicodeDecodeError) as err:
        raise BadDataError(f"cannot read {path}: {err}", hint=REEXPORT_HINT) from err
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise BadDataError(f"{path} is not valid JSON ({str(err)[:120]})", hint=REEXPORT_HINT) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadDataError(
            f'{path} is not a langseg ONNX manifest (no "format": "{FORMAT}")', hint=REEXPORT_HINT
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise BadDataError(
            f"{path} has format_version {version!r:.40}; this langseg reads 1 to {FORMAT_VERSION}",
            hint="Upgrade langseg, or export the model again with this version.",
        )
    task = _field(manifest, "task", str, path)
    if task not in TASK_GRAPHS:
        raise BadDataError(f"{path}: unknown task {task!r:.40}", hint=REEXPORT_HINT)
    _field(manifest, "family", str, path)
    _field(manifest, "model", str, path)
    _field(manifest, "predictor", dict, path)
    graphs = _field(manifest, "graphs", dict, path)
    for name in TASK_GRAPHS[task]:
        entry = graphs.get(name)
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".onnx"):
            raise BadDataError(
                f"{path}: graph {name!r} names no .onnx file in the folder", hint=REEXPORT_HINT
            )
        if not (folder / file).is_file():
            raise MissingWeightsError(f"{folder / file} is missing (named by {path})", hint=REEXPORT_HINT)
    return manifest
