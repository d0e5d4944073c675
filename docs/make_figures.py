"""Regenerate the pictures in docs/images: ``python docs/make_figures.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from langseg.data import ShapeWorldConfig, render_scene

OUT = Path(__file__).parent / "images"


def shapeworld_grid() -> None:
    """Rows: plain, noisy and textured (with occlusion) backgrounds; four scenes each, seed 0."""
    rows = []
    for config in (
        ShapeWorldConfig(),
        ShapeWorldConfig(background="noise"),
        ShapeWorldConfig(background="texture", allow_overlap=True),
    ):
        rows.append(np.concatenate([render_scene(0, 55 + i, config).image for i in range(4)], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0)).resize((768, 576), Image.LANCZOS)
    grid.save(OUT / "shapeworld.jpg", quality=85)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    shapeworld_grid()
