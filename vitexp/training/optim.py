"""Optimizer parameter groups and learning-rate schedules.

A schedule is a pure function of the optimizer step (and the run's length) that returns a
multiplier of the base learning rate. The training loop sets every group's rate from it before
each step (`set_lr`), as nanoGPT does, so a schedule has no state to save or restore.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from vitexp.config import instantiate_group, plain
from vitexp.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float | None = None) -> list[dict]:
    """The trainable parameters (frozen ones have no group) in groups by weight decay: weights
    are decayed, parameters that weight decay should not shrink are not (norms, biases,
    position embeddings and tokens: anything 1-D or matched by the model's `no_weight_decay()`,
    as timm matches them).

    With `layer_decay` (BEiT's layer-wise learning-rate decay, timm's `--layer-decay`), each
    parameter's layer comes from `parameter_layers` (the embeddings at 0, the head at the top)
    and its group's `lr_scale` is layer_decay ** (top - layer), as in timm's
    `param_groups_layer_decay`; `build_optimizer` multiplies it into the group's rate. Groups are
    ordered from the top layer down, decayed weights first: the first group runs at the
    configured rate, the one the loop logs."""
    named_skip = getattr(model, "no_weight_decay", None)
    skip = set(named_skip()) if callable(named_skip) else set()
    layers = parameter_layers(model) if layer_decay is not None else {}
    top = max(layers.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = param.ndim > 1 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
        layer = layers.get(name, top)
        if (layer, decayed) not in groups:
            groups[layer, decayed] = {"params": [], "weight_decay": weight_decay if decayed else 0.0}
            if layer_decay is not None:
                groups[layer, decayed]["lr_scale"] = layer_decay ** (top - layer)
        groups[layer, decayed]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], not key[1]))]


def parameter_layers(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer for layer-wise learning-rate decay: the model's own numbering
    (vitexp's families: `parameter_layers()`), else timm's grouping of a timm model
    (`group_matcher`, as `timm.optim.param_groups_layer_decay` reads it)."""
    own = getattr(model, "parameter_layers", None)
    if callable(own):
        layers: dict[str, int] = own()
        return layers
    if hasattr(model, "group_matcher") or hasattr(model, "pretrained_cfg"):
        from vitexp.models.timm_models import timm_parameter_layers

        return timm_parameter_layers(model)
    raise ConfigError(
        f"optimizer.layer_decay: {type(model).__name__} does not say which layer each parameter is in (no "
        f"parameter_layers() or timm's group_matcher()); set optimizer.layer_decay=null"
    )


def build_optimizer(optimizer_cfg: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a config names (`_target_` with `_partial_: true`, plus vitexp's
    `layer_decay`) over `param_groups(model)`, each group's rate the configured one times its
    `lr_scale`: the loop's schedule multiplies these rates (`set_lr`)."""
    spec = plain(optimizer_cfg) if isinstance(optimizer_cfg, DictConfig) else dict(optimizer_cfg)
    layer_decay = spec.pop("layer_decay", None)
    groups = param_groups(model, float(spec.get("weight_decay") or 0), layer_decay=layer_decay)
    if not groups:
        raise ConfigError("no parameter is left to train (trainer.freeze freezes them all); freeze fewer")
    optimizer: torch.optim.Optimizer = instantiate_group("optimizer", spec)(groups)
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer


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
