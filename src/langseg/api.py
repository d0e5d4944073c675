"""The public entry points: ``load`` (a ready predictor), ``create_model`` (a bare nn.Module) and
``list_models``.

Every name goes through the registry (:mod:`langseg.registry`, filled by :mod:`langseg.zoo`), every
weights file through :func:`langseg.hub.resolve_weights`, and every family's options through its typed
options dataclass, checked before anything heavy happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from langseg.errors import BadConfigError, MissingWeightsError
from langseg.hub import CONFIG_NAME, weights_available
from langseg.registry import ModelEntry, get_family, get_model_entry, model_entries


def _zoo() -> None:
    """Families register their entries on import; importing here keeps ``import langseg`` light."""
    import langseg.zoo  # noqa: F401


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, else a :class:`BadConfigError`."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise BadConfigError(
            f"unknown device {device!r}",
            hint="Use auto, cpu, cuda, cuda:1 or mps (--device on the command line).",
        ) from err
    if resolved.type == "cuda" and (
        not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    ):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise BadConfigError(
            f"device {device!r} is not available: this machine has {found} CUDA device(s)",
            hint="Use the CPU (device='cpu', --device cpu), or a CUDA index below the device count.",
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise BadConfigError(
            f"device {device!r} is not available on this machine",
            hint="Use the CPU (device='cpu', --device cpu).",
        )
    return resolved


def _entry_and_weights(model: str | Path, weights: str | Path | None) -> tuple[ModelEntry, Path | None]:
    """The entry a name or a checkpoint folder means, and the local weights to use (``None``: its own)."""
    _zoo()
    path = Path(model)
    looks_like_path = isinstance(model, Path) or ("/" in model and ":" not in model)
    if not looks_like_path and not path.exists():
        return get_model_entry(str(model)), None if weights is None else Path(weights)
    if not path.exists():
        raise MissingWeightsError(f"checkpoint not found: {path}", hint="Check the path you passed.")
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise MissingWeightsError(
            f"{config_file} not found next to the checkpoint",
            hint="Pass a langseg checkpoint folder (model.safetensors + config.json), or a registry name "
            "with weights=PATH for other files.",
        )
    try:
        config = json.loads(config_file.read_text())
        name = config["model"]
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadConfigError(f"{config_file} does not name its model ('model' key)") from err
    if not isinstance(name, str):
        raise BadConfigError(f"{config_file}: 'model' must be a registry name, got {name!r}")
    return get_model_entry(name), path if weights is None else Path(weights)


def model_entry(model: str | Path) -> ModelEntry:
    """The registry entry a name or a checkpoint folder stands for, without reading any weights (e.g. to
    check a model's ``task`` before loading it)."""
    return _entry_and_weights(model, None)[0]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``"auto"`` is CUDA, else MPS, else the CPU.

    Raises:
        BadConfigError: an unknown device name, or one this machine does not have.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return _check_device(device)


def check_load(
    model: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu", **options: Any
) -> tuple[ModelEntry, Any, torch.device]:
    """Everything :func:`load` checks before it reads any weights: the name (or checkpoint folder), the
    weights path, the family's options and the device. Returns ``(entry, parsed options, device)``."""
    entry, _ = _entry_and_weights(model, weights)
    if weights is not None and not Path(weights).expanduser().exists():
        raise MissingWeightsError(f"checkpoint not found: {weights}", hint="Check the path you passed.")
    parsed = get_family(entry.family).parse_options(options)
    return entry, parsed, resolve_device(device)


def load(
    model: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu", **options: Any
) -> Any:
    """A predictor (``Segmenter`` or ``Referrer``) for a registered name or a langseg checkpoint folder.

    Args:
        model: registry name (``langseg models``), ``family:...`` name (e.g. ``naclip:ViT-L-14/openai``),
            or a checkpoint folder / ``.safetensors`` file whose ``config.json`` names the model.
        weights: a local weights file or folder to use instead of the entry's own weights.
        device: where the model runs (``"auto"``: CUDA, else MPS, else the CPU).
        options: the family's predictor options (``langseg.zoo.lseg.LSegOptions``,
            ``langseg.zoo.vlt.VLTOptions``, ``langseg.zoo.dense_clip.DenseClipOptions``); an option the
            family does not take is a :class:`BadConfigError` naming the ones it does.
    """
    entry, local = _entry_and_weights(model, weights)
    family = get_family(entry.family)
    parsed = family.parse_options(options)  # before any weights are read
    return family.load_predictor(entry, local, resolve_device(device), parsed)


def create_model(
    name: str, pretrained: bool = False, weights: str | Path | None = None, **kwargs: Any
) -> torch.nn.Module:
    """The bare network registered as ``name``: random weights, or with ``pretrained`` the entry's
    weights (bundled, cached or downloaded), or those of a local ``weights`` file or folder.

    With weights, the network is built with the sizes its checkpoint records (e.g. a vocabulary).
    """
    _zoo()
    entry = get_model_entry(name)
    if not pretrained and weights is None:
        return entry.builder(**{**entry.kwargs, **kwargs})
    local = None if weights is None else Path(weights)
    return get_family(entry.family).load_network(entry, local, **kwargs)


def list_models(task: str | None = None, family: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered model names, optionally only one task (semantic/referring) or family, or with
    ``pretrained`` only those whose weights are on this machine now (bundled or cached: no download)."""
    _zoo()
    return [
        entry.name
        for entry in model_entries()
        if (task is None or entry.task == task)
        and (family is None or entry.family == family)
        and (not pretrained or weights_available(entry.weights, entry.name))
    ]
