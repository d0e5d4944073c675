"""Optimiser from a train module's parameter groups, and the poly learning-rate schedule.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` whose lambda is a small picklable object
(:class:`PolyWarmup`), so ``scheduler.state_dict()`` holds plain numbers and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from langseg.train.config import OptimConfig

__all__ = ["PolyWarmup", "build_optimizer", "build_scheduler", "head_backbone_groups"]


def head_backbone_groups(
    backbone: Iterable[nn.Parameter], head: Iterable[nn.Parameter], base_lr: float, head_lr_mult: float
) -> list[dict[str, Any]]:
    """Two parameter groups: backbone at ``base_lr`` and head at ``base_lr * head_lr_mult`` (LSeg's
    recipe); frozen parameters (``requires_grad=False``) are left out."""
    return [
        {"name": "backbone", "params": [p for p in backbone if p.requires_grad], "lr": base_lr},
        {"name": "head", "params": [p for p in head if p.requires_grad], "lr": base_lr * head_lr_mult},
    ]


def _param_groups(module: nn.Module, base_lr: float) -> list[dict[str, Any]]:
    if hasattr(module, "param_groups"):
        groups = list(module.param_groups(base_lr))
    else:
        groups = [{"params": [p for p in module.parameters() if p.requires_grad]}]
    groups = [dict(g, params=list(g["params"])) for g in groups]
    groups = [g for g in groups if g["params"]]  # an empty group (e.g. a frozen head) is no error
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears in two param_groups of the train module")
            seen.add(id(p))
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        # A trainable parameter outside every group would silently never update.
        raise ValueError(f"trainable parameters missing from param_groups(): {missing[:5]}")
    return groups


def build_optimizer(module: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over ``module.param_groups(config.lr)``.

    Groups may set their own ``lr`` / ``weight_decay``; others take ``config``'s. A module without
    ``param_groups`` gets one group of all its trainable parameters.
    """
    groups = _param_groups(module, config.lr)
    if config.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


class PolyWarmup:
    """LR factor at optimiser step ``t`` (0-based: the factor used *by* step ``t``).

    ``poly(t) = (1 - min(t, T) / T) ** power`` and, with ``W`` warm-up steps,
    ``factor(t) = poly(t) * min(1, (t + 1) / W)``; so the first step runs at ``poly(0) / W``, never 0.
    """

    def __init__(self, total_steps: int, power: float = 0.9, warmup_steps: int = 0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.power, self.warmup_steps = total_steps, power, warmup_steps

    def __call__(self, step: int) -> float:
        factor = (1.0 - min(step, self.total_steps) / self.total_steps) ** self.power
        if self.warmup_steps > 0:
            factor *= min(1.0, (step + 1) / self.warmup_steps)
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Poly decay (with optional linear warm-up) over ``total_steps``; call ``step()`` once per
    optimiser step."""
    return LambdaLR(optimizer, PolyWarmup(total_steps, config.poly_power, config.warmup_steps))
