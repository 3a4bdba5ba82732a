"""Build once what a config names: data, model, optimizer, schedule, and the pieces of one
training step, held in an immutable `Run` bundle that the loop reads and never rebinds.

The objects inside a `Run` have state (weights, optimizer moments, generator positions); that
state is owned, saved and restored by `vitexp.training.state.TrainState`. What `Run` fixes is
which objects the run uses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vitexp.config import (
    TrainerConfig,
    check_batch_split,
    check_target_arguments,
    instantiate_group,
    plain,
    trainer_settings,
)
from vitexp.data import BatchTransform, FileSplit, ImageData, Split, carve_validation, make_loader
from vitexp.data.augment import RandAugment, TrivialAugment, mixup_cutmix
from vitexp.data.loaders import DeviceLoader, FolderLoader
from vitexp.errors import ConfigError, VitexpError, with_context
from vitexp.models import build_model, input_size
from vitexp.models.timm_models import is_timm_model, timm_inputs
from vitexp.runtime import (
    autocast_context,
    configure_backends,
    machine_cpu_share,
    pick_device,
    rank_seed,
    seed_everything,
    set_threads,
)
from vitexp.training import distributed
from vitexp.training.distributed import World
from vitexp.training.ema import Ema
from vitexp.training.finetune import freeze
from vitexp.training.optim import Schedule, build_optimizer, make_schedule

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]


def model_inputs(cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """How images are normalised and resampled for the model: a timm model's own (its
    pretrained config, or model.mean/std/interpolation), else the dataset's mean and std,
    bilinear. Checkpoints store it (`inputs`), so inference prepares images the same way."""
    if is_timm_model(model):
        own = timm_inputs(model)
        log.info(
            "model=timm: inputs normalised with the model's mean %s and std %s, %s resampling (not "
            "dataset.mean/std; model.mean/std/interpolation override them)",
            list(own.mean), list(own.std), own.interpolation,
        )  # fmt: skip
        return {"mean": list(own.mean), "std": list(own.std), "interpolation": own.interpolation}
    return {"mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std), "interpolation": "bilinear"}


def build_transform(cfg: DictConfig, img_size: tuple[int, int], inputs: dict[str, Any]) -> BatchTransform:
    """The dataset's augmentation at the model's resolution, normalised and resampled as
    `inputs` says (`model_inputs`), with an optional RandAugment or TrivialAugment policy
    (`dataset.augment.randaugment: {num_ops, magnitude}` or `dataset.augment.trivialaugment:
    true`), all applied batched on the device."""
    augment = plain(cfg.dataset.augment)
    randaugment, trivial = augment.pop("randaugment", None), augment.pop("trivialaugment", False)
    if randaugment and trivial:
        raise ConfigError("dataset.augment: choose randaugment or trivialaugment, not both")
    policy = RandAugment(**randaugment) if randaugment else TrivialAugment() if trivial else None
    try:
        return BatchTransform(img_size=img_size, policy=policy, **inputs, **augment)
    except ConfigError as e:
        raise ConfigError(f"dataset.augment: {e}") from e


# --------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class Step:
    """What one optimizer step needs (`vitexp.training.loop.train_step`): built once. Benchmarks
    build one around other models to time exactly the step vitexp trains with."""

    forward: nn.Module  # the module called on a batch: possibly DDP- and/or compile-wrapped
    model: nn.Module  # the plain module under the wrappers: clipped, averaged, saved
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    autocast: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    ema: Ema | None = None
    mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None  # mixup/cutmix on a batch
    skip_nonfinite: bool = False
    world: World = distributed.SINGLE_PROCESS


@dataclass(frozen=True)
class Run:
    """Everything the config built, once."""

    cfg: DictConfig
    config: dict[str, Any]  # the resolved config, as checkpoints and loggers store it
    trainer: TrainerConfig  # the `trainer` section, typed: what the loop reads
    world: World
    device: torch.device
    data: ImageData
    train_split: Split | FileSplit
    eval_split: Split | FileSplit
    eval_name: str  # "test", or "val" with dataset.val_split
    transform: BatchTransform
    inputs: dict[str, Any]  # the transform's mean, std and interpolation, as checkpoints store them
    train_loader: DeviceLoader | FolderLoader
    eval_loader: DeviceLoader | FolderLoader
    data_generator: torch.Generator  # the shared epoch order, on the CPU (on the CPU alone, augmentation too)
    augment_generator: torch.Generator  # this rank's augmentation and mixing draws, on its device
    step: Step
    eval_model: nn.Module  # the EMA's average when there is one, else the model
    schedule: Schedule
    base_lrs: tuple[float, ...]  # each parameter group's rate before the schedule's factor
    steps_per_epoch: int
    total_steps: int  # from max_steps or max_epochs; a time budget may shorten it while training
    monitor: str
    maximize: bool

    @property
    def model(self) -> nn.Module:
        return self.step.model

    def close(self) -> None:
        """Stop the loaders' worker processes (image folders keep them alive across epochs)."""
        self.train_loader.close()
        self.eval_loader.close()


