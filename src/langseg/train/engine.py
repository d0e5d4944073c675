"""The training engine: :func:`fit` trains any registered task, in one process or under ``torchrun``.

One optimiser step consumes ``grad_accum_steps`` micro-batches of ``data.batch_size`` samples on each of
``world_size`` ranks. Gradients are averaged across ranks by DistributedDataParallel (synchronised only
on the last micro-batch of a step); the loss of each micro-batch is divided by ``grad_accum_steps`` so
that accumulation equals one large batch.

Exact resume. A checkpoint (rank 0, atomically, see :mod:`langseg.train.checkpoint`) holds the model,
optimiser, scheduler and gradient-scaler states, the position (global step, epoch, micro-batches consumed
in the epoch) and the RNG states of *every* rank. Data order depends only on ``(seed, epoch)`` and each
sample's augmentation only on ``(seed, epoch, index)``, and DataLoaders draw from their own generators,
so a resumed run skips the consumed samples without loading them and continues bit-identically (on the
CPU and with deterministic kernels on GPU), given the same world size and batch layout.

Logs: ``out_dir/metrics.jsonl``, one JSON object per line: ``{"kind": "train", "step", "epoch", "loss",
"lr", "throughput" (samples/s over all ranks), "time"}`` every ``log_every`` steps and ``{"kind": "eval",
"step", "epoch", <metric>: value, ...}`` per evaluation (NaN is written as null). Resuming drops the lines
of steps after the checkpoint, so the file describes one continuous run.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from langseg.distributed import DistInfo, ShardedSampler, init_distributed, shutdown_distributed
from langseg.errors import BadConfigError, OutputError
from langseg.evaluate import Evaluator, run_evaluator
from langseg.train import checkpoint as ckpt
from langseg.train.checkpoint import TrainState
from langseg.train.config import DataConfig, TrainConfig, config_to_dict
from langseg.train.optim import build_optimizer, build_scheduler
from langseg.train.tasks import TaskBuilder, TaskParts, get_task
from langseg.train.transforms import AugmentedDataset, TrainTransform, collate, normalize

__all__ = ["FitResult", "TrainState", "evaluate", "fit"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained (unwrapped) module, where training stopped, the last
    checkpoint written (``None`` if none) and the last evaluation's scores (``None`` if none)."""

    module: nn.Module
    state: TrainState
    total_steps: int
    checkpoint: Path | None
    metrics: dict[str, float] | None
    stopped_early: bool


def _prepare(
    batch: dict[str, Any], device: torch.device, data: DataConfig, channels_last: bool = False
) -> dict[str, Any]:
    """Move tensors to ``device`` and turn ``uint8`` images into normalised float (``B x 3 x H x W``,
    channels-last in memory if asked)."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["image"] = normalize(out["image"], data.mean, data.std)
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _loader(
    dataset: Dataset,
    sampler: ShardedSampler,
    data: DataConfig,
    seed: int,
    device: torch.device,
    drop_last: bool,
) -> DataLoader:
    # An own generator: otherwise creating the iterator draws from torch's global RNG (for worker seeds),
    # which would shift the dropout stream between an uninterrupted and a resumed run.
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def evaluate(
    module: nn.Module,
    dataset: Dataset,
    evaluator: Evaluator,
    data: DataConfig,
    info: DistInfo | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> Any:
    """Score ``module.predict`` on ``dataset`` with ``evaluator`` (see :mod:`langseg.evaluate`), each rank
    on its shard of DataLoader batches (normalised as in training), summed over ranks.

    Every rank must call this together (``info`` from :func:`~langseg.distributed.init_distributed`;
    ``None`` = one process); ``precision`` and ``channels_last`` as in training. Returns the reduced
    metric's ``compute()`` (e.g. :class:`~langseg.metrics.SemanticScores`, the same on every rank;
    ``.as_dict()`` for logging); the module's train/eval mode is restored afterwards.
    """
    info = info or DistInfo(0, 1, 0, next(module.parameters(), torch.empty(0)).device)
    sampler = ShardedSampler(len(dataset), info.rank, info.world_size, shuffle=False, even=False)  # type: ignore[arg-type]
    loader = _loader(dataset, sampler, data, seed=0, device=info.device, drop_last=False)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _autocast(info.device, precision):
            batches = (_prepare(b, info.device, data, channels_last) for b in loader)
            return run_evaluator(evaluator, module.predict, batches)
    finally:
        module.train(was_training)


class _Recorder:
    """Rank 0's metrics.jsonl writer and progress bar; inert on other ranks."""

    def __init__(self, config: TrainConfig, info: DistInfo, total: int, start: int) -> None:
        self.active = info.is_main
        self.path = Path(config.out_dir) / "metrics.jsonl"
        show = self.active and config.progress and sys.stderr.isatty()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.progress = Progress(*columns, console=Console(stderr=True), disable=not show)
        self.task = self.progress.add_task("training", total=total, completed=start)

    def truncate_after(self, step: int | None) -> None:
        """Drop records of steps after ``step`` (they belong to a run that was cut off; ``None``: all of
        them, unread). A torn last line, from a kill mid-write, goes too (see ``read_metrics_log``)."""
        if not self.active or not self.path.is_file():
            return
        records = [] if step is None else [r for r in ckpt.read_metrics_log(self.path) if r["step"] <= step]
        try:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in records))
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None

    def advance(self, step: int, loss: float | None = None) -> None:
        if loss is not None:
            self.progress.update(self.task, description=f"training  loss {loss:.4f}")
        self.progress.update(self.task, completed=step)


