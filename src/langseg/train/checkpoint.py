"""Training checkpoints: atomic writes, safe loading, RNG state as plain tensors.

A checkpoint is ``out_dir/checkpoints/step_XXXXXXXX.pt``, written by ``torch.save`` of tensors and plain
containers only, so ``torch.load(path, weights_only=True)`` reads it without executing pickled code.
Writes go to a hidden temporary file in the same folder (``.step_XXXXXXXX.pt.<random>.tmp``), are
fsynced and then renamed over the final name with ``os.replace``: a reader sees either no checkpoint or
a complete one, and a crash mid-write leaves only a temporary file that never matches ``step_*.pt``
(the next run removes it: :func:`remove_stale_temporaries`). Before a resume, every entry is checked
against this run's own objects (:mod:`langseg.train.resume_checks`), so a damaged file fails at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from langseg.distributed import DistInfo
from langseg.errors import BadConfigError, BadDataError, OutputError
from langseg.hub import as_path, check_finite, clean_message, is_dir, is_file, torch_load_safely
from langseg.train.config import TrainConfig
from langseg.train.optim import PolyWarmup
from langseg.train.resume_checks import (
    OLDER,
    check_optimizer_state,
    check_resume_state,
    read_metrics_log,
    remove_stale_temporaries,
)

__all__ = [
    "TrainState",
    "checkpoint_name",
    "find_latest_checkpoint",
    "get_rng_state",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "rank_seed",
    "read_metrics_log",
    "remove_stale_temporaries",
    "resolve_resume",
    "restore_training",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

FORMAT = "langseg-train-checkpoint"
_NAME = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class TrainState:
    """Position in training: optimiser ``step`` (global), ``epoch``, ``batch_in_epoch`` (micro-batches
    each rank has consumed in ``epoch``, always a whole number of steps) and ``last_eval_step``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_eval_step: int = -1


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def rank_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and further keys (rank, epoch, ...), well mixed by SeedSequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """This process's global RNG states as tensors and plain values (``weights_only``-loadable)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (the CUDA part only when a GPU is present)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    Raises:
        OutputError: the folder cannot be created or written; no partial file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same folder as the target: os.replace is only atomic within one file system.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; not on Windows)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as err:
        raise OutputError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` onto the CPU (through
    :func:`langseg.hub.torch_load_safely`, the one ``torch.load``); its ``model`` is checked to be a
    state dict of finite tensors. :func:`check_resume_state` checks the rest before a resume.

    Raises:
        BadConfigError: there is no file at ``path``.
        BadDataError: the file is unreadable, truncated, refused for safety, not a langseg training
            checkpoint, or its ``model`` is missing, malformed or holds NaN/inf.
    """
    path = as_path(path, "the checkpoint path")
    if not is_file(path):
        raise BadConfigError(
            f"checkpoint {path} not found", hint="Pass an existing .pt file, a run folder, or auto."
        )
    try:
        state = torch_load_safely(path)
    except BadDataError as err:
        raise BadDataError(err.message, hint=f"{err.hint} {OLDER}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadDataError(
            f"{path} is not a langseg training checkpoint",
            hint="Pass a step_*.pt file written by `langseg train`.",
        )
    model = state.get("model")
    # Values are tensors, or a module's get_extra_state() under "..._extra_state" (VLT's tokenizer).
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
        for k, v in model.items()
    ):
        what = "no 'model' entry" if model is None else "a 'model' entry that is not a state dict"
        raise BadDataError(f"checkpoint {path} has {what}", hint=OLDER)
    if not isinstance(state.get("task", ""), str):
        raise BadDataError(f"checkpoint {path}: 'task' is not a task name", hint=OLDER)
    check_finite(model, f"checkpoint {path}")
    return state


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``folder``, oldest first (temp files excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """The highest-step ``step_*.pt`` in ``folder``, or ``None``."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep=0`` keeps everything)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep]:
        with contextlib.suppress(OSError):
            path.unlink()


def resolve_resume(resume: str | Path | None, out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> newest in ``out_dir/checkpoints`` (``None`` if there is
    none, so a first run starts fresh), a folder -> newest in it (or its ``checkpoints/``), a file -> it.

    Raises:
        BadConfigError: an explicit path that does not exist or holds no checkpoint.
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        return find_latest_checkpoint(Path(out_dir) / "checkpoints")
    path = Path(resume)
    if path.is_dir():
        found = find_latest_checkpoint(path) or find_latest_checkpoint(path / "checkpoints")
        if found is None:
            raise BadConfigError(f"no step_*.pt checkpoint in {path}", hint="Pass a checkpoint file or auto.")
        return found
    if not path.is_file():
        raise BadConfigError(f"checkpoint {path} not found", hint="Pass an existing .pt file or auto.")
    return path


def restore_training(
    path: Path,
    config: TrainConfig,
    info: DistInfo,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler,
    total_steps: int,
) -> TrainState:
    """Load ``path`` into the training objects and this rank's RNG; returns the position to resume at.

    Every rank reads the file itself (a shared file system is assumed, as for the output folder).
    """
    state_dict = load_checkpoint(path)
    templates = {
        "state": vars(TrainState()),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": get_rng_state(),
        "param_groups": optimizer.state_dict()["param_groups"],
    }
    check_resume_state(state_dict, path, templates)
    if state_dict.get("task") != config.task:
        raise BadConfigError(
            f"checkpoint {path} is from task {state_dict.get('task')!r}, not {config.task!r}",
            hint="Resume with the config the checkpoint was trained with.",
        )
    try:
        module.load_state_dict(state_dict["model"])
        optimizer.load_state_dict(state_dict["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # keys, shapes, group sizes
        raise BadConfigError(
            f"checkpoint {path} does not fit the model built from this config: {clean_message(err)}",
            hint="Resume with the model settings (model, model_kwargs, ...) the checkpoint was trained with.",
        ) from None
    check_optimizer_state(optimizer, path)
    scheduler.load_state_dict(state_dict["scheduler"])
    # The schedule follows the *current* config, so a resumed run may extend max_steps/epochs.
    fresh = PolyWarmup(total_steps, config.optim.poly_power, config.optim.warmup_steps)
    for fn in scheduler.lr_lambdas:
        fn.__dict__.update(vars(fresh))
    scaler.load_state_dict(state_dict["scaler"])
    state = TrainState(**state_dict["state"])
    layout = state_dict["layout"]
    rngs = state_dict["rng"]
    same_layout = (layout["world_size"], layout["batch_size"], layout["accum"]) == (
        info.world_size, config.data.batch_size, config.grad_accum_steps
    )  # fmt: skip
    if same_layout and len(rngs) == info.world_size:
        try:
            set_rng_state(rngs[info.rank])
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # values out of range
            raise BadDataError(
                f"checkpoint {path} is damaged: its RNG state cannot be restored ({clean_message(err)})",
                hint=OLDER,
            ) from None
    else:
        # Another batch layout: keep the sample position (in whole steps) but the run is no longer
        # bit-identical to an uninterrupted one.
        consumed = state.batch_in_epoch * layout["batch_size"] * layout["world_size"]
        per_step = config.data.batch_size * config.grad_accum_steps * info.world_size
        state.batch_in_epoch = consumed // per_step * config.grad_accum_steps
        seed_everything(rank_seed(config.seed, info.rank, state.step))
        if info.is_main:
            print(
                f"warning: {path} was written with world_size/batch_size/accum {tuple(layout.values())}; "
                "resuming at the same sample position, but not bit-identically.",
                file=sys.stderr,
            )
    return state


def load_initial_weights(module: nn.Module, source: str | Path) -> None:
    """Start ``module`` from other weights (``init_from``): a training checkpoint's ``model`` state, or a
    model folder (``model.safetensors`` + ``config.json``) that the task's ``export()`` wrote, which the
    module reads with its ``load_exported(state, config)``.

    Raises:
        BadConfigError: ``source`` does not exist, or its weights do not fit this task's network.
    """
    from langseg.hub import read_checkpoint

    path = as_path(source, "init_from")
    if not (is_file(path) or is_dir(path)):
        raise BadConfigError(
            f"init_from: {path} not found", hint="Pass a step_*.pt checkpoint or an exported model folder."
        )
    try:
        if path.is_file() and path.suffix == ".pt":
            module.load_state_dict(load_checkpoint(path)["model"])
            return
        load_exported = getattr(module, "load_exported", None)
        if load_exported is None:
            raise BadConfigError(
                f"init_from: this task cannot start from a model folder ({path})",
                hint="Pass a step_*.pt training checkpoint instead.",
            )
        load_exported(*read_checkpoint(path))
    except (RuntimeError, KeyError) as err:  # missing/unexpected keys, shape mismatches
        raise BadConfigError(
            f"init_from: the weights in {path} do not fit this config's network: {str(err).splitlines()[0]}",
            hint="Start from weights of the same model (and, for VLT, the same vocabulary).",
        ) from None
