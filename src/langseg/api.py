"""The public entry points: ``load`` (a ready predictor), ``create_model`` (a bare nn.Module) and
``list_models``.

Every name goes through the registry (:mod:`langseg.registry`, filled by :mod:`langseg.zoo`), every
weights file through :func:`langseg.hub.resolve_weights`, and every family's options through its typed
options dataclass, checked before anything heavy happens.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import typing
from pathlib import Path
from typing import Any

import torch

from langseg.errors import BadConfigError, LangsegError, MissingWeightsError
from langseg.hub import CONFIG_NAME, weights_available
from langseg.predict.base import check_device
from langseg.registry import ModelEntry, get_family, get_model_entry, model_entries


def _zoo() -> None:
    """Families register their entries on import; importing here keeps ``import langseg`` light."""
    import langseg.zoo  # noqa: F401


MODEL_HINT = "Pass a registry name (`langseg models` lists them) or a langseg checkpoint folder."


def _short(value: object) -> str:
    """``value`` for a message: long ones are cut in the middle."""
    text = str(value)
    return text if len(text) <= 200 else f"{text[:90]}...{text[-90:]} ({len(text)} characters)"


def _check_model_argument(model: Any) -> str | Path:
    """``model`` if it is a non-empty name or a path; anything else (``None``, ``3``) a BadConfigError."""
    if isinstance(model, os.PathLike) and not isinstance(model, Path):
        model = Path(os.fspath(model)) if isinstance(os.fspath(model), str) else model
    if not isinstance(model, (str, Path)):
        raise BadConfigError(
            f"model must be a registry name or a checkpoint path, got {type(model).__name__} {model!r:.80}",
            hint=MODEL_HINT,
        )
    if isinstance(model, str) and not model.strip():
        raise BadConfigError("the model name is empty", hint=MODEL_HINT)
    return model


def _check_weights_argument(weights: Any) -> Path | None:
    """``weights`` as a path (or ``None``); an empty string or another type is a BadConfigError."""
    if weights is None:
        return None
    if isinstance(weights, str) and not weights.strip():
        raise BadConfigError("the weights path is empty", hint="Pass the path of a weights file or folder.")
    if not isinstance(weights, (str, os.PathLike)) or not isinstance(os.fspath(weights), str):
        raise BadConfigError(
            f"weights must be a path, got {type(weights).__name__} {weights!r:.80}",
            hint="Pass the path of a weights file or folder (str or pathlib.Path), or leave it out.",
        )
    return Path(weights)


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; one the OS will not look at (too long, permission denied) is a
    :class:`MissingWeightsError` saying why."""
    try:
        return path.exists()
    except OSError as err:
        raise MissingWeightsError(
            f"cannot open {_short(path)}: {err.strerror or err}",
            hint="Check the path you passed (its length and the permissions of its folders).",
        ) from err


