"""What a checkpoint holds, owned by one object that saves and restores it symmetrically
(torchtitan's `Stateful` pattern): `TrainState.state_dict()` / `load_state_dict()`, each part
through its own. `vitexp.training.checkpointing.Checkpoints` writes those dicts to files and
reads them back.

Collectives stay at the call site: `state_dict` takes every rank's augmentation stream as an
argument (`rank_rngs`), which the caller gathers over the process group first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitexp.errors import ConfigError, first_line
from vitexp.models.weights import check_state_dict_fits
from vitexp.runtime import rank_seed
from vitexp.training.checkpoint import capture_rng, restore_rng
from vitexp.training.setup import Run

log = logging.getLogger(__name__)

# Stream numbers of the per-rank random streams derived from (seed, rank, stream, step).
STREAM_SHUFFLE, STREAM_AUGMENT, STREAM_DROPOUT = 0, 1, 2


@dataclass
class Progress:
    """Where the run is. `order` is the data order of the epoch in progress; None once that
    epoch is complete (the next one draws a new order)."""

    best_value: float
    epoch: int = 0
    step_in_epoch: int = 0
    order: Tensor | None = None
    global_step: int = 0
    train_seconds: float = 0.0
    best_epoch: int = 0
    total_steps: int = 0  # not saved: recomputed from the config (and re-fitted by a time budget)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "epoch_complete": self.order is None,
            "order": self.order,
            "global_step": self.global_step,
            "train_seconds": self.train_seconds,
            "best_metric": self.best_value,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.order = None if state["epoch_complete"] else state["order"].to(device)
        self.global_step = int(state["global_step"])
        self.train_seconds = float(state["train_seconds"])
        self.best_value = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])


@dataclass
class TrainState:
    """The run's model, EMA, optimizer, grad scaler, random streams and progress."""

    run: Run
    progress: Progress = field(init=False)
    logger_ids: dict[str, str] = field(default_factory=dict)  # external runs (W&B) to continue

    def __post_init__(self) -> None:
        self.progress = Progress(best_value=-math.inf if self.run.maximize else math.inf)
        self.progress.total_steps = self.run.total_steps

    def rank_stream(self) -> dict[str, Any]:
        """This rank's own random streams, for `state_dict(rank_rngs=...)` once gathered."""
        return capture_rng(self.run.augment_generator, self.run.device)

    def state_dict(self, rank_rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        run, step = self.run, self.run.step
        return {
            "model": step.model.state_dict(),
            "ema": step.ema.module.state_dict() if step.ema is not None else None,
            "ema_updates": step.ema.updates if step.ema is not None else 0,
            "optimizer": step.optimizer.state_dict(),
            "scaler": step.scaler.state_dict(),
            "progress": self.progress.state_dict(),
            "data": run.train_loader.state_dict(),  # a stream's epoch in progress (seed, readers)
            "rng": capture_rng(run.data_generator, run.device),
            "rank_rng": rank_rngs,
            "world_size": run.world.size,
            "config": run.config,
            "classes": list(run.data.classes),
            "inputs": run.inputs,  # mean, std, interpolation: how inference prepares images
            "logger_ids": dict(self.logger_ids),
        }

    def load_state_dict(self, ckpt: Mapping[str, Any], source: Path) -> None:
        """Restore a format-2 checkpoint (`vitexp.training.checkpoint.upgrade` makes one of
        any format) into this run's objects."""
        run, step = self.run, self.run.step
        check_state_dict_fits(ckpt["model"], step.model, f"in checkpoint {source}")
        step.model.load_state_dict(ckpt["model"])
        self._load_optimizer(ckpt, source)
        if step.scaler.is_enabled() and not ckpt["scaler"]:
            log.info(
                "the checkpoint trained without fp16 loss scaling: the grad scaler starts at its first scale"
            )
        else:  # a disabled scaler ignores what it is given
            step.scaler.load_state_dict(ckpt["scaler"])
        if step.ema is not None:
            if ckpt.get("ema") is not None:
                step.ema.module.load_state_dict(ckpt["ema"])
                step.ema.updates = int(ckpt["ema_updates"])
            else:
                log.warning("the checkpoint has no EMA weights; the EMA starts from its weights now")
                step.ema.module.load_state_dict(step.model.state_dict())
        self.progress.load_state_dict(ckpt["progress"], run.device)
        run.train_loader.load_state_dict(ckpt.get("data") or {})
        self.logger_ids = dict(ckpt.get("logger_ids") or {})
        self._restore_streams(ckpt)

    def _load_optimizer(self, ckpt: Mapping[str, Any], source: Path) -> None:
        """The optimizer's state (moments, momentum buffers, step counts) from the checkpoint,
        its hyperparameters from this run's config: torch's `load_state_dict` restores the
        saved ones (weight decay, betas, momentum, ...), so the configured ones are put back,
        and with trainer.resume_allow_changes what the config says is what the run does (the
        learning rate is set from the schedule before every step anyway). Another optimizer
        class cannot take over the state of the one saved: it starts afresh, with a warning."""
        optimizer = self.run.step.optimizer
        saved = (ckpt["config"].get("optimizer") or {}).get("_target_")
        current = self.run.config["optimizer"]["_target_"]
        if saved is not None and saved != current:
            log.warning(
                "the checkpoint was trained with %s, this run uses %s (trainer.resume_allow_changes): the "
                "new optimizer starts with fresh state (no moments or momentum yet)", saved, current,
            )  # fmt: skip
            return
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:  # torch's message for parameter groups that differ
            raise ConfigError(
                f"the optimizer state in {source} does not fit this optimizer ({first_line(e)}); resume with "
                f"the optimizer settings it was trained with"
            ) from e
        for group, hyperparameters in zip(optimizer.param_groups, configured, strict=True):
            group.update(hyperparameters)

    def _restore_streams(self, ckpt: Mapping[str, Any]) -> None:
        """Rank 0's streams (the shared shuffle among them) from `rng`, then each rank's own
        augmentation and dropout streams from `rank_rng`. A stream that cannot be carried
        over (another number of processes, another device type) is re-derived from the seed,
        the rank and the step: the run continues, but not bitwise."""
        run = self.run
        seed, step, world = int(run.cfg.seed), self.progress.global_step, run.world
        if not restore_rng(ckpt["rng"], run.data_generator, run.device):
            log.warning(
                "the checkpoint's data generator ran on another device type; this run has %s: the epoch in "
                "progress continues in its order, later orders and augmentation start afresh from the seed",
                run.device.type,
            )
            run.data_generator.manual_seed(rank_seed(seed, 0, STREAM_SHUFFLE, step))
        saved = int(ckpt.get("world_size") or 1)
        if saved != world.size:
            log.warning(
                "the checkpoint was written by %d process(es), this run has %d: the data order continues, "
                "augmentation and dropout draws start afresh", saved, world.size,
            )  # fmt: skip
        if self.run.augment_generator is self.run.data_generator:
            return
        rank_rngs = ckpt.get("rank_rng")
        if (
            rank_rngs
            and len(rank_rngs) == world.size
            and restore_rng(rank_rngs[world.rank], run.augment_generator, run.device)
        ):
            return
        run.augment_generator.manual_seed(rank_seed(seed, world.rank, STREAM_AUGMENT, step))
        torch.manual_seed(rank_seed(seed, world.rank, STREAM_DROPOUT, step))
