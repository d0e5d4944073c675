"""Checks of what a resume reads: a training checkpoint's entries against this run's own objects, the
run's ``metrics.jsonl`` log, and the temporary files a killed checkpoint writer left behind.

A damaged checkpoint must fail at once with a :class:`~langseg.errors.BadDataError` naming the entry,
not be accepted by ``load_state_dict`` and fail later, mid-training, with a raw error; a log torn by a
kill must not stop ``--resume auto``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from langseg.errors import BadDataError
from langseg.hub import clean_message

OLDER = "Resume from another checkpoint of the run (an older step), or start a new run (another out_dir)."
# What a resume reads besides "model", with the kind of value each must be.
_RESUME_KEYS = {
    "optimizer": dict, "scheduler": dict, "scaler": dict, "state": dict, "layout": dict, "rng": list,
    "task": str,
}  # fmt: skip


def check_resume_state(state: dict[str, Any], path: Path, templates: dict[str, Any]) -> None:
    """A :class:`BadDataError` naming the first entry of checkpoint ``state`` that a resume cannot use.

    ``templates`` holds what this run's own objects give (the ``state`` position, ``scheduler``,
    ``scaler`` and ``rng`` state dicts, optimiser ``param_groups``): the checkpoint's values must have
    the same keys and kinds of values (numbers where numbers are, tensors of the same shape, ...).
    Without this, a damaged value would be accepted by ``load_state_dict`` and fail later, mid-training,
    with a raw error.
    """
    for key, kind in _RESUME_KEYS.items():
        if key not in state:
            raise BadDataError(f"checkpoint {path} has no {key!r} entry", hint=OLDER)
        if not isinstance(state[key], kind):
            raise BadDataError(
                f"checkpoint {path}: {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}",
                hint=OLDER,
            )
    optimizer, groups = state["optimizer"], state["optimizer"].get("param_groups")
    problems = [
        _mismatch(templates["state"], state["state"], "state", extra_ok=False),
        _mismatch({"world_size": 1, "batch_size": 1, "accum": 1}, state["layout"], "layout", extra_ok=False),
        _mismatch(templates["scheduler"], state["scheduler"], "scheduler", extra_ok=False),
        _mismatch(templates["scaler"], state["scaler"], "scaler", extra_ok=False),
        None if _is_state(optimizer.get("state")) else "optimizer.state is not a dict of per-parameter dicts",
        None if isinstance(groups, list) and all(_is_group(g) for g in groups) else "optimizer.param_groups",
        *(_mismatch(templates["rng"], rng, f"rng[{i}]", none_ok=True) for i, rng in enumerate(state["rng"])),
    ]
    if not any(problems) and len(groups) == len(templates["param_groups"]):  # else: another model
        plain = [
            [{k: v for k, v in g.items() if k != "params"} for g in gs]
            for gs in (templates["param_groups"], groups)
        ]
        problems.append(_mismatch(plain[0], plain[1], "optimizer.param_groups"))
    lowest = {"last_eval_step": -1, "world_size": 1, "batch_size": 1, "accum": 1}
    for section in ("state", "layout"):
        for key, value in state[section].items():
            if isinstance(value, int) and not lowest.get(key, 0) <= value < 2**62:
                problems.append(f"{section}.{key} is {value}, out of range")
    problem = next((p for p in problems if p), None)
    if problem is not None:
        raise BadDataError(f"checkpoint {path} is damaged: {problem}", hint=OLDER)


def _is_state(state: Any) -> bool:
    return isinstance(state, dict) and all(isinstance(v, dict) for v in state.values())


def _is_group(group: Any) -> bool:
    params = group.get("params") if isinstance(group, dict) else None
    return isinstance(params, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in params)


def check_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """After ``optimizer.load_state_dict``: every per-parameter state is a number, a flag or a tensor of
    the parameter's shape (a scalar step counter aside), else a :class:`BadDataError`."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                fits = value is None or isinstance(value, (bool, int, float))
                if isinstance(value, torch.Tensor):
                    fits = value.dim() == 0 or value.shape == param.shape
                if not fits:
                    raise BadDataError(
                        f"checkpoint {path} is damaged: optimizer state {key!r} does not fit a parameter of "
                        f"shape {tuple(param.shape)}",
                        hint=OLDER,
                    )


