"""Losses, the optimiser built from param_groups, and the poly schedule (known answers, resume)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from langseg.errors import BadDataError
from langseg.train.config import OptimConfig
from langseg.train.losses import binary_mask_loss, cross_entropy, dice_loss
from langseg.train.optim import PolyWarmup, build_optimizer, build_scheduler
from langseg.train.tasks import ToySegmenter


def test_poly_schedule_known_values() -> None:
    poly = PolyWarmup(total_steps=100, power=0.9)
    assert poly(0) == pytest.approx(1.0)
    assert poly(50) == pytest.approx(0.5**0.9) and poly(50) == pytest.approx(0.5358867312681466)
    assert poly(99) == pytest.approx(0.01**0.9) and poly(99) == pytest.approx(0.015848931924611134)
    assert poly(100) == 0.0 and poly(150) == 0.0
    warm = PolyWarmup(total_steps=100, power=1.0, warmup_steps=10)
    assert warm(0) == pytest.approx(0.1)  # never a zero learning rate on the first step
    assert warm(4) == pytest.approx(0.96 * 0.5)
    assert warm(9) == pytest.approx(0.91) and warm(10) == pytest.approx(0.90)


def test_optimizer_groups_get_head_multiplier_and_schedule_resumes() -> None:
    module = ToySegmenter(num_classes=3, width=8, head_lr_mult=10.0)
    config = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer = build_optimizer(module, config)
    assert [g["name"] for g in optimizer.param_groups] == ["backbone", "head"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 1.0])
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.9)
    scheduler = build_scheduler(optimizer, config, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    expected = 0.6**0.9  # the factor used by step 4 of 10
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * expected, 1.0 * expected])

    # A new optimiser + scheduler loaded from the state dicts continues on the same curve.
    optimizer2 = build_optimizer(module, config)
    scheduler2 = build_scheduler(optimizer2, config, total_steps=10)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    for sched, opt in ((scheduler, optimizer), (scheduler2, optimizer2)):
        opt.step()
        sched.step()
    assert optimizer2.param_groups[1]["lr"] == pytest.approx(optimizer.param_groups[1]["lr"])
    assert optimizer2.param_groups[1]["lr"] == pytest.approx(1.0 * 0.5**0.9)

    adamw = build_optimizer(module, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


def test_parameters_missing_from_groups_are_an_error() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def param_groups(self, base_lr: float) -> list[dict]:
            return [{"params": self.a.parameters()}]

    with pytest.raises(ValueError, match=r"b\.weight"):
        build_optimizer(Partial(), OptimConfig())
    plain = nn.Linear(2, 2)  # no param_groups: one group of everything
    assert len(build_optimizer(plain, OptimConfig()).param_groups) == 1


def test_cross_entropy_ignores_255_and_upsamples() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :3] = 255
    valid = target != 255
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert cross_entropy(logits, target).item() == pytest.approx(manual.item(), rel=1e-6)
    # Half-resolution logits are upsampled bilinearly to the target.
    small = torch.randn(2, 4, 4, 4)
    up = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert cross_entropy(small, target).item() == pytest.approx(cross_entropy(up, target).item(), rel=1e-6)
    # A batch with no labelled pixel gives 0 with a gradient, not NaN.
    empty = cross_entropy(logits, torch.full_like(target, 255))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()
    with pytest.raises(BadDataError, match="class 7"):
        cross_entropy(logits, torch.full_like(target, 7))


def test_binary_mask_losses() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 6, 6)
    target = torch.rand(3, 6, 6) > 0.5
    p = torch.sigmoid(logits[:, 0])
    manual = -(target * p.log() + (~target) * (1 - p).log()).mean()
    assert binary_mask_loss(logits, target).item() == pytest.approx(manual.item(), rel=1e-5)
    assert binary_mask_loss(logits[:, 0], target).item() == pytest.approx(manual.item(), rel=1e-5)
    perfect = torch.where(target, 20.0, -20.0)
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full((1, 4, 4), -30.0), torch.zeros(1, 4, 4, dtype=torch.bool)).item() == (
        pytest.approx(0.0, abs=1e-6)
    )
    worst = dice_loss(-perfect, target).item()
    assert worst == pytest.approx(1.0, abs=0.05) and not math.isnan(worst)
