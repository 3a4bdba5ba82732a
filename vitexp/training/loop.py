"""Build everything a config names, then train, evaluate every epoch, checkpoint and log.

`train(cfg)` is the whole run; `python -m vitexp` is a thin Hydra entry around it. The loop
reads top to bottom: for each optimizer step, accumulate micro-batches, clip, step, zero the
gradients, advance the schedule, log every few steps; after each epoch, evaluate and
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from vitexp.data import BatchTransform, ImageData, carve_validation, make_loader
from vitexp.data.augment import RandAugment, TrivialAugment, mixup_cutmix
from vitexp.errors import ConfigError
from vitexp.models import build_model
from vitexp.models.weights.vit import check_state_dict_fits
from vitexp.runtime import autocast_context, enable_tf32, pick_device, rank_seed, seed_everything, unwrap
from vitexp.training import distributed
from vitexp.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vitexp.training.loggers import JsonlLogger, Loggers, git_state, write_json
from vitexp.training.metrics import LossWindow, evaluate
from vitexp.training.optim import make_schedule, param_groups
from vitexp.training.preemption import Preempted, PreemptionGuard

log = logging.getLogger(__name__)

MONITORS = ("val/acc1", "val/acc5", "val/loss")


# --------------------------------------------------------------------------- set-up helpers


def build(what: str, fn: Callable[[], Any]) -> Any:
    """Run a builder and turn what it raises about bad settings into one ConfigError line
    naming the config group, instead of a traceback from deep inside Hydra or torch."""
    try:
        return fn()
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from e
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{what}: {cause}") from e
        detail = str(cause if cause is not None else e).splitlines()[0]
        raise ConfigError(f"{what}: {detail}; check the {what} settings") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {str(e).splitlines()[0]}; check the {what} settings") from e


def build_transform(cfg: DictConfig, img_size: tuple[int, int]) -> BatchTransform:
    """The dataset's augmentation at the model's resolution, with an optional RandAugment or
    TrivialAugment policy (`dataset.augment.randaugment: {num_ops, magnitude}` or
    `dataset.augment.trivialaugment: true`), all applied batched on the device."""
    augment = OmegaConf.to_container(cfg.dataset.augment)
    randaugment, trivial = augment.pop("randaugment", None), augment.pop("trivialaugment", False)
    if randaugment and trivial:
        raise ConfigError("dataset.augment: choose randaugment or trivialaugment, not both")
    policy = RandAugment(**randaugment) if randaugment else TrivialAugment() if trivial else None
    return BatchTransform(
        img_size=img_size, mean=list(cfg.dataset.mean), std=list(cfg.dataset.std), policy=policy, **augment
    )


def check_settings(cfg: DictConfig) -> None:
    """Reject values that cannot work before anything is built."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required here (marked ???): add {missing[0]}=... to the command")
    if cfg.model.get("pretrained") == "required":
        raise ConfigError(
            "this preset fine-tunes pretrained weights: add model.pretrained=PATH (e.g. ViT-B_16.npz)"
        )
    t = cfg.trainer
    positive = {
        "trainer.batch_size": t.batch_size,
        "trainer.eval_batch_size": t.eval_batch_size,
        "trainer.grad_accum_steps": t.grad_accum_steps,
        "trainer.log_every_steps": t.log_every_steps,
        "optimizer.lr": cfg.optimizer.get("lr"),
    }
    # max_steps, when set, decides the length; max_epochs must still be sensible.
    positive["trainer.max_epochs"] = t.max_epochs
    if t.max_steps is not None:
        positive["trainer.max_steps"] = t.max_steps
    for key, value in positive.items():
        if value is None or value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is not divisible by trainer.grad_accum_steps="
            f"{t.grad_accum_steps}; the global batch is split evenly into micro-batches"
        )
    if (cfg.optimizer.get("weight_decay") or 0) < 0:
        raise ConfigError(f"optimizer.weight_decay={cfg.optimizer.weight_decay} must not be negative")
    if t.get("ema_decay") is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(
            f"trainer.ema_decay={t.ema_decay} must be between 0 and 1 (e.g. 0.999), or null for no EMA"
        )
    if t.monitor not in MONITORS:
        raise ConfigError(f"trainer.monitor={t.monitor!r} is not one of {', '.join(MONITORS)}")