def _mismatch(
    template: Any, value: Any, where: str, extra_ok: bool = True, none_ok: bool = False
) -> str | None:
    """Where ``value`` differs in structure from ``template`` (same keys, same kinds of values; numbers
    finite; tensors of the same shape and dtype); ``None`` if it does not. A ``None`` template goes with
    any scalar or tensor; with ``none_ok`` a ``None`` value does too (RNG states: Python's cached
    Gaussian, a CUDA state saved on a GPU machine and resumed on a CPU one, or the other way)."""
    if template is None or (value is None and none_ok):
        ok = all(v is None or isinstance(v, (bool, int, float, torch.Tensor)) for v in (template, value))
        return None if ok else f"{where} is a {type(value).__name__}"
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return f"{where} is a {type(value).__name__}, not a dict"
        missing = [k for k in template if k not in value]
        extra = [k for k in value if k not in template]
        if missing or (extra and not extra_ok):
            return (
                f"{where} has no {missing[0]!r}"
                if missing
                else f"{where} has an unknown key {extra[0]!r:.60}"
            )
        return next(
            (
                m
                for k in template
                if (m := _mismatch(template[k], value[k], f"{where}.{k}", extra_ok, none_ok))
            ),
            None,
        )
    if isinstance(template, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            return f"{where} is not a list of {len(template)}"
        return next(
            (
                m
                for i, (t, v) in enumerate(zip(template, value, strict=True))
                if (m := _mismatch(t, v, f"{where}[{i}]", extra_ok, none_ok))
            ),
            None,
        )
    if isinstance(template, torch.Tensor):
        same = (
            isinstance(value, torch.Tensor)
            and value.shape == template.shape
            and value.dtype == template.dtype
        )
        return None if same else f"{where} is not a {template.dtype} tensor of shape {tuple(template.shape)}"
    if isinstance(template, bool) or isinstance(value, bool):
        return None if type(value) is type(template) else f"{where} is {value!r:.40}, not a bool"
    if isinstance(template, (int, float)):
        number = isinstance(value, int) or (isinstance(value, float) and not isinstance(template, int))
        if not number or not math.isfinite(value):
            return f"{where} is {value!r:.40}, not a finite {type(template).__name__}"
        return None
    return None if isinstance(value, type(template)) else f"{where} is a {type(value).__name__}"


# The hidden temporary names save_checkpoint writes (tempfile.mkstemp: ".step_XXXXXXXX.pt.<random>.tmp").
_TEMPORARY = re.compile(r"^\.step_\d+\.pt\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a writer killed mid-save left in ``folder`` (a run's ``checkpoints/``);
    only names of :func:`save_checkpoint`'s own pattern, nothing else. Returns what it deleted.

    Call it on rank 0 before the run writes its first checkpoint, when no other writer is active.
    """
    removed = []
    with contextlib.suppress(OSError):
        for path in Path(folder).iterdir():
            if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, each a JSON object with an integer ``step``.

    A torn last line (the run was killed while writing it) is dropped: the records after the checkpoint
    are discarded on resume anyway. A bad line before the last is a :class:`BadDataError` naming it.
    """
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise BadDataError(f"cannot read {path}: {err.strerror or err}", hint="Check the file.") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError("not an object with an integer 'step'")
        except (ValueError, RecursionError) as err:  # JSON, UTF-8, or the shape of a record
            if index == len(numbered) - 1:
                break  # a write cut short by a kill
            raise BadDataError(
                f"{path}, line {number}, is not a metrics record ({clean_message(err, 120)})",
                hint="Delete that line (the file is only the run's log), then resume again.",
            ) from None
        records.append(record)
    return records