def _check_fresh_out_dir(out_dir: Path) -> None:
    if ckpt.list_checkpoints(out_dir / "checkpoints") or (out_dir / "metrics.jsonl").is_file():
        raise OutputError(
            f"{out_dir} already holds a training run",
            hint="Pass --resume auto to continue it, or choose a new out_dir=...",
        )


def fit(
    config: TrainConfig,
    build_task: TaskBuilder | None = None,
    *,
    resume: str | Path | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> FitResult:
    """Train ``config.task`` (or ``build_task(config)``) as configured; see the module docstring.

    Args:
        config: the run.
        build_task: task builder; by default the one registered as ``config.task``.
        resume: ``None`` (fresh run; ``out_dir`` must not hold one), ``"auto"`` (newest checkpoint in
            ``out_dir/checkpoints``; with none yet, a fresh start that discards the log of a run killed
            before its first checkpoint: what a preemptible job should pass on every launch) or a
            checkpoint file or folder.
        should_stop: called with the global step after each optimiser step (after any log, eval and
            checkpoint of that step) on every rank; returning true stops at once, without a further
            checkpoint, as a kill would. Must return the same on every rank.

    Raises:
        BadConfigError, OutputError, BadDataError: bad settings, an unwritable ``out_dir``, a fresh run in
            a folder that holds one, an unreadable checkpoint.
    """
    info = init_distributed(config.device)
    try:
        result = _fit(config, build_task or get_task(config.task), resume, should_stop, info)
    except BaseException:
        shutdown_distributed(info, barrier=False)
        raise
    shutdown_distributed(info)
    return result


def _fit(
    config: TrainConfig,
    build_task: TaskBuilder,
    resume: str | Path | None,
    should_stop: Callable[[int], bool] | None,
    info: DistInfo,
) -> FitResult:
    out_dir, device, data = Path(config.out_dir), info.device, config.data
    resume_path = ckpt.resolve_resume(resume, out_dir)
    auto = resume is not None and str(resume) == "auto"
    if resume_path is None and not auto:
        _check_fresh_out_dir(out_dir)  # on every rank, so that all stop together
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    ckpt.seed_everything(config.seed)  # the same initial weights on every rank
    parts = TaskParts(*build_task(config))
    module = parts.module
    if config.init_from is not None and resume_path is None and not auto:
        ckpt.load_initial_weights(module, config.init_from)
    module = module.to(device)
    if config.channels_last:  # 4-D weights only; the optimiser's in-place updates keep the layout
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ckpt.seed_everything(ckpt.rank_seed(config.seed, info.rank))  # then independent streams per rank

    transform = TrainTransform(data.crop_size, data.scale_range, data.hflip, data.ignore_index)
    train_data = AugmentedDataset(parts.train_dataset, transform, seed=config.seed)
    sampler = ShardedSampler(len(train_data), info.rank, info.world_size, shuffle=True, seed=config.seed)
    accum = config.grad_accum_steps
    batches_per_epoch = len(sampler) // data.batch_size // accum * accum  # whole optimiser steps only
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise BadConfigError(
            f"the training set ({len(train_data)} samples) is smaller than one optimiser step "
            f"(batch_size {data.batch_size} x grad_accum_steps {accum} x {info.world_size} processes)",
            hint="Lower data.batch_size or grad_accum_steps, or use more data.",
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    optimizer = build_optimizer(module, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    state = TrainState()
    if resume_path is not None:
        objects = (module, optimizer, scheduler, scaler)
        state = ckpt.restore_training(resume_path, config, info, *objects, total_steps)

    model: nn.Module = module
    if info.distributed:
        model = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )
    recorder = _Recorder(config, info, total_steps, state.step)
    if info.is_main:
        try:
            (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        except OSError as err:
            raise OutputError(f"cannot write to {out_dir}: {err.strerror or err}") from err
        # A save killed mid-write left a hidden temporary file; nothing else writes here now.
        ckpt.remove_stale_temporaries(out_dir / "checkpoints")
        if resume_path is not None or auto:  # "auto" with no checkpoint yet starts the log over
            recorder.truncate_after(state.step if resume_path is not None else None)
    # Resuming a finished run must neither rewrite its last checkpoint nor log its evaluation twice.
    saved_at = state.step if resume_path is not None else -1
    last_ckpt: Path | None = resume_path
    last_metrics: dict[str, float] | None = None
    loss_sum = torch.zeros((), device=device)
    loss_count, logged_step, logged_time = 0, state.step, time.perf_counter()
    stopped = False

    def run_eval() -> None:
        nonlocal last_metrics
        if parts.val_dataset is None or parts.evaluate is None or state.last_eval_step == state.step:
            return
        val_cfg = config.val_data or data
        scores = evaluate(
            module, parts.val_dataset, parts.evaluate, val_cfg, info, config.precision, config.channels_last
        )
        last_metrics = scores.as_dict()
        state.last_eval_step = state.step
        recorder.write({"kind": "eval", "step": state.step, "epoch": state.epoch, **last_metrics})

    def save() -> None:
        nonlocal last_ckpt, saved_at
        if saved_at == state.step:
            return
        rng = ckpt.get_rng_state()
        rngs: list[Any] = [rng]
        if info.distributed:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)  # each rank's stream, so every rank resumes exactly
        if info.is_main:
            payload = {
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "state": vars(state).copy(),
                "layout": {"world_size": info.world_size, "batch_size": data.batch_size, "accum": accum},
                "rng": rngs,
                "task": config.task,
                "config": config_to_dict(config),
            }
            name = ckpt.checkpoint_name(state.step)
            last_ckpt = ckpt.save_checkpoint(payload, out_dir / "checkpoints" / name)
            ckpt.prune_checkpoints(out_dir / "checkpoints", config.keep_checkpoints)
        saved_at = state.step

    module.train()
    with recorder.progress:
        while state.step < total_steps and not stopped:
            train_data.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            sampler.set_window(state.batch_in_epoch * data.batch_size, batches_per_epoch * data.batch_size)
            loader_seed = ckpt.rank_seed(config.seed, info.rank, state.epoch, 1)
            loader = _loader(train_data, sampler, data, loader_seed, device, drop_last=True)
            for batch in loader:
                final_micro = (state.batch_in_epoch + 1) % accum == 0
                batch = _prepare(batch, device, data, config.channels_last)
                sync = contextlib.nullcontext()
                if info.distributed and not final_micro:
                    sync = model.no_sync()  # type: ignore[operator]  # all-reduce only on the last micro-batch
                with sync:
                    with _autocast(device, config.precision):
                        loss = model(batch)["loss"]
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().float()
                loss_count += 1
                state.batch_in_epoch += 1
                if not final_micro:
                    continue
                _optimizer_step(module, optimizer, scaler, config)
                scheduler.step()
                state.step += 1
                epoch_end = state.batch_in_epoch == batches_per_epoch
                if epoch_end:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                last = state.step >= total_steps
                if state.step % config.log_every == 0 or last:
                    loss_value = _mean_over_ranks(loss_sum, loss_count, info)
                    if not math.isfinite(loss_value):
                        raise BadConfigError(
                            f"the training loss became {loss_value} at step {state.step}",
                            hint="Lower optim.lr, set optim.grad_clip_norm, or use bf16 instead of fp16.",
                        )
                    now = time.perf_counter()
                    samples = (state.step - logged_step) * data.batch_size * accum * info.world_size
                    lr = config.optim.lr * scheduler.lr_lambdas[0](state.step - 1)  # the step just taken
                    recorder.write({
                        "kind": "train", "step": state.step, "epoch": state.epoch, "loss": loss_value,
                        "lr": lr, "throughput": samples / max(now - logged_time, 1e-9), "time": time.time(),
                    })  # fmt: skip
                    recorder.advance(state.step, loss_value)
                    loss_sum.zero_()
                    loss_count, logged_step, logged_time = 0, state.step, now
                else:
                    recorder.advance(state.step)
                if (
                    (config.eval_every and state.step % config.eval_every == 0)
                    or (not config.eval_every and epoch_end)
                    or last
                ):
                    run_eval()
                if (
                    (config.checkpoint_every and state.step % config.checkpoint_every == 0)
                    or (not config.checkpoint_every and epoch_end)
                    or last
                ):
                    save()
                if should_stop is not None and should_stop(state.step):
                    stopped = True
                if last or stopped:
                    break
            if not stopped and state.step < total_steps and state.batch_in_epoch:
                # The window ended short of the epoch (only after resuming with another batch layout).
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if not stopped and state.step >= total_steps:
        run_eval()
        save()
    return FitResult(module, state, total_steps, last_ckpt, last_metrics, stopped)


def _optimizer_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: TrainConfig
) -> None:
    if config.optim.grad_clip_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(module.parameters(), config.optim.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _mean_over_ranks(loss_sum: torch.Tensor, count: int, info: DistInfo) -> float:
    """Mean micro-batch loss since the last log, over all ranks (one small all-reduce per log)."""
    totals = torch.stack([loss_sum.detach().float(), torch.tensor(float(count), device=loss_sum.device)])
    if info.distributed:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))