def quiet_rank() -> None:
    """Data-parallel ranks other than 0 log warnings and errors only, and to the console only:
    rank 0 reports the run, and Hydra's log file in the shared run dir is rank 0's."""
    logging.getLogger("vitexp").setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def restore_rank_rng(
    ckpt: dict, world: distributed.World, augment_generator: torch.Generator, seed: int
) -> None:
    """After `set_rng_state(ckpt["rng"], ...)` restored rank 0's streams (the shared shuffle
    among them), give each data-parallel rank back its own dropout and augmentation streams.
    With another number of processes than the checkpoint's, the shuffle continues but the
    per-rank streams start afresh (from the seed, the rank and the step): not bitwise."""
    saved = int(ckpt.get("world_size") or 1)
    if saved != world.size:
        log.warning(
            "the checkpoint was written by %d process(es), this run has %d: the data order continues, "
            "augmentation and dropout draws start afresh", saved, world.size,
        )  # fmt: skip
    if not world.distributed:
        return
    rank_rngs = ckpt.get("rank_rng")
    if rank_rngs and len(rank_rngs) == world.size:
        set_rng_state(rank_rngs[world.rank], augment_generator)
        return
    step = int(ckpt["global_step"])
    augment_generator.manual_seed(rank_seed(seed, world.rank, 1, step))
    torch.manual_seed(rank_seed(seed, world.rank, 2, step))


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (Hydra does not change the working directory)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    raise ConfigError("no run directory: run through `python -m vitexp`, or set run_dir in the config")


def run_names(cfg: DictConfig) -> dict[str, str | None]:
    """A readable run name (the job's overrides) and, in a multirun, the sweep as group."""
    if not HydraConfig.initialized():
        return {"name": None, "group": None}
    hc = HydraConfig.get()
    name = hc.job.override_dirname or f"{hc.runtime.choices.get('model')}-{hc.runtime.choices.get('dataset')}"
    group = None
    if hc.mode.name == "MULTIRUN":
        sweep = Path(hc.sweep.dir)
        group = f"{sweep.parent.name}/{sweep.name}"
    return {"name": name, "group": group}


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    config: dict,
    *,
    resume_step: int | None = None,
    run_ids: dict | None = None,
) -> Loggers:
    """metrics.jsonl always, plus every logger configured under `logger`. A resumed run
    drops the rows its checkpoint had not reached and continues the same external runs."""
    loggers = Loggers([JsonlLogger(run_dir / "metrics.jsonl", keep_until_step=resume_step)])
    names = run_names(cfg)
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        extra = {
            "run_dir": str(run_dir),
            # The code version goes with the config: W&B shows it beside every hyperparameter.
            "run_config": {**config, "git": git_state()},
            "name": logger_cfg.get("name") or names["name"],
            "group": logger_cfg.get("group") or names["group"],
        }
        if (run_ids or {}).get(key):
            extra["run_id"] = run_ids[key]
        # Not recursive: the run's config holds `_target_`s of its own that must stay data.
        build_logger = lambda c=logger_cfg, kw=extra: instantiate(c, _recursive_=False, _convert_="all", **kw)  # noqa: E731
        loggers.loggers.append(build(f"logger.{key}", build_logger))
        loggers.keys.append(key)
    return loggers


def resolve_resume(setting: Any, run_dir: Path) -> Path | None:
    """`trainer.resume`: null (fresh run), `auto` (this run dir's last.pt when there is one,
    so re-running a command continues it) or a checkpoint path. A SLURM job that was requeued
    (after preemption or its time limit) resumes as with `auto`: it is the same run."""
    if setting in (None, "", False):
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 and (run_dir / "last.pt").is_file():
            log.info("requeued SLURM job (restart %s): resuming", os.environ["SLURM_RESTART_COUNT"])
            return run_dir / "last.pt"
        return None
    if str(setting) == "auto":
        last = run_dir / "last.pt"
        return last if last.is_file() else None
    path = Path(str(setting)).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.resume={setting}: no such checkpoint; give a checkpoint file, or auto")
    return path


