"""Held-out quality of the shipped ShapeWorld models, per background and image size.

    python benchmarks/shapes_quality.py [--seed 2] [--scenes 200] [--sizes 64 128 256] [--models ...]

Scenes come from a world seed the recipes never train on (training uses seed 0, validation seed 1) and
are scored through the public predictors, exactly as a user runs them (``langseg.load(name)``):
``lseg-shapes`` by mIoU / pixAcc over ShapeWorld's 41 colour+shape classes, ``vlt-shapes`` by mean IoU,
overall IoU and Pr@0.5/0.9 over every referring expression of the scenes. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from rich.console import Console
from rich.table import Table

import langseg
from langseg.data import ShapeWorldConfig, ShapeWorldReferring, ShapeWorldSemantic
from langseg.evaluate import evaluate

BACKGROUNDS = ("plain", "noise", "texture")


def score(model: str, background: str, size: int, seed: int, scenes: int) -> dict[str, float]:
    """The model's scores on ``scenes`` scenes of world ``seed`` drawn at ``size`` over ``background``."""
    predictor = langseg.load(model)
    world = ShapeWorldConfig(size=size, background=background)  # type: ignore[arg-type]
    if hasattr(predictor, "refer"):
        dataset = ShapeWorldReferring(scenes, seed, world)
    else:
        dataset = ShapeWorldSemantic(scenes, seed, world, granularity="colour_shape")
    return evaluate(predictor, dataset, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["lseg-shapes", "vlt-shapes"])
    parser.add_argument("--seed", type=int, default=2, help="world seed (0 and 1 are the recipes' own)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average: {os.getloadavg()}")
    title = f"world seed {args.seed}, {args.scenes} scenes per row"
    table = Table(
        "model", "background", "size", "mIoU", "oIoU | pixAcc", "Pr@0.5", "Pr@0.9", "s", title=title
    )
    for model in args.models:
        for background in BACKGROUNDS:
            for size in args.sizes:
                start = time.perf_counter()
                scores = score(model, background, size, args.seed, args.scenes)
                second = scores.get("pixAcc", scores.get("oIoU"))
                cells = [scores["mIoU"], second, scores.get("Pr@0.5"), scores.get("Pr@0.9")]
                shown = ["-" if v is None else f"{v:.3f}" for v in cells]
                table.add_row(model, background, str(size), *shown, f"{time.perf_counter() - start:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
