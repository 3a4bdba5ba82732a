"""What a run leaves behind besides checkpoints: its resolved config.yaml, the loggers it feeds
(metrics.jsonl, W&B), the figures drawn at its end, and `summary.json`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import OmegaConf

from vitexp.config import instantiate_group
from vitexp.curves import write_curves
from vitexp.training.context import RunContext
from vitexp.training.loggers import JsonlLogger, Loggers, git_state, write_json
from vitexp.training.setup import Run
from vitexp.training.state import TrainState
from vitexp.viz import has_attention_maps, sample_images, save_attention_grid

log = logging.getLogger(__name__)


class Fitted(NamedTuple):
    """How training ended: the final evaluation's metrics, and what stopped it."""

    final: dict[str, float]
    stopped_by: str  # "max_time", "max_epochs/max_steps", or "pruned" (its Optuna trial's pruner)


def open_records(run: Run, ctx: RunContext, state: TrainState) -> Loggers:
    """config.yaml (the config, resolved), and the loggers: metrics.jsonl always, plus every
    logger configured under `logger` (rank 0 only; the other ranks get none). metrics.jsonl
    keeps the rows up to the state's step (a resumed run drops those its checkpoint had not
    reached), and the loggers continue the external runs whose ids the state holds."""
    if not run.world.is_main:
        return Loggers([])
    (ctx.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    loggers = Loggers(
        [JsonlLogger(ctx.run_dir / "metrics.jsonl", keep_until_step=state.progress.global_step)]
    )
    for key, logger_cfg in (run.cfg.get("logger") or {}).items():
        extra: dict[str, Any] = {
            "run_dir": str(ctx.run_dir),
            # The code version goes with the config: W&B shows it beside every hyperparameter.
            "run_config": {**run.config, "git": git_state()},
            "name": logger_cfg.get("name") or ctx.name,
            "group": logger_cfg.get("group") or ctx.group,
        }
        if state.logger_ids.get(key):
            extra["run_id"] = state.logger_ids[key]
        # Not recursive: the run's config holds `_target_`s of its own that must stay data.
        logger = instantiate_group(f"logger.{key}", logger_cfg, _recursive_=False, _convert_="all", **extra)
        loggers.add(key, logger)
    state.logger_ids = loggers.run_ids()
    return loggers


@torch.no_grad()
def log_sample_predictions(run: Run, run_dir: Path, loggers: Loggers, step: int) -> None:
    """A fixed handful of eval images (one per class first) with their predicted classes go to
    the loggers; for models with attention maps, the same images' maps go to attention.png in
    the run dir (and the loggers). A figure that fails warns: it never costs the run."""
    model, classes = run.eval_model, run.data.classes
    try:
        images, labels = sample_images(run.eval_split, 8)
        x = torch.cat([run.transform.eval(img[None].to(run.device)) for img in images])
        model.eval()
        predicted = model(x).argmax(dim=1).tolist()
        samples = [
            (img.cpu(), f"predicted {classes[p]} / true {classes[t]}")
            for img, p, t in zip(images, predicted, labels.tolist(), strict=True)
        ]
        loggers.images("val/predictions", samples, step=step)
        if has_attention_maps(model):
            path = save_attention_grid(
                model, images, run.transform, run_dir / "attention.png", classes, labels
            )
            loggers.images("val/attention", [(path, "attention rollout and last-layer heads")], step=step)
    except Exception as e:  # a picture is not worth a failed run; the traceback goes to the log
        log.warning("could not draw the sample predictions (%s: %s)", type(e).__name__, e, exc_info=True)


def write_records(
    run: Run,
    ctx: RunContext,
    state: TrainState,
    loggers: Loggers,
    fitted: Fitted,
    *,
    started: float,
    resumed_from: Path | None,
) -> dict[str, Any]:
    """What a finished run leaves: the sample figures (`trainer.sample_figures`), summary.json
    (rank 0), the loggers' summary, and the run's last log line. Returns the summary."""
    if run.trainer.sample_figures and run.world.is_main:
        log_sample_predictions(run, ctx.run_dir, loggers, state.progress.global_step)
    p, t, final = state.progress, run.trainer, fitted.final
    images_per_sec = p.global_step * t.batch_size / max(p.train_seconds, 1e-9)
    n_params = sum(param.numel() for param in run.model.parameters())
    summary = {
        "completed": True,
        "best": {run.monitor: p.best_value, "epoch": p.best_epoch},
        "final": final,
        "eval_split": run.eval_name,
        "epochs": p.epoch,
        "stopped_by": fitted.stopped_by,
        "steps": p.global_step,
        "train_seconds": round(p.train_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        "images_per_sec": round(images_per_sec, 1),
        "params": n_params,
        "trainable_params": sum(param.numel() for param in run.model.parameters() if param.requires_grad),
        "device": str(run.device),
        "world_size": run.world.size,
        "precision": t.precision,
        "ema_decay": t.ema_decay,
        "run_dir": str(ctx.run_dir),
        "resumed_from": str(resumed_from) if resumed_from else None,
        **git_state(),
    }
    if run.world.is_main:
        write_json(ctx.run_dir / "summary.json", summary)
        write_curves(ctx.run_dir)  # curves.png: losses, accuracy and learning rate against steps
    loggers.summary({f"best/{run.monitor}": p.best_value, **{f"final/{k}": v for k, v in final.items()}})
    log.info(
        "done: best %s %.4f (epoch %d), final %.4f | %.1f s training, %.0f images/s | %s",
        run.monitor, p.best_value, p.best_epoch, final[run.monitor], p.train_seconds, images_per_sec,
        ctx.run_dir,
    )  # fmt: skip
    return summary
