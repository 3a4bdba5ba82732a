"""Metric sinks, all fed from one place in the training loop.

Every run writes `metrics.jsonl` in its run directory; W&B is optional. A logger that
fails (no network, a crashed W&B process) warns once and is switched off: logging never
stops training.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch

log = logging.getLogger(__name__)


class JsonlLogger:
    """One JSON object per line: `{"step": …, "key": value, …}`, flushed as written."""

    def __init__(self, path: str | Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.is_file():
            # A resumed run continues from its checkpoint: rows logged after it (before the
            # interruption) are replaced by the ones the resumed run writes.
            rows = self.path.read_text(encoding="utf-8").splitlines()
            kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= keep_until_step]
            self.path.write_text("".join(f"{row}\n" for row in kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def summary(self, values: Mapping[str, Any]) -> None:
        """The summary lives in summary.json, written by the training loop."""

    def images(self, name: str, images: list[tuple[Any, str]], step: int) -> None:
        """Pictures stay in the run dir (attention.png); nothing to add to metrics.jsonl."""

    def finish(self) -> None:
        self._file.close()


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger:
    """Weights & Biases run whose files stay inside the Hydra run directory."""

    def __init__(
        self,
        *,
        run_dir: str | Path,
        run_config: Mapping[str, Any],
        project: str = "vitexp",
        entity: str | None = None,
        mode: str = "auto",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
    ) -> None:
        import wandb

        self._wandb = wandb
        self._failed = False
        # WANDB_MODE in the environment wins, as W&B users expect.
        mode = os.environ.get("WANDB_MODE", mode)
        if mode == "auto":
            mode = "online" if _wandb_credentials() else "offline"
            if mode == "offline":
                log.info(
                    "W&B: no credentials found, logging offline; upload later with `wandb sync %s/wandb`",
                    run_dir,
                )
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb.mode={mode!r} must be one of auto, online, offline, disabled")
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags or []),
            config=dict(run_config),
            dir=str(run_dir),
            mode=cast(Literal["online", "offline", "disabled"], mode),  # checked just above
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
        )
        # Epoch-level metrics plot against the epoch; the summary keeps the best value.
        self.run.define_metric("epoch")
        self.run.define_metric("val/*", step_metric="epoch")
        self.run.define_metric("val/acc1", step_metric="epoch", summary="max")
        self.run.define_metric("val/loss", step_metric="epoch", summary="min")

    @property
    def run_id(self) -> str:
        return self.run.id

    def _guard(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # a logging backend must never stop training
            self._failed = True
            log.warning("W&B %s failed (%s); W&B logging is off for the rest of this run", action, e)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._guard("log", self.run.log, dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        self._guard("summary", self.run.summary.update, dict(values))

    def images(self, name: str, images: list[tuple[Any, str]], step: int) -> None:
        """`images`: (uint8 (C, H, W) tensor or image file, caption) pairs."""

        def to_wandb(image: Any, caption: str) -> Any:
            if isinstance(image, torch.Tensor):
                image = image.permute(1, 2, 0).squeeze(-1).numpy()
            else:
                image = str(image)
            return self._wandb.Image(image, caption=caption)

        self._guard("images", lambda: self.run.log({name: [to_wandb(i, c) for i, c in images]}, step=step))

    def finish(self) -> None:
        self._guard("finish", self.run.finish)


class Loggers:
    """Fan-out to several loggers, finished when the `with` block ends however it ends (a W&B
    run left open breaks the next job of a multirun). Loggers added with `add` are the
    configured ones (W&B), whose run ids checkpoints keep."""

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = list(loggers)
        self.named: dict[str, Any] = {}

    def add(self, key: str, logger: Any) -> None:
        self.loggers.append(logger)
        self.named[key] = logger

    def run_ids(self) -> dict[str, str]:
        """Ids of external runs (W&B), stored in checkpoints so a resumed run continues them."""
        return {key: lg.run_id for key, lg in self.named.items() if getattr(lg, "run_id", None)}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def images(self, name: str, images: list[tuple[Any, str]], step: int) -> None:
        for logger in self.loggers:
            logger.images(name, images, step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the source tree vitexp runs from, when that is a git checkout."""
    src = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=src, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "-uno")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
