"""Optimizer parameter groups and learning-rate schedules.

A schedule is a pure function of the optimizer step (and the run's length) that returns a
multiplier of the base learning rate. The training loop sets every group's rate from it before
each step (`set_lr`), as nanoGPT does, so a schedule has no state to save or restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitexp.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and parameters that weight decay should not shrink
    (norms, biases, position embeddings and class token; anything 1-D or named by the
    model's `no_weight_decay()`)."""
    named_skip = getattr(model, "no_weight_decay", None)
    skip = set(named_skip()) if callable(named_skip) else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def constant(step: int, *, warmup_steps: int = 0, total_steps: int = 0) -> float:
    """Linear warmup to the base rate, then constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then half a cosine from the base rate down to `min_lr_ratio` of it at
    `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_linear(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then linear decay to `min_lr_ratio` of the base rate at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate multiplier as a pure function of the optimizer step and the run's
    length: `schedule(step, total_steps)`. The length is an argument because a time budget
    (`trainer.max_time`) re-fits it while the run goes."""

    fn: Callable[..., float]  # one of the functions above, its settings bound
    warmup_steps: int

    def __call__(self, step: int, total_steps: int) -> float:
        return self.fn(step, total_steps=total_steps)


def make_schedule(schedule_cfg: Mapping[str, Any], *, steps_per_epoch: int) -> Schedule:
    """Build a schedule from its config (`_target_` one of the functions above, with
    `_partial_: true`). Warmup is given in optimizer steps (`warmup_steps`) or, when that is
    null, in epochs (`warmup_epochs`, fractions allowed)."""
    from hydra.utils import instantiate

    spec = dict(schedule_cfg)
    warmup_epochs = float(spec.pop("warmup_epochs", 0.0) or 0.0)
    if spec.get("warmup_steps") is None:
        spec["warmup_steps"] = round(warmup_epochs * steps_per_epoch)
    if spec["warmup_steps"] < 0:
        raise ConfigError(f"scheduler warmup of {spec['warmup_steps']} steps must not be negative")
    return Schedule(instantiate(spec), int(spec["warmup_steps"]))


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Every parameter group's rate: its base rate (from the config) times the schedule's factor."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
