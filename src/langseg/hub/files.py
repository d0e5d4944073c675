"""Safe readers of model files: paths checked, config.json and safetensors parsed defensively, weights
checked for NaN, a network's expected tensors compared with a file's, and the one ``torch.load``.

Every function here turns bad input (a wrong type where a path belongs, a damaged, huge or hostile file)
into a :class:`~langseg.errors.LangsegError` that names the file, and never passes on a foreign message
with terminal escapes or advice to turn a safety guard off.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from langseg.errors import BadConfigError, BadDataError, LangsegError, MissingWeightsError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A model's config.json is a few KB (a VLT vocabulary of 10k words ~200 KB); refuse to parse far more.
MAX_CONFIG_BYTES = 16 << 20
# Terminal escape sequences (colours, cursor moves) that foreign messages (torch's) may carry.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_DAMAGED_HINT = "The file is damaged or was not written by langseg; re-export or re-convert the model."


def as_path(value: object, what: str) -> Path:
    """``value`` (a ``str`` or ``os.PathLike``) as a ``Path``; anything else (``None``, a number, bytes) is
    a :class:`BadConfigError` naming ``what``."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if isinstance(text, str) and text.strip() and "\x00" not in text:
            return Path(text)
    raise BadConfigError(
        f"{what} must be a file or folder path, got {type(value).__name__} {value!r:.80}",
        hint="Pass a str or pathlib.Path naming a langseg checkpoint folder or weights file.",
    )


def is_file(path: Path) -> bool:
    """``path.is_file()``, false also where the OS refuses to look (a name too long, no permission)."""
    try:
        return path.is_file()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    """``path.is_dir()``, false also where the OS refuses to look (a name too long, no permission)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in a model folder's ``config.json`` (``path``: the file or its folder).

    Raises:
        MissingWeightsError: there is no such file.
        BadDataError: unreadable, larger than :data:`MAX_CONFIG_BYTES`, not UTF-8, not JSON, nested too
            deeply for the parser, or JSON that is not an object; the message names the file.
    """
    path = as_path(path, "the config path")
    path = path / CONFIG_NAME if is_dir(path) else path
    hint = f'{CONFIG_NAME} is a JSON object such as {{"model": "vlt-shapes", ...}}. {_DAMAGED_HINT}'
    try:
        if not is_file(path):
            raise MissingWeightsError(f"{path} not found", hint=f"A model folder holds {CONFIG_NAME}.")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BadDataError(f"{path} is {path.stat().st_size} bytes, far too large for a model config")
        text = path.read_bytes().decode("utf-8-sig")
        config = json.loads(text)
    except UnicodeDecodeError as err:
        raise BadDataError(f"{path} is not UTF-8 text (byte {err.start})", hint=hint) from None
    except RecursionError:
        raise BadDataError(f"{path} is nested too deeply to be a model config", hint=hint) from None
    except json.JSONDecodeError as err:
        raise BadDataError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})", hint=hint) from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise BadDataError(f"{path} is not usable JSON ({clean_message(err)})", hint=hint) from None
    except OSError as err:
        raise BadDataError(
            f"cannot read {path}: {err.strerror or err}", hint="Check its permissions."
        ) from None
    if not isinstance(config, dict):
        raise BadDataError(f"{path} holds a JSON {_json_kind(config)}, not an object", hint=hint)
    return config


