"""VLT's ablations (ICCV 2021, Tables 1-3) re-run on ShapeWorld-Ref with small models on a CPU.

    python benchmarks/vlt_ablation.py [--paper] [--steps N] [--seeds 0,1] [--tables 1,2,3] [--quick]

Every variant trains from scratch with the same recipe, step budget and seed(s), on the same training
scenes, and is scored on the same held-out scenes (another world seed). Prints, in the paper's layout
(IoU, Pr@0.5 ... Pr@0.9), Table 1 (convolutional vs transformer decoder), Table 2 (query source: the
sentence feature F_t, learnt queries, QGM) and Table 3 (number of queries Nq, and Nq = 16 without QBM).
"IoU" is the overall (cumulative) IoU, as the paper's; mIoU, the mean per-expression IoU, is added last.
With several seeds each cell is ``mean +- std``. The variant shared by the tables (transformer, QGM,
Nq 16, QBM) trains once per seed; ``--cache runs.json`` keeps finished runs, so that a later call with
more seeds or tables trains only what is missing. ``--quick`` is a smoke test (tiny worlds, a few
steps): its numbers mean nothing.

Two recipes. The first one (the default; the tables of docs/vlt.md before the paper's network): the
``vlt-shapes`` network with the lower-feature path, loss at input resolution, the default ShapeWorld-Ref.
``--paper``: the paper's network (no lower-feature path, the official loss: BCE summed over the output
grid against the area-averaged mask, per image) on the hard split (referent shares colour and shape with
a distractor; position and relation expressions only), Nq 1, 4, 16, with the same start-up help for
every variant: a linear warm-up, then the engine's poly decay (and, with ``--curriculum N``, N steps on
the default split first), channels-last weights and images (the same arithmetic, 1.1-1.2x faster steps
here: benchmarks/vlt_train_speed.py). Any flag given explicitly overrides the recipe's value.

With ``--eval-every N`` (the paper recipe sets it) the held-out scores every N steps are kept in the
cache (the engine's own evaluation, read back from its metrics.jsonl): tables add "AUC", the mean IoU
over training (trapezoid over the validation curve, divided by its length: how fast a variant learns),
``--curves`` prints the curves. Each run is also scored per expression kind (attribute, position,
relation) at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset
from vlt_ablation_report import Run, print_curves, print_table  # beside this script

from langseg.data import build_dataset
from langseg.evaluate import ReferringEvaluator
from langseg.train import fit
from langseg.train.config import TrainConfig, config_from_dict
from langseg.train.engine import evaluate
from langseg.train.resume_checks import read_metrics_log

BASE: dict[str, Any] = {"decoder": "transformer", "query_source": "qgm", "num_queries": 16, "qbm": True}


def tables(queries: list[int]) -> dict[int, tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """The paper's three tables; Table 3 over the query counts ``queries``."""
    return {
        1: ("Table 1: decoder", [("Conv", {"decoder": "conv"}), ("Transformer", {})]),
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
            [*((f"Nq = {n}", {"num_queries": n}) for n in queries), ("Nq = 16, w/o QBM", {"qbm": False})],
        ),
    }


# Each recipe's values of the settings that --paper changes (a flag given explicitly wins).
FIRST: dict[str, Any] = {
    "steps": 2500,
    "lower_feat": True,
    "loss_resolution": "input",
    "hard": False,
    "warmup": "auto",  # min(200, steps // 10)
    "eval_every": 0,  # evaluate at epoch ends and at the end; only the end is kept
    "queries": "1,2,4,8,16,32",
    "precision": "fp32",
    "channels_last": False,
}
PAPER: dict[str, Any] = {
    "steps": 4500,  # 21 runs in about 3.9 h on 2 cores (docs/vlt.md)
    "lower_feat": False,
    "loss_resolution": "output",
    "hard": True,
    "warmup": 500,
    "eval_every": 250,
    "queries": "1,4,16",
    "precision": "fp32",
    "channels_last": True,  # 1.3x faster steps on this CPU, same arithmetic (benchmarks/vlt_train_speed.py)
}