def _load_data(
    cfg: DictConfig, t: TrainerConfig
) -> tuple[ImageData, Split | FileSplit, Split | FileSplit, str]:
    data: ImageData = instantiate_group("dataset.load", cfg.dataset.load, label="dataset")
    if cfg.model.get("num_classes") != data.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.get('num_classes')} but the dataset has {data.num_classes} "
            f"classes; set model.num_classes={data.num_classes}"
        )
    train_split, eval_split, eval_name = data.train, data.test, "test"
    if cfg.dataset.get("val_split"):
        train_split, eval_split = carve_validation(
            data.train, float(cfg.dataset.val_split), seed=int(cfg.seed)
        )
        eval_name = "val"
    if t.batch_size > len(train_split):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is larger than the training set "
            f"({len(train_split)} images); lower trainer.batch_size"
        )
    return data, train_split, eval_split, eval_name


def _build_model(cfg: DictConfig, device: torch.device, *, resuming: bool) -> nn.Module:
    # A resumed run's checkpoint replaces the pretrained weights: do not read them.
    try:
        return build_model(cfg.model, load_pretrained=not resuming).to(device)
    except InstantiationException as e:
        if isinstance(e.__cause__, VitexpError):
            raise with_context(e.__cause__, "model") from e.__cause__
        raise
    except VitexpError as e:
        raise with_context(e, "model") from e


def default_workers() -> int:
    """Image-decoding workers per process: this process's share of the node's cores (the ones
    it may use: a SLURM job's cgroup, taskset), at most 8 (beyond that the device waits for no
    one, and each worker holds its own copy of the file list)."""
    return max(1, min(8, machine_cpu_share()[0]))


def _loaders(
    cfg: DictConfig,
    t: TrainerConfig,
    world: World,
    device: torch.device,
    transform: BatchTransform,
    splits: tuple[Split | FileSplit, Split | FileSplit],
) -> tuple[DeviceLoader | FolderLoader, DeviceLoader | FolderLoader, torch.Generator, torch.Generator]:
    """The train and eval loaders, and the generators the training batches draw from."""
    seed = int(cfg.seed)
    # Shuffling and augmentation draw from these generators only, so the seed (or a
    # checkpoint's copy of their states) decides every batch. The epoch order is drawn on the
    # CPU: CUDA's random kernels size their grid by the GPU's multiprocessor count, so a draw on
    # the device could differ between GPU models (ranks on mixed nodes would disagree about the
    # order). Data-parallel ranks share the shuffle (the same seed) but each augments its shard
    # from a stream of its own, on its device; on the CPU alone one generator does both.
    data_generator = torch.Generator().manual_seed(seed)
    augment_generator = data_generator
    if world.distributed or device.type != "cpu":
        augment_generator = torch.Generator(device=device).manual_seed(rank_seed(seed, world.rank, 1))
    num_workers = cfg.dataset.get("num_workers")
    common: dict[str, Any] = {
        "transform": transform,
        "device": device,
        "num_workers": default_workers() if num_workers is None else int(num_workers),
        "rank": world.rank,
        "world_size": world.size,
    }
    train_loader = make_loader(
        splits[0],
        batch_size=t.batch_size // (world.size * t.grad_accum_steps),
        train=True,
        generator=data_generator,
        augment_generator=augment_generator,
        **common,
    )
    eval_loader = make_loader(splits[1], batch_size=t.eval_batch_size, train=False, **common)
    return train_loader, eval_loader, data_generator, augment_generator


