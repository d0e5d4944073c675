"""Model registry: names ``family-variant[.tag]`` mapped to a builder and its published weights.

Builders are plain functions returning an ``nn.Module`` (timm/open_clip style); no string registries of
classes. A family may also register a *resolver* for open-ended names such as ``naclip:ViT-L-14/openai``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from langseg.errors import UnknownModelError

Builder = Callable[..., Any]


@dataclass(frozen=True)
class WeightsSpec:
    """Where a registered model's published weights live.

    Attributes:
        repo: hub repository id (e.g. ``"langseg/lseg-vitl16-384"``) or ``None`` when the weights ship
            inside the package.
        filename: file inside the repository or package (a ``.safetensors`` with ``config.json`` beside it).
        sha256: expected digest of the file, checked after download; ``None`` to skip the check.
    """

    repo: str | None
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry name, e.g. ``"lseg-vitb32-384"``.
        family: ``"lseg"``, ``"vlt"`` or ``"dense_clip"``.
        task: ``"semantic"`` or ``"referring"``.
        builder: function ``(**kwargs) -> nn.Module`` building the network with random weights.
        description: one line for ``langseg models``.
        weights: published weights, or ``None`` for architecture-only entries (e.g. test models).
        kwargs: default keyword arguments passed to ``builder``.
        loader: ``(entry, weights, device, **options) -> predictor`` used by :func:`langseg.load`
            (a ``Segmenter`` or ``Referrer`` with weights loaded); ``None`` if the model has no predictor.
    """

    name: str
    family: str
    task: str
    builder: Builder
    description: str
    weights: WeightsSpec | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    loader: Callable[..., Any] | None = None


_MODELS: dict[str, ModelEntry] = {}
_RESOLVERS: dict[str, Callable[[str], ModelEntry]] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` to the registry; a second registration under the same name is an error."""
    if entry.name in _MODELS:
        raise ValueError(f"model name {entry.name!r} is already registered")
    _MODELS[entry.name] = entry
    return entry


def register_resolver(prefix: str, resolver: Callable[[str], ModelEntry]) -> None:
    """Resolve names ``"{prefix}:{rest}"`` with ``resolver(full_name)`` instead of a fixed table."""
    _RESOLVERS[prefix] = resolver


def list_models(task: str | None = None, family: str | None = None) -> list[str]:
    """Sorted names of registered models, optionally filtered by task and family."""
    return sorted(
        name
        for name, entry in _MODELS.items()
        if (task is None or entry.task == task) and (family is None or entry.family == family)
    )


def model_entries() -> list[ModelEntry]:
    """All registered entries, sorted by name."""
    return [_MODELS[name] for name in sorted(_MODELS)]


def get_model_entry(name: str) -> ModelEntry:
    """The entry registered under ``name``, or an :class:`UnknownModelError` suggesting close names."""
    if name in _MODELS:
        return _MODELS[name]
    prefix, sep, _ = name.partition(":")
    if sep and prefix in _RESOLVERS:
        return _RESOLVERS[prefix](name)
    close = difflib.get_close_matches(name, list(_MODELS), n=3)
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}", hint=hint + "Run `langseg models` to list the registered names."
    )
