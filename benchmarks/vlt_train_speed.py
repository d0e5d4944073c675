"""CPU training speed of the VLT ablation's paper recipe: fp32 vs bf16 vs channels-last, interleaved.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/vlt_train_speed.py [--threads 1] [--steps 100]

Builds the shared variant of ``benchmarks/vlt_ablation.py --paper`` (transformer, QGM, Nq 16, QBM; no
lower-feature path, loss at output resolution, hard split) through the training task, then trains one
copy per setting from the same initial weights on the same batches, in rounds of ``--round`` steps
that take turns, so that a change in machine load hits every setting alike. A step is what the engine
does: forward (under autocast for bf16), backward, gradient clipping, AdamW. Batches are rendered and
augmented once beforehand; the time to make one (the engine does it in the training process) is
printed apart. Prints the median step time and steps/s per setting, and the mean loss of each copy's
last quarter of steps (does the setting keep the loss curve?), plus the load average.

Settings: ``fp32``; ``bf16`` (autocast, fp32 weights: the engine's ``precision: bf16``);
``fp32-cl`` / ``bf16-cl`` (channels-last weights and images); ``bf16-weights`` (every weight in
bf16, no autocast: not something the engine offers, shown for the speed it would buy).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from langseg.train.config import TrainConfig, config_from_dict
from langseg.train.tasks import TaskParts, get_task
from langseg.train.transforms import AugmentedDataset, TrainTransform, collate, normalize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlt_ablation import parse_args as ablation_args
from vlt_ablation import recipe

SETTINGS = ("fp32", "bf16", "fp32-cl", "bf16-cl", "bf16-weights")
Batch = dict[str, Any]


def make_batches(config: TrainConfig, parts: TaskParts, count: int) -> tuple[list[Batch], float]:
    """``count`` training batches as the engine makes them (augmented, collated, normalised), and the
    median seconds to make one."""
    data = config.data
    transform = TrainTransform(data.crop_size, data.scale_range, data.hflip, data.ignore_index)
    train = AugmentedDataset(parts.train_dataset, transform, seed=config.seed)
    batches, times = [], []
    for b in range(count):
        start = time.perf_counter()
        batch = collate([train[(b * data.batch_size + i) % len(train)] for i in range(data.batch_size)])
        batch["image"] = normalize(batch["image"], data.mean, data.std)
        times.append(time.perf_counter() - start)
        batches.append(batch)
    return batches, statistics.median(times)


class Trainer:
    """One copy of the module under one setting, with its own AdamW, stepping as the engine does."""

    def __init__(self, module: nn.Module, setting: str, lr: float) -> None:
        self.setting = setting
        self.module = copy.deepcopy(module)
        self.channels_last = setting.endswith("-cl")
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if setting == "bf16-weights":
            self.module = self.module.to(torch.bfloat16)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lr, weight_decay=1e-4)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, batch: Batch) -> None:
        """One optimiser step on ``batch`` (``image`` ``B x 3 x H x W`` float, ``mask`` ``B x H x W``)."""
        batch = dict(batch)
        if self.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        if self.setting == "bf16-weights":
            batch["image"] = batch["image"].to(torch.bfloat16)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.setting in ("bf16", "bf16-cl")
            else contextlib.nullcontext()
        )
        start = time.perf_counter()
        with autocast:
            loss = self.module(batch)["loss"]
        loss.backward()
        nn.utils.clip_grad_norm_(self.module.parameters(), 10.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.losses.append(float(loss.detach()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per setting")
    parser.add_argument(
        "--round", type=int, default=10, help="steps per setting before the next takes its turn"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per setting first")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ablation = ablation_args(["--paper", "--batch-size", str(args.batch_size), "--size", str(args.size)])
    ablation.width, ablation.train_scenes, ablation.val_scenes = args.width, 300, 1
    config = config_from_dict(recipe(ablation, {}, 0, Path("unused")))
    parts = TaskParts(*get_task(config.task)(config))
    torch.manual_seed(0)
    batches, make_seconds = make_batches(config, parts, 16)
    trainers = [Trainer(parts.module, s, config.optim.lr) for s in args.settings.split(",")]
    for trainer in trainers:  # untimed: allocator and oneDNN kernel caches warm up
        for i in range(args.warmup):
            trainer.step(batches[i % len(batches)])
        trainer.times.clear()
        trainer.losses.clear()
    done = 0
    while done < args.steps:
        n = min(args.round, args.steps - done)
        for trainer in trainers:
            for i in range(done, done + n):
                trainer.step(batches[(args.warmup + i) % len(batches)])
        done += n
    load = os.getloadavg()
    print(
        f"VLT paper recipe, shared variant, {args.size} px, batch {args.batch_size}, width {args.width}, "
        f"{args.threads} thread(s), {args.steps} timed steps per setting in rounds of {args.round}; "
        f"torch {torch.__version__}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"making one batch (render, augment, collate): {1000 * make_seconds:.1f} ms, not in the step times\n"
    )
    base = statistics.median(trainers[0].times)
    print("| setting | median step (ms) | steps/s | vs first | loss, last quarter |")
    print("|---|---:|---:|---:|---:|")
    for t in trainers:
        median = statistics.median(t.times)
        tail = statistics.mean(t.losses[-max(1, len(t.losses) // 4) :])
        print(f"| {t.setting} | {1000 * median:.1f} | {1 / median:.2f} | {base / median:.2f}x | {tail:.1f} |")


if __name__ == "__main__":
    main()
