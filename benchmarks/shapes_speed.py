"""ShapeWorld rendering speed on one core: scenes per second, with and without referring expressions.

    python benchmarks/shapes_speed.py [--num 300] [--size 256]

Prints one table. Rendering is numpy + PIL and single-threaded, so the figure is per core.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from langseg.data import ShapeWorldConfig, render_scene, scene_expressions


def scenes_per_second(config: ShapeWorldConfig, num: int, with_expressions: bool) -> float:
    render_scene(0, 0, config)  # warm-up: imports, PIL font/draw setup
    start = time.perf_counter()
    for i in range(num):
        scene = render_scene(0, i, config)
        if with_expressions:
            scene_expressions(scene)
    return num / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    table = Table(
        "background",
        "overlap",
        "scenes/s (image+masks)",
        "scenes/s (+ expressions)",
        title=f"ShapeWorld rendering, {args.size}x{args.size}, one core, {args.num} scenes",
    )
    for background in ("plain", "noise", "texture"):
        for overlap in (False, True):
            config = ShapeWorldConfig(size=args.size, background=background, allow_overlap=overlap)  # type: ignore[arg-type]
            plain = scenes_per_second(config, args.num, with_expressions=False)
            full = scenes_per_second(config, args.num, with_expressions=True)
            table.add_row(background, str(overlap), f"{plain:.0f}", f"{full:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
