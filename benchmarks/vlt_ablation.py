"""VLT's ablations (ICCV 2021, Tables 1-3) re-run on ShapeWorld-Ref with small models on a CPU.

    python benchmarks/vlt_ablation.py [--steps 600] [--seeds 0,1] [--size 64] [--tables 1,2,3] [--quick]

Every variant trains from scratch with the same recipe, step budget and seed(s), on the same training
scenes, and is scored on the same held-out scenes (another world seed). Prints, in the paper's layout
(IoU, Pr@0.5 ... Pr@0.9), Table 1 (convolutional vs transformer decoder), Table 2 (query source: the
sentence feature F_t, learnt queries, QGM) and Table 3 (number of queries Nq, and Nq = 16 without QBM).
"IoU" is the overall (cumulative) IoU, as the paper's; mIoU, the mean per-expression IoU, is added last.
With several seeds each cell is ``mean +- std``. The variant shared by the tables (transformer, QGM,
Nq 16, QBM) trains once per seed; ``--cache runs.json`` keeps finished runs, so that a later call with
more seeds or tables trains only what is missing. ``--quick`` is a smoke test (tiny worlds, a few
steps): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from langseg.train import fit
from langseg.train.config import config_from_dict

COLUMNS = ("IoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "mIoU")
BASE: dict[str, Any] = {"decoder": "transformer", "query_source": "qgm", "num_queries": 16, "qbm": True}
TABLES: dict[int, tuple[str, list[tuple[str, dict[str, Any]]]]] = {
    1: (
        "Table 1: decoder",
        [("Conv", {"decoder": "conv"}), ("Transformer", {})],
    ),
    2: (
        "Table 2: query source",
        [
            ("F_t (sentence feature)", {"query_source": "text"}),
            ("Learnt", {"query_source": "learnt"}),
            ("QGM", {}),
        ],
    ),
    3: (
        "Table 3: number of queries and QBM",
        [
            *((f"Nq = {n}", {"num_queries": n}) for n in (1, 2, 4, 8, 16, 32)),
            ("Nq = 16, w/o QBM", {"qbm": False}),
        ],
    ),
}


def recipe(args: argparse.Namespace, switches: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
    """The shared training recipe (a small VLT at ``args.size`` px) with one variant's switches."""
    w = args.width
    model_kwargs = {
        "input_size": args.size,
        "backbone_kwargs": {"channels": [w // 2, w, w]},
        "fusion_dim": w,
        "hidden_dim": w,
        "num_heads": max(1, w // 16),
        "dropout": 0.0,
        "ffn_dim": 2 * w,
        "out_stride": args.out_stride,
        "concat_lower_feat": args.lower_feat,
        "fine_skip": args.fine_skip,
        "loss_resolution": args.loss_resolution,
        "text": {"word_dim": 32, "hidden_dim": w},
        **BASE,
        **switches,
    }
    world = {"size": args.size}
    return {
        "task": "vlt-referring",
        "model": "vlt-tiny",
        "model_kwargs": model_kwargs,
        "data": {
            "name": "shapeworld-referring",
            "kwargs": {"num_scenes": args.train_scenes, "seed": 0, **world},
            "batch_size": args.batch_size,
            "scale_range": [1, 1],
        },
        "val_data": {
            "name": "shapeworld-referring",
            "kwargs": {"num_scenes": args.val_scenes, "seed": 1, **world},
            "batch_size": 64,
        },
        "optim": {
            "name": "adamw",
            "lr": args.lr,
            "weight_decay": 1e-4,
            "head_lr_mult": 1.0,
            "warmup_steps": min(200, args.steps // 10),
            "grad_clip_norm": 10.0,
        },
        "max_steps": args.steps,
        "seed": seed,
        "out_dir": str(out_dir),
        "log_every": max(1, args.steps // 10),
        "device": "cpu",
        "progress": False,
    }


def run_variant(args: argparse.Namespace, switches: dict[str, Any], seed: int) -> dict[str, float]:
    """Train one variant for ``args.steps`` steps and return its held-out scores (+ ``seconds``)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = config_from_dict(recipe(args, switches, seed, Path(tmp) / "run"))
        start = time.perf_counter()
        result = fit(config)
        seconds = time.perf_counter() - start
    assert result.metrics is not None
    scores = {"IoU": result.metrics["oIoU"], **result.metrics, "seconds": seconds}
    return scores


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def print_table(title: str, rows: list[tuple[str, list[dict[str, float]]]]) -> None:
    print(f"\n{title}\n")
    print("| Variant | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, runs in rows:
        print(f"| {name} | " + " | ".join(cell([r[c] for r in runs]) for c in COLUMNS) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500, help="optimiser steps per variant")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--size", type=int, default=64, help="image and model input side (px)")
    parser.add_argument("--tables", default="1,2,3", help="comma-separated table numbers")
    parser.add_argument("--width", type=int, default=32, help="hidden width of the small VLT")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out-stride", type=int, default=2, help="VLT output stride (official 2)")
    parser.add_argument(
        "--lower-feat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="concatenate the QGM input features into the mask head (official concate_lower_feat)",
    )
    parser.add_argument(
        "--fine-skip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="join the finest backbone map into the mask head (off in vlt-shapes and the recorded tables)",
    )
    parser.add_argument(
        "--loss-resolution", choices=("output", "input"), default="input", help="see langseg vlt_loss"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--val-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache", type=Path, help="JSON file of finished runs: reused, and extended")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny worlds, 4 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.size, args.width, args.batch_size = 4, 32, 16, 4
        args.train_scenes, args.val_scenes = 4, 2
    return args


# The settings that change what a run learns: a cache written under other settings is refused.
RECIPE_KEYS = (
    "steps",
    "size",
    "width",
    "batch_size",
    "out_stride",
    "lower_feat",
    "fine_skip",
    "loss_resolution",
    "lr",
    "train_scenes",
    "val_scenes",
)


# Settings added after caches were written: a cache without them ran with these values. Before
# "upsample" was recorded, held-out masks were the resized sigmoid probabilities (the official mapping).
RECIPE_DEFAULTS: dict[str, Any] = {"fine_skip": False, "upsample": "probability"}
# How held-out masks reach the image: the training engine scores the way the Referrer predicts.
UPSAMPLE = "logits"


def recipe_record(args: argparse.Namespace) -> dict[str, Any]:
    """What a cache records of the recipe, to refuse runs made under other settings."""
    return {**{k: getattr(args, k) for k in RECIPE_KEYS}, "upsample": UPSAMPLE}


def key_of(switches: dict[str, Any]) -> str:
    """One key per distinct model: "Nq = 16" and the base variant are the same run."""
    return json.dumps({**BASE, **switches}, sort_keys=True)


def load_cache(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """Runs of earlier invocations (``--cache``): switches (JSON) -> seed -> scores."""
    if args.cache is None or not args.cache.is_file():
        return {}
    data = json.loads(args.cache.read_text())
    recipe_args = recipe_record(args)
    if {**RECIPE_DEFAULTS, **data["recipe"]} != recipe_args:
        sys.exit(f"error: {args.cache} holds runs of another recipe {data['recipe']}; use another --cache")
    return data["runs"]


def save_cache(args: argparse.Namespace, runs: dict[str, dict[str, dict[str, float]]]) -> None:
    """Merge ``runs`` into the cache file under a lock, so that processes training other seeds or
    tables into the same ``--cache`` (one per core) never drop each other's runs."""
    if args.cache is None:
        return
    recipe_args = recipe_record(args)
    with open(args.cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load_cache(args)
        for key, seeds in on_disk.items():
            for seed, scores in seeds.items():
                runs.setdefault(key, {}).setdefault(seed, scores)
        tmp = args.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"recipe": recipe_args, "runs": runs}, indent=1))
        tmp.replace(args.cache)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    tables = [int(t) for t in args.tables.split(",")]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        sys.exit(f"error: unknown table {unknown[0]}; choose from 1, 2, 3")
    runs = load_cache(args)  # a variant shared by several tables trains once per seed
    save_cache(args, runs)  # also picks up runs other processes finished meanwhile
    start = time.perf_counter()
    for number in tables:
        for name, switches in TABLES[number][1]:
            done = runs.setdefault(key_of(switches), {})
            for seed in (s for s in seeds if str(s) not in done):
                scores = run_variant(args, switches, seed)
                done[str(seed)] = scores
                save_cache(args, runs)
                print(
                    f"# {name} seed {seed}: IoU {scores['IoU']:.4f} ({scores['seconds']:.0f} s)", flush=True
                )
    wall = time.perf_counter() - start
    save_cache(args, runs)
    keys = {key_of(switches) for t in tables for _, switches in TABLES[t][1]}
    trained = sum(runs[key][str(seed)]["seconds"] for key in keys for seed in seeds)
    setup = (
        f"ShapeWorld-Ref, {args.size} px, {args.steps} steps x batch {args.batch_size}, width {args.width}",
        f"out stride {args.out_stride}, lower features {args.lower_feat}, fine skip {args.fine_skip}",
        f"loss at {args.loss_resolution}",
        f"seeds {args.seeds}",
        f"{args.train_scenes} training / {args.val_scenes} held-out scenes, {args.threads} thread(s)",
        f"training time of these runs {trained / 60:.1f} min (this invocation {wall / 60:.1f} min)",
    )
    print("\n" + "; ".join(setup))
    for number in tables:
        title, variants = TABLES[number]
        rows = []
        for name, switches in variants:
            done = runs[key_of(switches)]
            rows.append((name, [done[str(s)] for s in seeds]))
        print_table(title, rows)


if __name__ == "__main__":
    main()
