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
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from vitexp.checkpoint import rng_state, save_checkpoint, unwrap
from vitexp.data import BatchTransform, DeviceLoader, ImageData, carve_validation
from vitexp.errors import ConfigError
from vitexp.loggers import JsonlLogger, Loggers, git_state, write_json
from vitexp.models import build_model
from vitexp.optim import make_schedule, param_groups

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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA GPU is visible; use trainer.device=auto or cpu")
    return device


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Decided once per run: bf16/fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "trainer.precision=fp16 needs a CUDA GPU; use trainer.precision=bf16 on the CPU"
            )
        return torch.autocast("cuda", dtype=torch.float16)
    raise ConfigError(f"trainer.precision={precision!r} is not one of fp32, bf16, fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    if t.monitor not in MONITORS:
        raise ConfigError(f"trainer.monitor={t.monitor!r} is not one of {', '.join(MONITORS)}")


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


def build_loggers(cfg: DictConfig, run_dir: Path, config: dict) -> Loggers:
    """metrics.jsonl always, plus every logger configured under `logger`."""
    loggers = Loggers([JsonlLogger(run_dir / "metrics.jsonl")])
    names = run_names(cfg)
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        extra = {
            "run_dir": str(run_dir),
            "run_config": config,
            "name": logger_cfg.get("name") or names["name"],
            "group": logger_cfg.get("group") or names["group"],
        }
        # Not recursive: the run's config holds `_target_`s of its own that must stay data.
        build_logger = lambda c=logger_cfg, kw=extra: instantiate(c, _recursive_=False, _convert_="all", **kw)  # noqa: E731
        loggers.loggers.append(build(f"logger.{key}", build_logger))
    return loggers


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DeviceLoader, autocast: contextlib.AbstractContextManager
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over exactly the samples of `loader`: sums over
    samples divided by the sample count, so a short last batch weighs what it holds."""
    model.eval()
    device = loader.split.images.device
    loss_sum = torch.zeros((), device=device)
    correct1 = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for x, y in loader:
        with autocast:
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(dim=1).sum()
        count += len(y)
    return {"loss": loss_sum.item() / count, "acc1": correct1.item() / count, "acc5": correct5.item() / count}


# --------------------------------------------------------------------------- the run


def train(cfg: DictConfig) -> float:
    """Train the configured model; return the best value of `trainer.monitor` (for sweepers)."""
    started = time.time()
    check_settings(cfg)
    t = cfg.trainer
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed))
    device = pick_device(t.device)
    autocast = autocast_context(device, t.precision)
    if device.type == "cuda":
        # TF32 matmuls on Ampere and newer: fp32-like accuracy at tensor-core speed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Data: whole splits on the device, augmented there a batch at a time.
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

    model = build("model", lambda: build_model(cfg.model)).to(device)
    transform = build(
        "dataset.augment",
        lambda: BatchTransform(
            img_size=unwrap(model).img_size,
            mean=list(cfg.dataset.mean),
            std=list(cfg.dataset.std),
            **OmegaConf.to_container(cfg.dataset.augment),
        ),
    )
    # Shuffling and augmentation draw from this generator only, so a run's batches depend
    # on the seed alone.
    data_generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    train_loader = DeviceLoader(
        train_split.to(device),
        batch_size=t.batch_size // t.grad_accum_steps,
        transform=transform,
        train=True,
        generator=data_generator,
    )
    eval_loader = DeviceLoader(
        eval_split.to(device), batch_size=t.eval_batch_size, transform=transform, train=False
    )

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
    max_epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = build(
        "scheduler",
        lambda: make_schedule(
            OmegaConf.to_container(cfg.scheduler), steps_per_epoch=steps_per_epoch, total_steps=total_steps
        ),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing))
    forward = torch.compile(model) if t.compile else model

    # Records: the resolved config next to Hydra's, metrics.jsonl, optional W&B.
    config = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loggers = build_loggers(cfg, run_dir, config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%.2fM params | %d train / %d %s images | %d epochs × %d steps × %d images | %s, %s | %s",
        n_params / 1e6, len(train_split), len(eval_split), eval_name, max_epochs, steps_per_epoch,
        t.batch_size, device, t.precision, run_dir,
    )  # fmt: skip

    monitor = str(t.monitor)
    maximize = not monitor.endswith("loss")
    best_value, best_epoch = (-math.inf if maximize else math.inf), 0
    global_step, train_seconds, eval_metrics = 0, 0.0, {}
    try:
        for epoch in range(1, max_epochs + 1):
            model.train()
            epoch_start = time.time()
            batches = iter(train_loader)
            steps = min(steps_per_epoch, total_steps - global_step)
            bar = tqdm(
                range(steps),
                desc=f"epoch {epoch}/{max_epochs}",
                leave=False,
                disable=None if t.progress else True,
            )
            # Losses are summed on the device and read once per log interval: no host sync per step.
            epoch_loss = torch.zeros((), device=device)
            window_loss = torch.zeros((), device=device)
            window_steps, window_start = 0, time.time()
            for i in bar:
                for _ in range(t.grad_accum_steps):
                    x, y = next(batches)
                    with autocast:
                        loss = criterion(forward(x), y) / t.grad_accum_steps
                    scaler.scale(loss).backward()
                    window_loss += loss.detach()
                if t.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                window_steps += 1
                if global_step % t.log_every_steps == 0 or i == steps - 1:  # and at the end of each epoch
                    mean_loss = window_loss.item() / window_steps
                    if not math.isfinite(mean_loss):
                        raise ConfigError(
                            f"the training loss became {mean_loss} by step {global_step}; lower "
                            f"optimizer.lr, set trainer.grad_clip, or use trainer.precision=fp32"
                        )
                    lr = optimizer.param_groups[0]["lr"]
                    elapsed = max(time.time() - window_start, 1e-9)
                    loggers.log(
                        {
                            "train/loss": mean_loss,
                            "train/lr": lr,
                            "train/images_per_sec": window_steps * t.batch_size / elapsed,
                            "epoch": epoch,
                        },
                        step=global_step,
                    )
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    epoch_loss += window_loss
                    window_loss.zero_()
                    window_steps, window_start = 0, time.time()
            bar.close()
            train_seconds += time.time() - epoch_start

            eval_metrics = {f"val/{k}": v for k, v in evaluate(model, eval_loader, autocast).items()}
            loggers.log({**eval_metrics, "epoch": epoch}, step=global_step)
            current = eval_metrics[monitor]
            improved = current > best_value if maximize else current < best_value
            if improved:
                best_value, best_epoch = current, epoch
            log.info(
                "epoch %d/%d | train loss %.4f | %s loss %.4f acc1 %.4f acc5 %.4f | %s",
                epoch, max_epochs, epoch_loss.item() / max(1, steps), eval_name, eval_metrics["val/loss"],
                eval_metrics["val/acc1"], eval_metrics["val/acc5"],
                "new best" if improved else f"best {best_value:.4f} (epoch {best_epoch})",
            )  # fmt: skip

            state = {
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "best_metric": best_value,
                "config": config,
                "rng": rng_state(data_generator),
            }
            save_checkpoint(state, run_dir / "last.pt")
            if improved:
                save_checkpoint(state, run_dir / "best.pt")
            if t.save_every_epoch:
                save_checkpoint(state, run_dir / f"epoch{epoch}.pt")

        images_per_sec = global_step * t.batch_size / max(train_seconds, 1e-9)
        summary = {
            "best": {monitor: best_value, "epoch": best_epoch},
            "final": eval_metrics,
            "eval_split": eval_name,
            "epochs": max_epochs,
            "steps": global_step,
            "train_seconds": round(train_seconds, 2),
            "wall_seconds": round(time.time() - started, 2),
            "images_per_sec": round(images_per_sec, 1),
            "params": n_params,
            "device": str(device),
            "precision": t.precision,
            "run_dir": str(run_dir),
            **git_state(),
        }
        write_json(run_dir / "summary.json", summary)
        loggers.summary({f"best/{monitor}": best_value, **{f"final/{k}": v for k, v in eval_metrics.items()}})
        log.info(
            "done: best %s %.4f (epoch %d), final %.4f | %.1f s training, %.0f images/s | %s",
            monitor, best_value, best_epoch, eval_metrics[monitor], train_seconds, images_per_sec, run_dir,
        )  # fmt: skip
    finally:
        loggers.finish()
    return float(best_value)
