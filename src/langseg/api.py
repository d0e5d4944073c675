"""The public entry points: ``load`` (a ready predictor) and ``create_model`` (a bare nn.Module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from langseg.errors import BadConfigError, MissingWeightsError
from langseg.hub import CONFIG_NAME
from langseg.registry import get_model_entry


def _import_models() -> None:
    """Model modules register their names on import; importing here keeps ``import langseg`` light."""
    import langseg.models  # noqa: F401


def load(
    model: str | Path, weights: str | Path | None = None, device: str | torch.device = "cpu", **options: Any
) -> Any:
    """A predictor (``Segmenter`` or ``Referrer``) for a registered name or a langseg checkpoint folder.

    Args:
        model: registry name (``langseg models``), ``family:...`` name (e.g. ``naclip:ViT-L-14/openai``),
            or a checkpoint folder / ``.safetensors`` file whose ``config.json`` names the model.
        weights: a local weights file or folder to use instead of the published weights.
        device: where the model runs.
        options: predictor options (test-time plan, templates, ...), passed to the family's loader.
    """
    _import_models()
    name = str(model)
    path = Path(model)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise MissingWeightsError(
                f"{config_file} not found next to the checkpoint",
                hint="Pass a langseg checkpoint folder (model.safetensors + config.json), or a registry name "
                "with weights=PATH for other files.",
            )
        try:
            name = json.loads(config_file.read_text())["model"]
        except (KeyError, json.JSONDecodeError) as err:
            raise BadConfigError(f"{config_file} does not name its model ('model' key)") from err
        weights = path if weights is None else weights
    entry = get_model_entry(name)
    if entry.loader is None:
        raise BadConfigError(
            f"model {entry.name!r} has no predictor", hint="Use langseg.create_model() for the bare network."
        )
    try:
        return entry.loader(entry, weights=weights, device=device, **options)
    except TypeError as err:  # an option the family's predictor does not take (e.g. plan= for VLT)
        if "unexpected keyword argument" not in str(err):
            raise
        raise BadConfigError(
            f"{entry.name} ({entry.family}) does not take that option: {err}",
            hint="LSeg and dense CLIP take plan/templates; VLT takes threshold and upsample.",
        ) from err


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """The bare network registered as ``name``, with random weights unless ``pretrained``."""
    _import_models()
    entry = get_model_entry(name)
    if not pretrained:
        return entry.builder(**{**entry.kwargs, **kwargs})
    from langseg.hub import read_checkpoint, resolve_weights

    # The checkpoint's config.json records the sizes it was trained with (e.g. its vocabulary).
    state, config = read_checkpoint(resolve_weights(entry.weights, entry.name))
    module = entry.builder(**{**entry.kwargs, **config.get("kwargs", {}), **kwargs})
    module.load_state_dict(state)
    return module
