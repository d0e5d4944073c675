"""Seen vs unseen mIoU of a zero-shot LSeg run (e.g. configs/lseg_shapes_zeroshot.yaml).

    python benchmarks/lseg_zeroshot.py runs/lseg_shapes_zeroshot

Reads the run's config.yaml (which labels training left out) and the evaluations in metrics.jsonl, and
prints one table: mIoU over the seen labels, over the unseen (held-out) labels and over all of them, at
each evaluated step. IoUs come from the engine's evaluation on the held-out scenes, where the model
chooses among all labels; background counts as seen.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table


def mean(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's out_dir")
    args = parser.parse_args()
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    unseen = set(config["model_kwargs"].get("train_exclude_labels", []))
    table = Table(
        "step", "mIoU seen", "mIoU unseen", "mIoU all", "pixAcc", title=f"zero-shot LSeg: {args.run}"
    )
    for line in (args.run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] != "eval":
            continue
        ious = {k.removeprefix("IoU/"): v for k, v in record.items() if k.startswith("IoU/")}
        seen_iou = [v for k, v in ious.items() if k not in unseen]
        unseen_iou = [v for k, v in ious.items() if k in unseen]
        table.add_row(
            str(record["step"]),
            f"{mean(seen_iou):.4f}",
            f"{mean(unseen_iou):.4f}",
            f"{record['mIoU']:.4f}",
            f"{record['pixAcc']:.4f}",
        )
    Console().print(table)
    if unseen:
        Console().print(f"unseen labels ({len(unseen)}): {', '.join(sorted(unseen))}")


if __name__ == "__main__":
    main()
