"""Model registry: names ``family-variant[.tag]`` mapped to an entry, and the families that wire them.

An entry is data, in the style of timm's pretrained configs: the builder of the bare network, where its
weights come from (:class:`WeightsSpec`), how images are prepared for it (``preprocess``) and its default
test-time ``plan``. A :class:`Family` is code, registered once per family by :mod:`langseg.zoo`: its
typed predictor options, and how to turn an entry plus a weights file into a network or a predictor.

Builders are plain functions returning an ``nn.Module`` (timm/open_clip style); no string registries of
classes. A family may also register a *resolver* for open-ended names such as ``naclip:ViT-L-14/openai``.
This module imports no torch: ``langseg models`` and the CLI's help stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from langseg.errors import BadConfigError, UnknownModelError

Builder = Callable[..., Any]
WeightsKind = Literal["bundled", "hub", "open_clip", "convert"]


@dataclass(frozen=True)
class WeightsSpec:
    """Where a registered model's weights come from.

    Attributes:
        repo: Hugging Face repository id (``kind="hub"``), else ``None``.
        filename: file inside the repository or the package (``model.safetensors`` + ``config.json``).
        sha256: expected digest of the file, checked after download or when read from the package.
        kind: ``"bundled"`` (inside the package, ``langseg/weights/<name>/``), ``"hub"`` (downloaded into
            langseg's cache), ``"open_clip"`` (open_clip's pretrained catalogue and its Hugging Face
            cache: ``arch``/``tag``) or ``"convert"`` (an official checkpoint the user converts; ``hint``
            says how). Defaults to ``"hub"`` with a ``repo``, else ``"bundled"``.
        arch, tag: the open_clip model and pretrained tag (``kind="open_clip"``).
        hint: what to do when the weights are not there (``kind="convert"``).
    """

    repo: str | None = None
    filename: str = "model.safetensors"
    sha256: str | None = None
    kind: WeightsKind | None = None
    arch: str | None = None
    tag: str | None = None
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", "hub" if self.repo else "bundled")

    @classmethod
    def bundled(cls, sha256: str | None, filename: str = "model.safetensors") -> WeightsSpec:
        return cls(None, filename, sha256, kind="bundled")

    @classmethod
    def open_clip(cls, arch: str, tag: str) -> WeightsSpec:
        return cls(kind="open_clip", arch=arch, tag=tag, filename=f"{arch}/{tag}")

    @classmethod
    def convert(cls, hint: str) -> WeightsSpec:
        return cls(kind="convert", hint=hint)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry name, e.g. ``"lseg-vitb32-384"``.
        family: ``"lseg"``, ``"vlt"`` or ``"dense_clip"`` (a registered :class:`Family`).
        task: ``"semantic"`` or ``"referring"``.
        builder: function ``(**kwargs) -> nn.Module`` building the network with random weights.
        description: one line for ``langseg models``.
        weights: where the weights come from, or ``None`` for architecture-only entries (test models).
        kwargs: default keyword arguments passed to ``builder``.
        preprocess: how images become the network's input (``mean``, ``std``; the family documents the
            rest); a checkpoint's ``config.json`` overrides it with what the model was trained with.
        plan: the default test-time plan name (families with plans); a checkpoint may override it.
    """

    name: str
    family: str
    task: str
    builder: Builder
    description: str
    weights: WeightsSpec | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    plan: str | None = None


@dataclass(frozen=True)
class Family:
    """The code behind every entry of one family.

    Attributes:
        name: the family name entries refer to.
        options: a dataclass of the predictor options :func:`langseg.load` accepts for this family
            (validated in ``__post_init__``, before anything heavy happens).
        load_predictor: ``(entry, weights: Path | None, device, options) -> predictor``; ``weights`` is a
            local file or folder (``None``: the entry's own weights, resolved by the family).
        load_network: ``(entry, weights: Path, **kwargs) -> nn.Module``, the bare network with the
            weights of a local file or folder (``langseg.create_model(..., pretrained=True)``).
    """

    name: str
    options: type
    load_predictor: Callable[..., Any]
    load_network: Callable[..., Any]

    def parse_options(self, given: Mapping[str, Any]) -> Any:
        """``self.options(**given)``, an unknown key being a :class:`BadConfigError` naming the valid ones."""
        valid = [f.name for f in dataclasses.fields(self.options)]
        unknown = [key for key in given if key not in valid]
        if unknown:
            close = difflib.get_close_matches(unknown[0], valid, n=1)
            raise BadConfigError(
                f"{self.name} models take no option {unknown[0]!r}",
                hint=(f"Did you mean {close[0]!r}? " if close else "")
                + f"Options of {self.name} models: {', '.join(valid)}.",
            )
        return self.options(**given)


_MODELS: dict[str, ModelEntry] = {}
_FAMILIES: dict[str, Family] = {}
_RESOLVERS: dict[str, Callable[[str], ModelEntry]] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add ``entry`` to the registry; a second registration under the same name is an error."""
    if entry.name in _MODELS:
        raise ValueError(f"model name {entry.name!r} is already registered")
    _MODELS[entry.name] = entry
    return entry


def register_family(family: Family) -> Family:
    """Add the code of a family (once per family)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The :class:`Family` registered as ``name``."""
    if name not in _FAMILIES:
        raise UnknownModelError(
            f"no model family {name!r}", hint=f"Families: {', '.join(sorted(_FAMILIES))}."
        )
    return _FAMILIES[name]


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
