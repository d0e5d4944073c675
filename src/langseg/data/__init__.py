"""Datasets: the synthetic ShapeWorld (offline default), the papers' benchmarks, and their registry.

``build_dataset(name, kwargs)`` builds any of them by name (:mod:`langseg.data.registry`); the benchmark
loaders themselves live in :mod:`langseg.data.semantic_datasets`, :mod:`langseg.data.fewshot_datasets`
and :mod:`langseg.data.refcoco`.
"""

from langseg.data.registry import build_dataset, list_datasets, register_dataset
from langseg.data.shape_expressions import Expression, all_expressions, referring_expressions
from langseg.data.shapes import (
    COLOURS,
    GRANULARITIES,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapeWorldConfig,
    label_names,
    render_scene,
)
from langseg.data.shapes_datasets import (
    ShapeWorldFolder,
    ShapeWorldReferring,
    ShapeWorldSemantic,
    scene_expressions,
    write_shapeworld,
)

__all__ = [
    "COLOURS",
    "GRANULARITIES",
    "SHAPES",
    "SIZES",
    "Expression",
    "Scene",
    "ShapeObject",
    "ShapeWorldConfig",
    "ShapeWorldFolder",
    "ShapeWorldReferring",
    "ShapeWorldSemantic",
    "all_expressions",
    "build_dataset",
    "label_names",
    "list_datasets",
    "referring_expressions",
    "register_dataset",
    "render_scene",
    "scene_expressions",
    "write_shapeworld",
]
