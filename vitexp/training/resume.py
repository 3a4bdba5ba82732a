"""Which checkpoint a run continues, and whether continuing it would still be the same run."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitexp.config import trainer_keys
from vitexp.errors import ConfigError

log = logging.getLogger(__name__)

# What decides the run: the model, the data each step sees, the objective and the schedule.
# Everything else (device, precision, compile, workers, logging and checkpoint intervals, the
# dataset's folder) may change between the interrupted run and the resumed one.
RUN_DEFINING = ("model", "dataset", "optimizer", "scheduler", "seed")
RUN_DEFINING_TRAINER = trainer_keys("same_run") + trainer_keys("fixed")
FREE = {
    "model.pretrained",
    "model.pretrained_format",
    "dataset.root",
    "dataset.download",
    "dataset.num_workers",
}
FREE_PREFIXES = ("dataset.load.root", "dataset.load.download", "dataset.load.on_error", "dataset.on_error")


def resolve(setting: Any, run_dir: Path) -> tuple[Path | None, bool]:
    """`trainer.resume`: null (fresh run), `auto` (this run dir's last.pt when there is one, so
    re-running a command continues it) or a checkpoint path. A SLURM job that was requeued
    (after preemption or its time limit) resumes as with `auto`: it is the same run. Returns
    the checkpoint (or None) and whether the folder's own run was asked for (auto)."""
    if setting in (None, "", False):
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            log.info("requeued SLURM job (restart %s): resuming", os.environ["SLURM_RESTART_COUNT"])
            last = run_dir / "last.pt"
            return (last if last.is_file() else None), True
        return None, False
    if str(setting) == "auto":
        last = run_dir / "last.pt"
        return (last if last.is_file() else None), True
    path = Path(str(setting)).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.resume={setting}: no such checkpoint; give a checkpoint file, or auto")
    return path, False


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _defining(config: Mapping[str, Any]) -> dict[str, Any]:
    keys = {k: config.get(k) for k in RUN_DEFINING}
    trainer = config.get("trainer") or {}
    keys["trainer"] = {k: trainer.get(k) for k in RUN_DEFINING_TRAINER}
    flat = _flatten(keys, "")
    return {k: v for k, v in flat.items() if k not in FREE and not k.startswith(FREE_PREFIXES)}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: stored -> current` for every run-defining setting that differs."""
    before, after = _defining(stored), _defining(current)
    missing = object()
    changed = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, missing), after.get(key, missing)
        if old != new:
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            changed.append(f"{key}: {show(old)} -> {show(new)}")
    return changed


def check_same_run(
    stored: Mapping[str, Any], current: Mapping[str, Any], *, source: Path, allow: bool
) -> None:
    """Refuse to resume `source` when the run-defining settings changed (one line naming each
    difference), unless `allow` (trainer.resume_allow_changes), which logs each as a warning."""
    changed = differences(stored, current)
    if not changed:
        return
    if allow:
        for change in changed:
            log.warning(
                "resuming %s with a changed setting (trainer.resume_allow_changes): %s", source, change
            )
        return
    raise ConfigError(
        f"resuming {source} would change the run: {'; '.join(changed[:6])}"
        f"{' (and more)' if len(changed) > 6 else ''}. Give the settings it was trained with, or add "
        f"trainer.resume_allow_changes=true to continue with the new ones"
    )