def _entry_and_weights(model: Any, weights: Any) -> tuple[ModelEntry, Path | None]:
    """The entry a name or a checkpoint folder means, and the local weights to use (``None``: its own)."""
    _zoo()
    model = _check_model_argument(model)
    local = _check_weights_argument(weights)
    path = Path(model)
    looks_like_path = isinstance(model, Path) or ("/" in model and ":" not in model)
    if not looks_like_path:
        try:
            is_file_or_folder = path.exists()
        except OSError:  # e.g. a name too long to be a file name: then it is only a name
            is_file_or_folder = False
        if not is_file_or_folder:
            return get_model_entry(str(model)), local
    if not _exists(path):
        raise MissingWeightsError(f"checkpoint not found: {_short(path)}", hint="Check the path you passed.")
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise MissingWeightsError(
            f"{config_file} not found next to the checkpoint",
            hint="Pass a langseg checkpoint folder (model.safetensors + config.json), or a registry name "
            "with weights=PATH for other files.",
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        name = config["model"]
    except OSError as err:
        raise MissingWeightsError(f"cannot read {config_file}: {err.strerror or err}") from err
    except (KeyError, TypeError, ValueError, RecursionError) as err:  # ValueError: JSON and UTF-8 errors
        raise BadConfigError(
            f"{config_file} does not name its model ('model' key)",
            hint='A langseg checkpoint\'s config.json is an object such as {"model": "lseg-shapes", ...}.',
        ) from err
    if not isinstance(name, str):
        raise BadConfigError(f"{config_file}: 'model' must be a registry name, got {name!r:.80}")
    return get_model_entry(name), path if local is None else local


def _is_exported(model: Any) -> bool:
    """Whether ``model`` names an exported ONNX folder (one holding the export manifest)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    from langseg.export.manifest import is_exported_folder

    return is_exported_folder(model)


def model_entry(model: str | Path) -> ModelEntry:
    """The registry entry a name or a checkpoint folder stands for, without reading any weights (e.g. to
    check a model's ``task`` before loading it)."""
    return _entry_and_weights(model, None)[0]


def resolve_device(device: str | int | torch.device | None = "auto") -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``"auto"`` is CUDA, else MPS, else the CPU.
    Names are case-insensitive; see :func:`langseg.predict.base.check_device` for the rest.

    Raises:
        BadConfigError: an unknown device name, or one this machine does not have (the message lists
            the devices there are).
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return check_device(device)


def _exported_entry(manifest: dict[str, Any]) -> ModelEntry:
    """A registry-style entry for an exported folder: what the checks before loading need to know."""

    def not_built(**_: Any) -> Any:
        raise BadConfigError("an exported model runs on onnxruntime; it has no PyTorch network to build")

    return ModelEntry(
        name=str(manifest["model"]),
        family=str(manifest["family"]),
        task=str(manifest["task"]),
        builder=not_built,
        description="exported ONNX model",
    )


def check_load(
    model: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu", **options: Any
) -> tuple[ModelEntry, Any, torch.device]:
    """Everything :func:`load` checks before it reads any weights: the name (or checkpoint folder), the
    weights path, the family's options and the device. Returns ``(entry, parsed options, device)``; for
    an exported ONNX folder the entry describes the exported model (name, family, task from its manifest).
    """
    if _is_exported(model):
        from langseg.export import check_exported

        manifest, resolved = check_exported(model, weights, device, **options)
        return _exported_entry(manifest), {}, resolved
    entry, _ = _entry_and_weights(model, weights)
    if weights is not None and not _exists(Path(weights).expanduser()):
        raise MissingWeightsError(
            f"checkpoint not found: {_short(weights)}", hint="Check the path you passed."
        )
    parsed = get_family(entry.family).parse_options(options)
    return entry, parsed, resolve_device(device)


def load(
    model: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu", **options: Any
) -> Any:
    """A predictor (``Segmenter`` or ``Referrer``) for a registered name or a langseg checkpoint folder.

    Args:
        model: registry name (``langseg models``), ``family:...`` name (e.g. ``naclip:ViT-L-14/openai``),
            a checkpoint folder / ``.safetensors`` file whose ``config.json`` names the model, or a
            folder written by ``langseg export MODEL --format onnx`` (a predictor on onnxruntime, which
            takes no ``weights`` or options; see docs/export.md).
        weights: a local weights file or folder to use instead of the entry's own weights.
        device: where the model runs (``"auto"``: CUDA, else MPS, else the CPU).
        options: the family's predictor options (``langseg.zoo.lseg.LSegOptions``,
            ``langseg.zoo.vlt.VLTOptions``, ``langseg.zoo.dense_clip.DenseClipOptions``); an option the
            family does not take is a :class:`BadConfigError` naming the ones it does.
    """
    if _is_exported(model):  # a folder written by `langseg export --format onnx`: onnxruntime runs it
        from langseg.export import load_exported

        return load_exported(model, weights=weights, device=device, **options)
    entry, local = _entry_and_weights(model, weights)
    family = get_family(entry.family)
    parsed = family.parse_options(options)  # before any weights are read
    return family.load_predictor(entry, local, resolve_device(device), parsed)


def _builder_arguments(entry: ModelEntry) -> set[str] | None:
    """The keyword arguments ``entry.builder`` takes: its own parameters plus, when it forwards
    ``**kwargs`` to the network class its return annotation names, that class's; ``None``: unknown."""
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        parameters = inspect.signature(entry.builder).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters if p.kind in plain}
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
        return names
    try:
        target = typing.get_type_hints(entry.builder).get("return")
        init = inspect.signature(target.__init__).parameters.values()  # type: ignore[union-attr]
    except Exception:  # an annotation we cannot resolve: accept every name, the builder decides
        return None
    if not isinstance(target, type) or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in init):
        return None
    return names | {p.name for p in init if p.kind in plain and p.name != "self"}