def resume_command(run_dir: Path, world: distributed.World = distributed.SINGLE_PROCESS) -> str:
    """The command that continues this run in the same directory (with the same launcher)."""
    overrides = []
    if HydraConfig.initialized():
        overrides = [
            o
            for o in HydraConfig.get().overrides.task
            if not o.startswith(("trainer.resume=", "hydra.run.dir=", "hydra.sweep."))
        ]
    args = [*overrides, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    launcher = "python -m vitexp"
    if world.distributed:
        launcher = "torchrun [the same torchrun options] -m vitexp"
        if os.environ.get("LOCAL_WORLD_SIZE") == str(world.size):  # a single node
            launcher = f"torchrun --nproc_per_node={world.size} -m vitexp"
    return f"{launcher} " + " ".join(shlex.quote(a) for a in args)


class TimeBudget:
    """Fits a run into `trainer.max_time` seconds: from the pace so far (training and
    evaluation together) it re-estimates how many optimizer steps still fit, so that the
    schedule, which knows the total, ends when the time does."""

    def __init__(self, seconds: float, start_step: int, limit_steps: int) -> None:
        self.started = time.time()
        self.deadline = self.started + seconds
        self.start_step = start_step
        self.limit_steps = limit_steps

    def total_steps(self, global_step: int) -> int:
        done = global_step - self.start_step
        if done <= 0:
            return self.limit_steps
        now = time.time()
        pace = (now - self.started) / done
        fits = global_step + int(max(0.0, self.deadline - now) / pace)
        return max(global_step, min(self.limit_steps, fits))

    @property
    def spent(self) -> bool:
        return time.time() >= self.deadline


class Checkpointer:
    """Writes last.pt / best.pt / epoch{N}.pt. A failed write (disk full) keeps the previous
    file and says so instead of stopping the run; `keep_last_k` bounds the epoch files."""

    def __init__(self, run_dir: Path, keep_last_k: int | None, writes: bool = True) -> None:
        self.run_dir = run_dir
        self.keep_last_k = keep_last_k
        self.writes = writes  # False on data-parallel ranks other than 0
        self.last_good: str | None = None

    def save(self, state: dict, name: str) -> bool:
        path = self.run_dir / name
        if not self.writes:
            self.last_good = f"{path} (step {state['global_step']})"
            return True
        try:
            save_checkpoint(state, path)
        except OSError as e:
            log.warning("could not write %s (%s); the previous %s is kept", path, e.strerror or e, name)
            return False
        if name == "last.pt":
            self.last_good = f"{path} (step {state['global_step']})"
        if name.startswith("epoch") and self.keep_last_k:
            epochs = sorted(self.run_dir.glob("epoch*.pt"), key=lambda p: int(p.stem[5:]))
            for old in epochs[: -self.keep_last_k]:
                old.unlink(missing_ok=True)
        return True


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def log_sample_predictions(
    model: nn.Module,
    split: Any,
    transform: BatchTransform,
    classes: list[str],
    run_dir: Path,
    loggers: Loggers,
    step: int,
) -> None:
    """A fixed handful of eval images (one per class first) with their predicted classes go to
    the loggers; for models with attention maps, the same images' maps go to attention.png in
    the run dir (and the loggers). A figure that fails warns: it never costs the run."""
    from vitexp.viz import has_attention_maps, sample_images, save_attention_grid

    try:
        images, labels = sample_images(split, 8)
        device = next(model.parameters()).device
        x = torch.cat([transform.eval(img[None].to(device)) for img in images])
        model.eval()
        predicted = model(x).argmax(dim=1).tolist()
        samples = [
            (img.cpu(), f"predicted {classes[p]} / true {classes[t]}")
            for img, p, t in zip(images, predicted, labels.tolist(), strict=True)
        ]
        loggers.images("val/predictions", samples, step=step)
        if has_attention_maps(model):
            path = save_attention_grid(model, images, transform, run_dir / "attention.png", classes, labels)
            loggers.images("val/attention", [(path, "attention rollout and last-layer heads")], step=step)
    except Exception as e:  # a picture is not worth a failed run
        log.warning("could not draw the sample predictions (%s: %s)", type(e).__name__, e)


# --------------------------------------------------------------------------- the run


def train(cfg: DictConfig) -> float:
    """Train the configured model; return the best value of `trainer.monitor` (for sweepers)."""
    started = time.time()
    check_settings(cfg)
    t = cfg.trainer
    # Data-parallel when launched as a group (torchrun, or a SLURM job of several tasks): each
    # rank trains on its shard of every global batch; rank 0 alone writes anything.
    world = distributed.launch_world()
    distributed.init(world)
    if not world.is_main:
        quiet_rank()
    if t.batch_size % (world.size * t.grad_accum_steps):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} does not split evenly over {world.size} processes × "
            f"{t.grad_accum_steps} accumulation steps; use a multiple of {world.size * t.grad_accum_steps}"
        )
    run_dir = Path(distributed.agree(str(run_dir_of(cfg)), world))
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(world)
    resume_path = resolve_resume(t.get("resume"), run_dir)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    seed_everything(int(cfg.seed))
    device = distributed.device_for(world, str(pick_device(t.device, "trainer.device")))
    autocast = autocast_context(device, t.precision, "trainer.precision")
    enable_tf32(device)
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"trainer.on_nonfinite={t.on_nonfinite!r} must be stop or skip")

    # Data: in-memory splits go to the device once; image folders stream through workers.
    # Either way, batches are augmented on the device.
    data: ImageData = build("dataset", lambda: instantiate(cfg.dataset.load))
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
            f"trainer.batch_size={t.batch_size} is larger than the training set ({len(train_split)} images); "
            f"lower trainer.batch_size"
        )

    model = build("model", lambda: build_model(cfg.model, load_pretrained=ckpt is None)).to(device)
    transform = build("dataset.augment", lambda: build_transform(cfg, unwrap(model).img_size))
    # Shuffling and augmentation draw from this generator only, so the seed (or a
    # checkpoint's copy of its state) decides every batch. Data-parallel ranks share the
    # shuffle (the same seed) but each augments its shard from a stream of its own.
    data_generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    augment_generator = data_generator
    if world.distributed:
        augment_generator = torch.Generator(device=device).manual_seed(
            rank_seed(int(cfg.seed), world.rank, 1)
        )
    num_workers = cfg.dataset.get("num_workers")
    num_workers = min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    loader_args = {
        "transform": transform,
        "device": device,
        "num_workers": num_workers,
        "rank": world.rank,
        "world_size": world.size,
    }
    train_loader = make_loader(
        train_split,
        batch_size=t.batch_size // (world.size * t.grad_accum_steps),
        train=True,
        generator=data_generator,
        augment_generator=augment_generator,
        **loader_args,
    )
    eval_loader = make_loader(eval_split, batch_size=t.eval_batch_size, train=False, **loader_args)

    # Optimisation: no weight decay on norms, biases and embeddings; the schedule is a pure
    # function of the optimizer step.
    optimizer = build(
        "optimizer",
        lambda: instantiate(cfg.optimizer)(
            param_groups(model, float(cfg.optimizer.get("weight_decay") or 0))
        ),
    )
    steps_per_epoch = len(train_loader) // t.grad_accum_steps
    total_steps = int(t.max_steps) if t.max_steps is not None else int(t.max_epochs) * steps_per_epoch

    def schedule_for(total: int) -> Callable[[int], float]:
        spec = OmegaConf.to_container(cfg.scheduler)
        return build(
            "scheduler", lambda: make_schedule(spec, steps_per_epoch=steps_per_epoch, total_steps=total)
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_for(total_steps))
    max_epochs = math.ceil(total_steps / steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing))
    mixing = bool(t.mixup_alpha or t.cutmix_alpha)

    # Resume: weights, optimizer, schedule, scaler, every RNG, and where in which epoch.
    monitor = str(t.monitor)
    maximize = not monitor.endswith("loss")
    best_value, best_epoch = (-math.inf if maximize else math.inf), 0
    global_step, train_seconds, start_epoch, start_step, resume_order = 0, 0.0, 1, 0, None
    if ckpt is not None:
        check_state_dict_fits(ckpt["model"], unwrap(model), f"in checkpoint {resume_path}")
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], data_generator)
        restore_rank_rng(ckpt, world, augment_generator, int(cfg.seed))
        global_step, train_seconds = ckpt["global_step"], ckpt["train_seconds"]
        best_value, best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
        if ckpt["epoch_complete"]:
            start_epoch = ckpt["epoch"] + 1
        else:
            start_epoch, start_step, resume_order = (
                ckpt["epoch"],
                ckpt["step_in_epoch"],
                ckpt["order"].to(device),
            )
        log.info("resuming from %s: epoch %d, step %d", resume_path, start_epoch, global_step)
    # EMA of the weights (Polyak averaging, as timm's ModelEma): updated after every optimizer
    # step; when on, it is the model that is evaluated, picks best.pt and is used for inference.
    ema = None
    if t.get("ema_decay"):
        ema = AveragedModel(
            unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(float(t.ema_decay)), use_buffers=True
        )
        if ckpt is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.n_averaged.fill_(int(ckpt["ema_updates"]))
        elif ckpt is not None:
            log.warning("the checkpoint has no EMA weights; the EMA starts from its weights now")
    if world.distributed and ckpt is None:
        # Same initial weights on every rank (the common seed), different dropout masks.
        torch.manual_seed(rank_seed(int(cfg.seed), world.rank, 2))
    eval_model = ema.module if ema is not None else model
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if t.compile else model

    # Records: the resolved config next to Hydra's, metrics.jsonl, optional W&B.
    config = OmegaConf.to_container(cfg, resolve=True)
    loggers = Loggers([])
    if world.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        loggers = build_loggers(
            cfg,
            run_dir,
            config,
            resume_step=global_step if ckpt else None,
            run_ids=(ckpt or {}).get("logger_ids"),
        )
    n_params = sum(p.numel() for p in model.parameters())
    where = f"{world.size} processes × {device.type}" if world.distributed else str(device)
    log.info(
        "%.2fM params | %d train / %d %s images | %d epochs × %d steps × %d images | %s, %s | %s",
        n_params / 1e6, len(train_split), len(eval_split), eval_name, max_epochs, steps_per_epoch,
        t.batch_size, where, t.precision, run_dir,
    )  # fmt: skip

    checkpointer = Checkpointer(run_dir, t.keep_last_k, writes=world.is_main)
    window = LossWindow(device, world)
    skip_nonfinite = t.on_nonfinite == "skip"
    eval_metrics: dict[str, float] = {}

    def state(epoch: int, step_in_epoch: int, order: Tensor | None, seconds: float) -> dict:
        """What a checkpoint holds (collective when data-parallel: every rank's RNG states)."""
        rank_rngs = distributed.gather(rng_state(augment_generator), world) if world.distributed else None
        return {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "epoch_complete": order is None,
            "order": order,
            "global_step": global_step,
            "train_seconds": seconds,
            "best_metric": best_value,
            "best_epoch": best_epoch,
            "rng": rng_state(data_generator),
            "world_size": world.size,
            "rank_rng": rank_rngs,
            "config": config,
            "classes": data.classes,
            "logger_ids": loggers.run_ids(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": int(ema.n_averaged) if ema is not None else 0,
        }

    def stop_if_nonfinite() -> None:
        bad = window.first_nonfinite_step()
        if bad is not None:
            raise ConfigError(
                f"the training loss or gradient became non-finite at step {bad}; stopped without saving. "
                f"Last good checkpoint: {checkpointer.last_good or 'none yet'}. Lower optimizer.lr, keep "
                f"trainer.grad_clip on, use trainer.precision=fp32, or set trainer.on_nonfinite=skip"
            )

    def log_window(epoch: int) -> None:
        mean_loss, steps, seconds = window.flush()
        if steps:
            lr = optimizer.param_groups[0]["lr"]
            loggers.log(
                {
                    "train/loss": mean_loss,
                    "train/lr": lr,
                    "train/images_per_sec": steps * t.batch_size / seconds,
                    "epoch": epoch,
                },
                step=global_step,
            )
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")

    def out_of_time() -> bool:
        # Rank 0's clock decides, so every rank stops after the same step.
        return budget is not None and bool(distributed.agree(budget.spent, world))

    budget = None
    if t.max_time:
        # The budget covers training and per-epoch evaluation; a resumed run gets what is left.
        budget = TimeBudget(float(t.max_time) - train_seconds, global_step, total_steps)
        log.info("time budget: %.0f s (trainer.max_time); the schedule adapts to the pace", float(t.max_time))
    try:
        with PreemptionGuard() as preemption:
            epoch = start_epoch - 1
            while global_step < total_steps and not out_of_time():
                epoch += 1
                epoch_start = time.time()
                max_epochs = math.ceil(total_steps / steps_per_epoch)
                steps = min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch)
                first = start_step if epoch == start_epoch and resume_order is not None else 0
                order = resume_order if first else train_loader.new_order()
                batches = train_loader.iter_from(order, first * t.grad_accum_steps)
                model.train()
                bar = tqdm(
                    range(first, steps),
                    desc=f"epoch {epoch}/{max_epochs}",
                    initial=first,
                    total=steps,
                    leave=False,
                    disable=None if t.progress and world.is_main else True,
                )
                for i in bar:
                    if global_step >= total_steps:  # the time budget shortened the run
                        break
                    step_loss = torch.zeros((), device=device)
                    for micro in range(t.grad_accum_steps):
                        x, y = next(batches)
                        if mixing:  # soft targets; CrossEntropyLoss takes them as they are
                            x, y = mixup_cutmix(
                                x, y, num_classes=data.num_classes, mixup_alpha=float(t.mixup_alpha),
                                cutmix_alpha=float(t.cutmix_alpha), generator=augment_generator,
                            )  # fmt: skip
                        # DDP averages gradients over the ranks once per step, on the last micro-batch.
                        last = micro == t.grad_accum_steps - 1
                        with model.no_sync() if world.distributed and not last else contextlib.nullcontext():
                            with autocast:
                                loss = criterion(forward(x), y) / t.grad_accum_steps
                            scaler.scale(loss).backward()
                        step_loss += loss.detach()
                    finite = torch.isfinite(step_loss)
                    if t.grad_clip:
                        scaler.unscale_(optimizer)
                        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
                        if not scaler.is_enabled():  # fp16's scaler skips overflowing steps itself
                            finite = finite & torch.isfinite(grad_norm)
                    # Skipping must know now: one host sync per step, as fp16's GradScaler (which
                    # skips by itself) does. Stopping need not: the window keeps a device-side
                    # flag that is read at the next log point.
                    if skip_nonfinite and world.distributed:  # skip on every rank or on none
                        finite = distributed.all_true(finite, world)
                    if skip_nonfinite and not scaler.is_enabled() and not bool(finite):
                        log.warning("step %d: non-finite loss or gradient; step skipped", global_step + 1)
                    else:
                        scaler.step(optimizer)
                        scaler.update()
                        if ema is not None:
                            ema.update_parameters(unwrap(model))
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    global_step += 1
                    window.add(step_loss, finite, global_step)
                    at_log = global_step % t.log_every_steps == 0
                    preempted = preemption.requested
                    if world.distributed:
                        # Signals reach the ranks at different moments; they agree at log points.
                        preempted = at_log and distributed.any_rank(preempted, world)
                    at_checkpoint = preempted or (
                        t.checkpoint_every_steps
                        and global_step % t.checkpoint_every_steps == 0
                        and i < steps - 1
                    )
                    if at_log or at_checkpoint:
                        if not skip_nonfinite:
                            stop_if_nonfinite()
                        log_window(epoch)
                        if budget is not None:
                            fitted = distributed.agree(budget.total_steps(global_step), world)
                            if fitted != total_steps:
                                total_steps = fitted
                                scheduler.lr_lambdas = [schedule_for(total_steps)] * len(
                                    optimizer.param_groups
                                )
                    if at_checkpoint:
                        # Mid-epoch: the epoch's order and the step within it let a resumed
                        # run replay exactly the batches this one had left.
                        seconds = train_seconds + time.time() - epoch_start
                        checkpointer.save(state(epoch, i + 1, order, seconds), "last.pt")
                        if preempted:
                            distributed.barrier(world)  # no rank leaves before rank 0 has saved
                            raise Preempted(
                                preemption.signal_name or "a signal to another rank",
                                global_step,
                                str(run_dir / "last.pt"),
                                resume_command(run_dir, world),
                            )
                bar.close()
                if window.count:
                    if not skip_nonfinite:
                        stop_if_nonfinite()
                    log_window(epoch)
                train_seconds += time.time() - epoch_start

                eval_metrics = {
                    f"val/{k}": v for k, v in evaluate(eval_model, eval_loader, autocast, world).items()
                }
                raw_metrics = {}
                if ema is not None:  # the raw weights too, to see what the averaging gives
                    raw = evaluate(unwrap(model), eval_loader, autocast, world)
                    raw_metrics = {f"val_raw/{k}": v for k, v in raw.items()}
                loggers.log({**eval_metrics, **raw_metrics, "epoch": epoch}, step=global_step)
                current = eval_metrics[monitor]
                improved = current > best_value if maximize else current < best_value
                if improved:
                    best_value, best_epoch = current, epoch
                log.info(
                    "epoch %d/%d | train loss %.4f | %s loss %.4f acc1 %.4f acc5 %.4f | %s",
                    epoch, max_epochs, window.end_epoch(), eval_name, eval_metrics["val/loss"],
                    eval_metrics["val/acc1"], eval_metrics["val/acc5"],
                    "new best" if improved else f"best {best_value:.4f} (epoch {best_epoch})",
                )  # fmt: skip
                end_state = state(epoch, steps, None, train_seconds)
                checkpointer.save(end_state, "last.pt")
                if improved:
                    checkpointer.save(end_state, "best.pt")
                if t.save_every_epoch:
                    checkpointer.save(end_state, f"epoch{epoch}.pt")

        if not eval_metrics:  # resumed a finished run: report it again
            eval_metrics = {
                f"val/{k}": v for k, v in evaluate(eval_model, eval_loader, autocast, world).items()
            }
        if t.sample_figures and world.is_main:
            log_sample_predictions(
                unwrap(eval_model), eval_split, transform, data.classes, run_dir, loggers, global_step
            )
        images_per_sec = global_step * t.batch_size / max(train_seconds, 1e-9)
        summary = {
            "completed": True,
            "best": {monitor: best_value, "epoch": best_epoch},
            "final": eval_metrics,
            "eval_split": eval_name,
            "epochs": epoch,
            "stopped_by": "max_time" if budget is not None and budget.spent else "max_epochs/max_steps",
            "steps": global_step,
            "train_seconds": round(train_seconds, 2),
            "wall_seconds": round(time.time() - started, 2),
            "images_per_sec": round(images_per_sec, 1),
            "params": n_params,
            "device": str(device),
            "world_size": world.size,
            "precision": t.precision,
            "ema_decay": t.get("ema_decay"),
            "run_dir": str(run_dir),
            "resumed_from": str(resume_path) if resume_path else None,
            **git_state(),
        }
        if world.is_main:
            write_json(run_dir / "summary.json", summary)
        loggers.summary({f"best/{monitor}": best_value, **{f"final/{k}": v for k, v in eval_metrics.items()}})
        log.info(
            "done: best %s %.4f (epoch %d), final %.4f | %.1f s training, %.0f images/s | %s",
            monitor, best_value, best_epoch, eval_metrics[monitor], train_seconds, images_per_sec, run_dir,
        )  # fmt: skip
    finally:
        loggers.finish()
    return float(best_value)
