"""Datasets: the synthetic ShapeWorld (offline default) and, later, the papers' benchmarks."""

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
    "label_names",
    "referring_expressions",
    "render_scene",
    "scene_expressions",
    "write_shapeworld",
]