def _check_builder_kwargs(entry: ModelEntry, kwargs: dict[str, Any]) -> None:
    """A :class:`BadConfigError` with a did-you-mean for a keyword the network does not take."""
    valid = _builder_arguments(entry)
    unknown = [key for key in kwargs if valid is not None and key not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(valid or ()), n=1)
        raise BadConfigError(
            f"{entry.name} takes no argument {unknown[0]!r}",
            hint=(f"Did you mean {close[0]!r}? " if close else "")
            + f"Arguments of {entry.name}: {', '.join(sorted(valid or ()))}.",
        )


def create_model(
    name: str, pretrained: bool = False, weights: str | Path | None = None, **kwargs: Any
) -> torch.nn.Module:
    """The bare network registered as ``name``: random weights, or with ``pretrained`` the entry's
    weights (bundled, cached or downloaded), or those of a local ``weights`` file or folder.

    With weights, the network is built with the sizes its checkpoint records (e.g. a vocabulary).
    ``kwargs`` override the network's arguments; an argument it does not take, or a value it refuses,
    is a :class:`BadConfigError`.
    """
    _zoo()
    if not isinstance(name, str) or not name.strip():
        raise BadConfigError(f"name must be a registry name, got {name!r:.80}", hint=MODEL_HINT)
    if not isinstance(pretrained, bool):
        raise BadConfigError(
            f"pretrained must be True or False, got {type(pretrained).__name__} {pretrained!r:.80}"
        )
    local = _check_weights_argument(weights)
    entry = get_model_entry(name)
    _check_builder_kwargs(entry, kwargs)
    try:
        if not pretrained and local is None:
            return entry.builder(**{**entry.kwargs, **kwargs})
        return get_family(entry.family).load_network(entry, local, **kwargs)
    except LangsegError:
        raise
    except Exception as err:
        if not kwargs:
            raise  # no user value reached the builder: a bug, not bad input
        # A value of the wrong type or range reaches the network's constructor, which fails its own way.
        raise BadConfigError(
            f"{name} cannot be built with {', '.join(f'{k}={v!r:.40}' for k, v in kwargs.items())}: "
            f"{type(err).__name__}: {str(err)[:200]}",
            hint=f"Check the argument values against the signature of {name}'s network.",
        ) from err


def list_models(task: str | None = None, family: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered model names, optionally only one task (semantic/referring) or family, or with
    ``pretrained`` only those whose weights are on this machine now (bundled or cached: no download).
    An unknown task or family is a :class:`BadConfigError` (not an empty list)."""
    _zoo()
    entries = model_entries()
    for what, value in (("task", task), ("family", family)):
        known = sorted({getattr(entry, what) for entry in entries})
        if value is not None and value not in known:
            close = difflib.get_close_matches(str(value), known, n=1)
            raise BadConfigError(
                f"unknown {what} {value!r:.80}",
                hint=(f"Did you mean {close[0]!r}? " if close else "") + f"Use one of {', '.join(known)}.",
            )
    return [
        entry.name
        for entry in entries
        if (task is None or entry.task == task)
        and (family is None or entry.family == family)
        and (not pretrained or weights_available(entry.weights, entry.name))
    ]
