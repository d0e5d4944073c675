"""The models that ship inside the package, scored on fresh scenes of a world seed no recipe trains on.

The recipes train on world seed 0 and validate on seed 1; docs/ report seed 2. These tests render world
seed 7 and compute the scores here, from the masks the public predictors return, with numpy (not
langseg.metrics). Run with ``-s`` to see the figures.

Issue 12 asks for ``lseg-shapes`` mIoU >= 0.90 and ``vlt-shapes`` mean IoU >= 0.85 on each background at
64 and 256 px. Measured here: vlt-shapes 0.878-0.928 on every background and size; lseg-shapes 0.9004
with its default plan (the 128 px pass plus its horizontal flip; 0.898 without the flip), plain 0.897,
noise 0.903, texture 0.886. The tests assert the issue's figures, and >= 0.88 per background for
lseg-shapes, so a regression (or a model that only knows plain backgrounds) fails.
"""

from __future__ import annotations

import numpy as np
import pytest

import langseg
from langseg.data import ShapeWorldConfig, label_names, render_scene, scene_expressions

SEED = 7
BACKGROUNDS = ("plain", "noise", "texture")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("background", BACKGROUNDS)
def test_vlt_shapes_holds_its_quality_on_every_background_and_size(background: str, size: int) -> None:
    referrer = langseg.load("vlt-shapes")
    world = ShapeWorldConfig(size=size, background=background)  # type: ignore[arg-type]
    ious = []
    for index in range(25):
        scene = render_scene(SEED, index, world)
        expressions = scene_expressions(scene)
        results = referrer.refer_all(scene.image, [e.text for e in expressions])
        for expression, result in zip(expressions, results, strict=True):
            truth = scene.object_mask(expression.target)
            union = np.logical_or(result.mask, truth).sum()
            ious.append(np.logical_and(result.mask, truth).sum() / union if union else 1.0)
    mean_iou = float(np.mean(ious))
    print(f"vlt-shapes, {background}, {size} px: mean IoU {mean_iou:.3f} over {len(ious)} expressions")
    assert len(ious) > 150 and mean_iou >= 0.85


def test_lseg_shapes_segments_fresh_scenes_of_every_kind() -> None:
    segmenter = langseg.load("lseg-shapes")
    labels = label_names(ShapeWorldConfig(), "colour_shape")
    intersection, union = np.zeros(len(labels)), np.zeros(len(labels))
    per_background = {}
    for background in BACKGROUNDS:
        inter_b, union_b = np.zeros(len(labels)), np.zeros(len(labels))
        for index in range(24):
            size = (64, 128, 256)[index % 3]
            scene = render_scene(SEED, index, ShapeWorldConfig(size=size, background=background))  # type: ignore[arg-type]
            predicted = segmenter.segment(scene.image, labels).mask
            truth = scene.semantic_map("colour_shape")
            for k in np.union1d(np.unique(predicted), np.unique(truth)):
                inter_b[k] += np.logical_and(predicted == k, truth == k).sum()
                union_b[k] += np.logical_or(predicted == k, truth == k).sum()
        per_background[background] = float(np.mean(inter_b[union_b > 0] / union_b[union_b > 0]))
        intersection, union = intersection + inter_b, union + union_b
    miou = float(np.mean(intersection[union > 0] / union[union > 0]))
    shown = ", ".join(f"{b} {v:.3f}" for b, v in per_background.items())
    print(f"lseg-shapes: mIoU {miou:.4f} over {int((union > 0).sum())} classes (per background: {shown})")
    assert (union > 0).sum() >= 35 and miou >= 0.90
    assert all(value >= 0.88 for value in per_background.values())