def _schedule(cfg: DictConfig, t: TrainerConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    scheduler_cfg = plain(cfg.scheduler)
    check_target_arguments("scheduler", {k: v for k, v in scheduler_cfg.items() if k != "warmup_epochs"})
    schedule = make_schedule(scheduler_cfg, steps_per_epoch=steps_per_epoch)
    # Warmup in epochs against a run in steps: only now are both in one unit (`validate`
    # warns about the cases it can judge from the config alone).
    mixed_units = t.max_steps is not None and scheduler_cfg.get("warmup_steps") is None
    if mixed_units and schedule.warmup_steps >= total_steps:
        log.warning(
            "the warmup (%d steps) is longer than the run (%d steps): the learning rate never reaches "
            "optimizer.lr", schedule.warmup_steps, total_steps,
        )  # fmt: skip
    return schedule


def _step(
    cfg: DictConfig,
    t: TrainerConfig,
    world: World,
    model: nn.Module,
    autocast: contextlib.AbstractContextManager,
    *,
    num_classes: int,
    augment_generator: torch.Generator,
    resuming: bool,
    loss_fn: LossFn | None,
) -> Step:
    """The optimizer, the wrappers, the loss and the EMA: what one training step uses."""
    device = next(model.parameters()).device
    # No weight decay on norms, biases and embeddings; frozen parameters have no group; each
    # group's rate (its layer's, with optimizer.layer_decay) is scaled by the schedule before
    # every step.
    optimizer = build_optimizer(cfg.optimizer, model)
    # EMA of the weights: it is the model that is evaluated, picks best.pt and is used for inference.
    ema = Ema(model, t.ema_decay) if t.ema_decay else None
    if world.distributed and not resuming:
        # Same initial weights on every rank (the common seed), different dropout masks.
        torch.manual_seed(rank_seed(int(cfg.seed), world.rank, 2))
    forward: nn.Module = model
    if world.distributed:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        forward = torch.compile(forward)  # type: ignore[assignment]
    mix = None
    if t.mixup_alpha or t.cutmix_alpha:
        mix = functools.partial(
            mixup_cutmix, num_classes=num_classes, mixup_alpha=t.mixup_alpha,
            cutmix_alpha=t.cutmix_alpha, generator=augment_generator,
        )  # fmt: skip
    return Step(
        forward=forward,
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn or nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        autocast=autocast,
        scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
        grad_accum_steps=t.grad_accum_steps,
        grad_clip=t.grad_clip or None,
        ema=ema,
        mix=mix,
        skip_nonfinite=t.on_nonfinite == "skip",
        world=world,
    )


def build(
    cfg: DictConfig,
    world: World,
    *,
    settings: TrainerConfig | None = None,
    resuming: bool = False,
    loss_fn: LossFn | None = None,
) -> Run:
    """Build the run `cfg` describes for this process of `world`. `settings`: its `trainer`
    section as `trainer_settings(cfg)` types it (converted here when not given); `resuming`: a
    checkpoint will replace the initial weights (pretrained ones are then not read); `loss_fn`
    replaces the configured cross-entropy (tests use it to inject faults without patching torch)."""
    t = settings or trainer_settings(cfg)
    check_batch_split(t.batch_size, t.grad_accum_steps, world.size)
    set_threads(t.num_threads)
    # The seed decides the initial weights: seeded before the model draws them.
    seed_everything(int(cfg.seed))
    device = distributed.device_for(world, str(pick_device(t.device, "trainer.device")))
    autocast = autocast_context(device, t.precision, "trainer.precision")
    configure_backends(device, deterministic=t.deterministic)
    data, train_split, eval_split, eval_name = _load_data(cfg, t)
    model = _build_model(cfg, device, resuming=resuming)
    freeze(model, t.freeze, t.train_last_blocks)  # before the optimizer: frozen parameters get no state
    inputs = model_inputs(cfg, model)
    transform = build_transform(cfg, input_size(model), inputs)
    train_loader, eval_loader, data_generator, augment_generator = _loaders(
        cfg, t, world, device, transform, (train_split, eval_split)
    )
    step = _step(
        cfg, t, world, model, autocast, num_classes=data.num_classes, augment_generator=augment_generator,
        resuming=resuming, loss_fn=loss_fn,
    )  # fmt: skip
    steps_per_epoch = len(train_loader) // step.grad_accum_steps
    total_steps = t.max_steps if t.max_steps is not None else t.max_epochs * steps_per_epoch
    return Run(
        cfg=cfg,
        config=plain(cfg),
        trainer=t,
        world=world,
        device=device,
        data=data,
        train_split=train_split,
        eval_split=eval_split,
        eval_name=eval_name,
        transform=transform,
        inputs=inputs,
        train_loader=train_loader,
        eval_loader=eval_loader,
        data_generator=data_generator,
        augment_generator=augment_generator,
        step=step,
        eval_model=step.ema.module if step.ema is not None else model,
        schedule=_schedule(cfg, t, steps_per_epoch, total_steps),
        base_lrs=tuple(float(g["lr"]) for g in step.optimizer.param_groups),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        monitor=t.monitor,
        maximize=not t.monitor.endswith("loss"),
    )


def max_epochs(run: Run, total_steps: int) -> int:
    return math.ceil(total_steps / run.steps_per_epoch)