def _json_kind(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, each checked to be finite (:func:`check_finite`).

    Raises:
        BadDataError: the file is empty, truncated, its header is malformed or lies about the data, or
            a tensor holds NaN or infinity.
    """
    path = as_path(path, "the weights path")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as err:
        raise BadDataError(
            f"{path} is not a readable safetensors file ({clean_message(err)})", hint=_DAMAGED_HINT
        ) from None
    check_finite(state, path)
    return state


def check_finite(state: Mapping[str, Any], source: str | Path) -> None:
    """A :class:`BadDataError` naming the tensors of ``state`` that hold NaN or infinity.

    Weights like that load without a word and then give NaN scores and arbitrary masks.
    """
    bad = [key for key, value in state.items() if isinstance(value, torch.Tensor) and not _finite(value)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise BadDataError(
            f"{source}: tensor(s) {shown} hold NaN or infinite values",
            hint="The weights are damaged (or training diverged before they were saved); use another "
            "checkpoint, e.g. an earlier step.",
        )


def _finite(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
        return True
    if tensor.dtype.itemsize == 1:  # float8 kinds have no isfinite kernel
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> str | None:
    """How ``state`` fails to fit a network whose ``state_dict()`` is ``expected`` (shapes and dtypes;
    ``expected`` may live on the meta device), naming the first mismatching key; ``None`` if it fits.

    A floating tensor fits a floating parameter of another precision (it is cast, as
    ``load_state_dict`` does); an integer or boolean tensor where a float belongs does not.
    """
    for key, want in expected.items():
        have = state.get(key)
        if have is None:
            return f"tensor {key!r} is missing ({_count(expected, state)})"
        if not isinstance(have, torch.Tensor):
            return f"{key!r} is a {type(have).__name__}, not a tensor"
        if tuple(have.shape) != tuple(want.shape):
            return f"tensor {key!r} has shape {tuple(have.shape)}, the network wants {tuple(want.shape)}"
        if _kind(have.dtype) != _kind(want.dtype):
            return f"tensor {key!r} is {have.dtype}, the network wants {want.dtype}"
    extra = [key for key in state if key not in expected]
    if extra:
        return f"tensor {extra[0]!r} is not part of the network ({_count(expected, state)})"
    return None


def _count(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    missing = sum(1 for key in expected if key not in state)
    unexpected = sum(1 for key in state if key not in expected)
    return f"{missing} missing, {unexpected} unexpected in all"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "integer"


def file_in_folder(folder: str | Path, name: object, what: str) -> Path:
    """The file ``name`` (a relative path that a config file in ``folder`` names) inside ``folder``.

    Paths in a model folder stay inside it: an absolute path, ``..``, or a symlink leading out is a
    :class:`BadDataError`, so a folder from elsewhere cannot make langseg open other files.
    """
    folder = Path(folder)
    hint = f"A model folder names its own files by relative paths inside it. {_DAMAGED_HINT}"
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise BadDataError(f"{what} in {folder} must be a file name, got {name!r:.80}", hint=hint)
    relative = PurePath(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise BadDataError(f"{what} {name!r:.80} in {folder} points outside the model folder", hint=hint)
    target = folder / relative
    try:
        inside = target.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise BadDataError(f"{what} {name!r:.80} in {folder} cannot be resolved: {err}", hint=hint) from None
    if not inside:
        raise BadDataError(f"{what} {name!r:.80} in {folder} links outside the model folder", hint=hint)
    return target


@contextlib.contextmanager
def reading_config(source: str | Path, what: str) -> Iterator[None]:
    """Where values of a model folder's ``config.json`` enter code (builders, tokenizers, plans): an
    exception they raise is a :class:`BadDataError` naming the file and ``what`` was being built.

    Builders and tokenizers check arguments with ``TypeError``/``ValueError``/assertions as Python code
    does; for a config file those all mean one thing: the file does not describe a usable model.
    """
    try:
        yield
    except LangsegError as err:
        raise BadDataError(f"{source}: {what}: {err.message}", hint=err.hint) from err
    except (
        TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError, OverflowError,
        ZeroDivisionError, RuntimeError, MemoryError,
    ) as err:  # fmt: skip
        raise BadDataError(
            f"{source}: {what} failed ({type(err).__name__}: {clean_message(err)})", hint=_DAMAGED_HINT
        ) from err


def clean_message(err: BaseException, limit: int = 300) -> str:
    """A foreign exception's message fit to show: terminal escapes stripped, any sentence advising to
    turn ``weights_only`` off dropped, whitespace collapsed, at most ``limit`` characters."""
    text = _ANSI.sub("", str(err))
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = [s for s in sentences if not re.search(r"weights_only[`'\"]?\s*(?:=|set to|to)\s*[`'\"]?False", s)]
    text = " ".join(" ".join(kept).split())
    return (text[: limit - 3] + "...") if len(text) > limit else (text or type(err).__name__)


def refused_pickle_message(path: str | Path, err: BaseException, allowed: Sequence[str] = ()) -> str:
    """What a refused pickle holds: the globals it names (read from its opcodes, nothing runs) that
    ``allowed`` does not cover, else the unpickler's own reason; never torch's advice to turn the guard off.
    """
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # legacy or damaged files: fall back to the unpickler's reason
        names = []
    if names:
        return ", ".join(names)
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Please use|\s*Check the documentation|$)",
                       _ANSI.sub("", str(err)), re.S)  # fmt: skip
    return " ".join(detail.group(1).split()).rstrip(".") if detail else clean_message(err, 200)


def torch_load_safely(path: str | Path, safe_globals: Sequence[tuple[Any, str]] = ()) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no pickled code runs): the one
    ``torch.load`` in langseg. ``safe_globals``: ``(stand-in, name)`` pairs allowed for this load only.

    Raises:
        MissingWeightsError: no file at ``path``.
        BadDataError: the file pickles anything else (refused for safety: the message names it), or is
            truncated or not a PyTorch file.
    """
    path = as_path(path, "the checkpoint path")
    if not is_file(path):
        raise MissingWeightsError(f"checkpoint not found: {path}", hint="Check the path you passed.")
    try:
        # Scoped, not global: other loads in the process keep the default allowlist.
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = refused_pickle_message(path, err, [name for _, name in safe_globals])
        raise BadDataError(
            f"{path} contains pickled objects that safe loading refuses: {refused}",
            hint="langseg reads only tensors and plain containers from PyTorch files (torch.load with "
            "weights_only=True) and never runs pickled code: ask for a state_dict saved on its own or a "
            ".safetensors file, or convert the checkpoint with `langseg convert`.",
        ) from None
    except Exception as err:  # truncated zip, bad magic, EOF, ...: not a readable file
        raise BadDataError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {clean_message(err, 200)})",
            hint=_DAMAGED_HINT,
        ) from None


def config_dict(config: Mapping[str, Any], key: str, source: str | Path) -> dict[str, Any]:
    """``config[key]``, a JSON object (``{}`` when absent or null); another kind is a
    :class:`BadDataError`."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadDataError(
            f"{source}: {key!r} must be a JSON object, got a {_json_kind(value)}", hint=_DAMAGED_HINT
        )
    return value


def config_normalisation(
    preprocess: Mapping[str, Any], source: str | Path, mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` of a config's ``preprocess`` (defaults: ``mean``, ``std``), each three finite
    numbers, the deviations positive."""
    out = []
    for key, default in (("mean", mean), ("std", std)):
        value = preprocess.get(key, default)
        ok = isinstance(value, (list, tuple)) and len(value) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ok = ok and all(float("-inf") < v < float("inf") and (key == "mean" or v > 0) for v in value)
        if not ok:
            want = "three finite numbers" + (", all above zero" if key == "std" else "")
            message = f"{source}: preprocess {key!r} must be {want}, got {value!r:.80}"
            raise BadDataError(message, hint=_DAMAGED_HINT)
        out.append(tuple(float(v) for v in value))
    return out[0], out[1]  # type: ignore[return-value]