def warmup_steps(args: argparse.Namespace, steps: int) -> int:
    return min(200, steps // 10) if args.warmup == "auto" else int(args.warmup)


def recipe(
    args: argparse.Namespace,
    switches: dict[str, Any],
    seed: int,
    out_dir: Path,
    phase: str = "main",
    init_from: str | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The shared training recipe (a small VLT at ``args.size`` px) with one variant's switches.

    ``phase``: ``main`` (the run, after any curriculum) or ``easy`` (the curriculum: ``args.curriculum``
    steps on the default split at the warmed-up rate, no decay). ``init_from`` / ``vocab_size``: the
    curriculum's checkpoint and vocabulary size, which the main phase continues from.
    """
    w = args.width
    easy = phase == "easy"
    steps = args.curriculum if easy else args.steps - args.curriculum
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
        "text": {"word_dim": 32, "hidden_dim": w, **({"vocab_size": vocab_size} if vocab_size else {})},
        **BASE,
        **switches,
    }
    world = {"size": args.size}
    hard = {"hard": True} if args.hard else {}  # absent when off: the first recipe's exact data kwargs
    return {
        "task": "vlt-referring",
        "model": "vlt-tiny",
        "model_kwargs": model_kwargs,
        "data": {
            "name": "shapeworld-referring",
            "kwargs": {"num_scenes": args.train_scenes, "seed": 0, **world, **({} if easy else hard)},
            "batch_size": args.batch_size,
            "scale_range": [1, 1],
        },
        "val_data": {
            "name": "shapeworld-referring",
            "kwargs": {"num_scenes": args.val_scenes, "seed": 1, **world, **hard},
            "batch_size": 64,
        },
        "optim": {
            "name": "adamw",
            "lr": args.lr,
            "weight_decay": 1e-4,
            "head_lr_mult": 1.0,
            "warmup_steps": warmup_steps(args, steps),
            "poly_power": 0.0 if easy else 0.9,  # the decay belongs to the whole run, not the curriculum
            "grad_clip_norm": 10.0,
        },
        "max_steps": steps,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "seed": seed,
        "out_dir": str(out_dir),
        "log_every": max(1, args.steps // 10),
        "eval_every": args.eval_every,
        "checkpoint_every": steps,  # one checkpoint, at the end (the curriculum's is the main's start)
        "keep_checkpoints": 1,
        "init_from": init_from,
        "device": "cpu",
        "progress": False,
    }


def validation_curve(out_dir: Path, offset: int = 0) -> list[list[float]]:
    """``[[step, IoU, mIoU], ...]``: the engine's held-out evaluations of a run (its metrics.jsonl)."""
    records = read_metrics_log(out_dir / "metrics.jsonl")
    return [[r["step"] + offset, r["oIoU"], r["mIoU"]] for r in records if r.get("kind") == "eval"]


def scores_by_kind(module: torch.nn.Module, config: TrainConfig) -> dict[str, dict[str, float]]:
    """Held-out scores per expression kind (attribute / position / relation), with the engine's
    evaluation on the subsets of the validation set (the same set, masks and mapping as its scores)."""
    assert config.val_data is not None
    val = build_dataset(config.val_data.name, config.val_data.kwargs)
    groups: dict[str, list[int]] = {}
    for i, (_, expr) in enumerate(val.index):  # type: ignore[attr-defined]
        groups.setdefault(expr.kind, []).append(i)
    out = {}
    for kind, items in sorted(groups.items()):
        scores = evaluate(
            module, Subset(val, items), ReferringEvaluator(), config.val_data, None, config.precision
        )
        out[kind] = {"IoU": scores.overall_iou, **scores.as_dict(), "count": len(items)}
    return out


def run_variant(args: argparse.Namespace, switches: dict[str, Any], seed: int) -> Run:
    """Train one variant for ``args.steps`` steps (curriculum included) and return its held-out scores,
    ``seconds``, the validation ``curve`` and the scores by expression ``kinds``."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        curve: list[list[float]] = []
        init_from, vocab_size = None, None
        if args.curriculum:
            easy_dir = Path(tmp) / "easy"
            easy = fit(config_from_dict(recipe(args, switches, seed, easy_dir, "easy")))
            curve += validation_curve(easy_dir)
            # The main phase starts from these weights and this vocabulary (same words, pinned size).
            init_from, vocab_size = str(easy.checkpoint), len(easy.module.tokenizer)
        config = config_from_dict(
            recipe(args, switches, seed, Path(tmp) / "run", "main", init_from, vocab_size)
        )
        result = fit(config)
        seconds = time.perf_counter() - start
        curve += validation_curve(Path(tmp) / "run", args.curriculum)
    assert result.metrics is not None
    kinds = scores_by_kind(result.module, config)
    return {
        "IoU": result.metrics["oIoU"],
        **result.metrics,
        "seconds": seconds,
        "curve": curve,
        "kinds": kinds,
    }


def warmup_arg(text: str) -> str | int:
    return "auto" if text == "auto" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="the paper's network on the hard split")
    parser.add_argument("--steps", type=int, help="optimiser steps per variant, curriculum included")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--size", type=int, default=64, help="image and model input side (px)")
    parser.add_argument("--tables", default="1,2,3", help="comma-separated table numbers")
    parser.add_argument("--queries", help="Table 3's query counts (first recipe 1,...,32; paper 1,4,16)")
    parser.add_argument("--width", type=int, default=32, help="hidden width of the small VLT")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out-stride", type=int, default=2, help="VLT output stride (official 2)")
    on_off = argparse.BooleanOptionalAction
    parser.add_argument(
        "--lower-feat", action=on_off, help="concatenate the QGM input features into the mask head "
        "(official concate_lower_feat, commented out there; first recipe on, paper off)",
    )  # fmt: skip
    parser.add_argument(
        "--fine-skip",
        action=on_off,
        default=False,
        help="join the finest backbone map into the mask head (off in vlt-shapes and the recorded tables)",
    )
    parser.add_argument("--loss-resolution", choices=("output", "input"), help="see langseg vlt_loss")
    parser.add_argument("--hard", action=on_off, help="ShapeWorld-Ref's hard split (docs/shapeworld.md)")
    parser.add_argument("--warmup", type=warmup_arg, help="linear warm-up steps (first recipe: auto)")
    parser.add_argument("--curriculum", type=int, default=0, help="steps on the default split first")
    parser.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (0: end)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="autocast (both recipes fp32)")
    parser.add_argument("--channels-last", action=on_off, help="NHWC weights and images (paper: on)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--val-scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache", type=Path, help="JSON file of finished runs: reused, and extended")
    parser.add_argument("--curves", action="store_true", help="also print the validation curves")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny worlds, 4 steps")
    args = parser.parse_args(argv)
    for key, value in (PAPER if args.paper else FIRST).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.steps, args.size, args.width, args.batch_size = 4, 32, 16, 4
        args.train_scenes, args.val_scenes = 4, 2
        args.eval_every, args.curriculum = min(args.eval_every, 2), min(args.curriculum, 2)
    if not 0 <= args.curriculum < args.steps:
        parser.error(f"--curriculum must be in [0, --steps), got {args.curriculum}")
    return args


# The settings that change what a run learns (or, eval_every, where its curve is sampled): a cache
# written under other settings is refused.
MODEL_KEYS = ("size", "width", "out_stride", "lower_feat", "fine_skip", "loss_resolution", "precision")
LAYOUT_KEYS = ("channels_last",)  # same arithmetic, other rounding: kept apart all the same
DATA_KEYS = ("train_scenes", "val_scenes", "hard", "batch_size")
SCHEDULE_KEYS = ("steps", "lr", "warmup", "curriculum", "eval_every")
RECIPE_KEYS = MODEL_KEYS + LAYOUT_KEYS + DATA_KEYS + SCHEDULE_KEYS


# Settings added after caches were written: a cache without them ran with these values. Before
# "upsample" was recorded, held-out masks were the resized sigmoid probabilities (the official mapping).
RECIPE_DEFAULTS: dict[str, Any] = {
    "fine_skip": False,
    "upsample": "probability",
    "hard": False,
    "warmup": "auto",
    "curriculum": 0,
    "eval_every": 0,
    "precision": "fp32",
    "channels_last": False,
}
# How held-out masks reach the image: the training engine scores the way the Referrer predicts.
UPSAMPLE = "logits"


def recipe_record(args: argparse.Namespace) -> dict[str, Any]:
    """What a cache records of the recipe, to refuse runs made under other settings."""
    return {**{k: getattr(args, k) for k in RECIPE_KEYS}, "upsample": UPSAMPLE}


def key_of(switches: dict[str, Any]) -> str:
    """One key per distinct model: "Nq = 16" and the base variant are the same run."""
    return json.dumps({**BASE, **switches}, sort_keys=True)


def load_cache(args: argparse.Namespace) -> dict[str, dict[str, Run]]:
    """Runs of earlier invocations (``--cache``): switches (JSON) -> seed -> scores."""
    if args.cache is None or not args.cache.is_file():
        return {}
    data = json.loads(args.cache.read_text())
    recipe_args = recipe_record(args)
    if {**RECIPE_DEFAULTS, **data["recipe"]} != recipe_args:
        sys.exit(f"error: {args.cache} holds runs of another recipe {data['recipe']}; use another --cache")
    return data["runs"]


def save_cache(args: argparse.Namespace, runs: dict[str, dict[str, Run]]) -> None:
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
    numbers = [int(t) for t in args.tables.split(",")]
    layout = tables([int(n) for n in args.queries.split(",")])
    unknown = [t for t in numbers if t not in layout]
    if unknown:
        sys.exit(f"error: unknown table {unknown[0]}; choose from 1, 2, 3")
    runs = load_cache(args)  # a variant shared by several tables trains once per seed
    save_cache(args, runs)  # also picks up runs other processes finished meanwhile
    start = time.perf_counter()
    for number in numbers:
        for name, switches in layout[number][1]:
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
    keys = {key_of(switches) for t in numbers for _, switches in layout[t][1]}
    trained = sum(runs[key][str(seed)]["seconds"] for key in keys for seed in seeds)
    setup = (
        f"ShapeWorld-Ref{' (hard split)' if args.hard else ''}, {args.size} px, {args.steps} steps x batch "
        f"{args.batch_size}, width {args.width}",
        f"out stride {args.out_stride}, lower features {args.lower_feat}, fine skip {args.fine_skip}",
        f"loss at {args.loss_resolution}",
        f"warm-up {warmup_steps(args, args.steps - args.curriculum)} steps, poly decay"
        + (f", first {args.curriculum} steps on the default split" if args.curriculum else ""),
        f"{args.precision}{', channels-last' if args.channels_last else ''}, seeds {args.seeds}",
        f"{args.train_scenes} training / {args.val_scenes} held-out scenes, {args.threads} thread(s)",
        f"training time of these runs {trained / 60:.1f} min (this invocation {wall / 60:.1f} min)",
    )
    print("\n" + "; ".join(setup))
    for number in numbers:
        title, variants = layout[number]
        rows = [(name, [runs[key_of(switches)][str(s)] for s in seeds]) for name, switches in variants]
        print_table(title, rows)
        if args.curves:
            print_curves(rows)


if __name__ == "__main__":
    main()
