"""Tables of benchmarks/vlt_ablation.py: the paper's columns, area under the validation curve, scores
by expression kind, and the validation curves themselves."""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

COLUMNS = ("IoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "mIoU")
Run = dict[str, Any]  # one finished run: scores (floats), "seconds", and "curve" / "kinds" when recorded


def curve_auc(curve: list[list[float]], column: int = 1) -> float:
    """Mean of a validation curve's ``column`` (1: IoU, 2: mIoU) over its steps (trapezoid / length)."""
    if len(curve) < 2:
        return math.nan
    area = sum((b[0] - a[0]) * (a[column] + b[column]) / 2 for a, b in itertools.pairwise(curve))
    return area / (curve[-1][0] - curve[0][0])


def cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def print_table(title: str, rows: list[tuple[str, list[Run]]]) -> None:
    """The paper's columns (+ AUC when curves were recorded), then IoU / mIoU per expression kind."""
    with_auc = any(len(r.get("curve", [])) >= 2 for _, runs in rows for r in runs)
    columns = COLUMNS + (("AUC",) if with_auc else ())
    print(f"\n{title}\n")
    print("| Variant | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, runs in rows:
        cells = [cell([r[c] for r in runs]) for c in COLUMNS]
        if with_auc:
            cells.append(cell([curve_auc(r.get("curve", [])) for r in runs]))
        print(f"| {name} | " + " | ".join(cells) + " |")
    kinds = sorted({k for _, runs in rows for r in runs for k in r.get("kinds", {})})
    if not kinds:
        return
    print(f"\n{title.split(':')[0]}, by expression kind (IoU / mIoU)\n")
    print("| Variant | " + " | ".join(f"{k} IoU | {k} mIoU" for k in kinds) + " |")
    print("|---|" + "---:|" * 2 * len(kinds))
    for name, runs in rows:
        cells = [
            cell([r["kinds"][k][m] for r in runs if k in r.get("kinds", {})])
            for k in kinds
            for m in ("IoU", "mIoU")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_curves(rows: list[tuple[str, list[Run]]]) -> None:
    """Validation IoU (mean over seeds) at each recorded step, one row per variant."""
    steps = sorted({int(p[0]) for _, runs in rows for r in runs for p in r.get("curve", [])})
    if not steps:
        return
    print("\nValidation IoU during training (mean over seeds)\n")
    print("| Variant | " + " | ".join(str(s) for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name, runs in rows:
        at = [[p[1] for r in runs for p in r.get("curve", []) if int(p[0]) == s] for s in steps]
        print(f"| {name} | " + " | ".join(f"{100 * statistics.mean(v):.1f}" if v else "-" for v in at) + " |")
