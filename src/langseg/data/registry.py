"""Datasets by name: what a training config's ``data:`` and ``langseg eval --data NAME`` build.

::

    from langseg.data import build_dataset, list_datasets
    val = build_dataset("ade20k", {"root": "/data/ADEChallengeData2016", "split": "val"})

A *builder* is any callable ``builder(**kwargs) -> Dataset`` registered with :func:`register_dataset`; its
keyword arguments are the dataset's settings (``data.kwargs`` in a recipe, ``--root``/``--split``/
``--data-arg`` on the command line). Built in: the synthetic ``shapeworld-semantic``,
``shapeworld-referring`` and ``shapeworld-folder``, and the benchmarks of :data:`BENCHMARKS`.

Datasets come without augmentation; the training engine adds it. This module imports nothing of
:mod:`langseg.train`, so that evaluation and data loading do not pull in the training code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch.utils.data import Dataset

from langseg.data.fewshot_datasets import FSS1000, COCO20i, PASCAL5i
from langseg.data.fewshot_protocol import LSEG_ZERO_SHOT
from langseg.data.refcoco import RefCOCO
from langseg.data.semantic_datasets import ADE20K, VOC2012, COCOStuff, PascalContext
from langseg.data.shapes import ShapeWorldConfig
from langseg.data.shapes_datasets import ShapeWorldFolder, ShapeWorldReferring, ShapeWorldSemantic
from langseg.errors import BadConfigError

__all__ = ["BENCHMARKS", "DatasetBuilder", "build_dataset", "list_datasets", "register_dataset"]

DatasetBuilder = Callable[..., Dataset]
Root = str | os.PathLike

_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str, builder: DatasetBuilder, *, overwrite: bool = False) -> DatasetBuilder:
    """Register ``builder(**kwargs) -> Dataset`` under ``name`` (returns it, so it works at import).

    Raises:
        ValueError: ``name`` is taken by another builder and ``overwrite`` is false (a programming
            error, not a user's).
    """
    if name in _DATASETS and _DATASETS[name] is not builder and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered")
    _DATASETS[name] = builder
    return builder


def list_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_DATASETS)


def build_dataset(name: str, kwargs: Mapping[str, Any] | None = None) -> Dataset:
    """The dataset registered as ``name``, built with the keyword arguments ``kwargs``.

    Raises:
        BadConfigError: unknown name, unknown keyword (the hint lists the valid ones), or a keyword of
            the wrong type (a ``TypeError`` inside the builder).
    """
    if name not in _DATASETS:
        raise BadConfigError(
            f"unknown dataset {name!r}", hint=f"Registered datasets: {', '.join(list_datasets())}."
        )
    kwargs = dict(kwargs or {})
    builder = _DATASETS[name]
    params = inspect.signature(builder).parameters
    # Builders that take **world settings check their own keywords (with a more specific hint).
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise BadConfigError(
                f"unknown keyword {unknown[0]!r} for dataset {name!r}",
                hint=f"Valid data.kwargs (--data-arg KEY=VALUE) for {name}: {', '.join(params)}.",
            )
    try:
        return builder(**kwargs)
    except TypeError as err:  # a wrongly typed keyword reaching the dataset
        raise BadConfigError(f"bad data.kwargs / --data-arg for dataset {name!r}: {err}") from None


# --------------------------------------------------------------------------------------------- ShapeWorld

_WORLD_FIELDS = [f.name for f in dataclasses.fields(ShapeWorldConfig)]


def _world_config(kwargs: dict[str, Any]) -> ShapeWorldConfig:
    unknown = [k for k in kwargs if k not in _WORLD_FIELDS]
    if unknown:
        raise BadConfigError(
            f"unknown ShapeWorld setting {unknown[0]!r} in data.kwargs",
            hint="Valid: num_scenes, seed, backgrounds, render_sizes (hard, per_object: referring) and the "
            "ShapeWorldConfig fields "
            f"{', '.join(_WORLD_FIELDS)}.",
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists
    if "exclude_pairs" in kwargs:
        pairs = kwargs["exclude_pairs"]  # ShapeWorldConfig checks the shape of what is left
        if isinstance(pairs, tuple):
            kwargs["exclude_pairs"] = tuple(tuple(p) if isinstance(p, list) else p for p in pairs)
    return ShapeWorldConfig(**kwargs)


def _shapeworld_semantic(
    num_scenes: int = 200,
    seed: int = 0,
    granularity: str = "colour_shape",
    backgrounds: list[str] | None = None,
    render_sizes: list[int] | None = None,
    **world: Any,
) -> Dataset:
    return ShapeWorldSemantic(
        num_scenes,
        seed,
        _world_config(world),
        granularity,  # type: ignore[arg-type]
        backgrounds=backgrounds,
        render_sizes=render_sizes,
    )


def _shapeworld_referring(
    num_scenes: int = 200,
    seed: int = 0,
    per_object: int = 3,
    backgrounds: list[str] | None = None,
    render_sizes: list[int] | None = None,
    hard: bool = False,
    **world: Any,
) -> Dataset:
    return ShapeWorldReferring(
        num_scenes,
        seed,
        _world_config(world),
        per_object,
        backgrounds=backgrounds,
        render_sizes=render_sizes,
        hard=hard,
    )


def _shapeworld_folder(root: str, task: str = "semantic") -> Dataset:
    return ShapeWorldFolder(root, task)


register_dataset("shapeworld-semantic", _shapeworld_semantic)
register_dataset("shapeworld-referring", _shapeworld_referring)
register_dataset("shapeworld-folder", _shapeworld_folder)


# --------------------------------------------------------------------------------------------- benchmarks


def _context59(root: Root, split: str = "val") -> Dataset:
    return PascalContext(root, split, num_classes=59)


def _context60(root: Root, split: str = "val") -> Dataset:
    return PascalContext(root, split, num_classes=60)


def _refcoco(
    root: Root, split: str = "val", image_root: Root | None = None, text_field: str = "sent"
) -> Dataset:
    return RefCOCO(root, split, "refcoco", "unc", image_root, text_field)  # type: ignore[arg-type]


def _refcoco_plus(
    root: Root, split: str = "val", image_root: Root | None = None, text_field: str = "sent"
) -> Dataset:
    return RefCOCO(root, split, "refcoco+", "unc", image_root, text_field)  # type: ignore[arg-type]


def _refcocog(
    root: Root,
    split: str = "val",
    split_by: Literal["umd", "google"] = "umd",
    image_root: Root | None = None,
    text_field: str = "sent",
) -> Dataset:
    return RefCOCO(root, split, "refcocog", split_by, image_root, text_field)  # type: ignore[arg-type]


# name -> builder; the classes are registered directly, so their keyword arguments are the settings.
BENCHMARKS: dict[str, DatasetBuilder] = {
    "ade20k": ADE20K,
    "voc2012": VOC2012,
    "pascal-context-59": _context59,
    "pascal-context-60": _context60,
    "coco-stuff-171": COCOStuff,
    # The few-shot benchmarks as LSeg's zero-shot protocol reads them (480 x 480, HSNet's episodes, LSeg's
    # label words: see langseg.data.fewshot_protocol); every setting can still be given.
    "pascal-5i": functools.partial(PASCAL5i, **LSEG_ZERO_SHOT),
    "coco-20i": functools.partial(COCO20i, **LSEG_ZERO_SHOT),
    "fss1000": functools.partial(FSS1000, **{k: v for k, v in LSEG_ZERO_SHOT.items() if k != "episodes"}),
    "refcoco": _refcoco,
    "refcoco+": _refcoco_plus,
    "refcocog": _refcocog,
}

for _name, _builder in BENCHMARKS.items():
    register_dataset(_name, _builder)
