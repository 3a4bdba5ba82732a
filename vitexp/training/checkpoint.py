"""Checkpoint files: plain state dicts written atomically, read without executing code, and
the format they follow.

A checkpoint is a dict of tensors and plain Python values (the resolved config included),
so `torch.load(weights_only=True)` reads it: a file that would need arbitrary code to
unpickle is refused, never run; one whose bytes changed since it was written (its zip CRCs
no longer match) is refused too. What goes into it is decided by `TrainState.state_dict`
(`vitexp.training.state`); this module only writes, reads, checks and upgrades files.

Format 2 (written since the training loop was restructured):

    format_version  2
    model           the model's state dict (unwrapped: no `module.`/`_orig_mod.` prefixes)
    ema, ema_updates the EMA weights and how many updates made them (None, 0 without EMA)
    optimizer, scaler  their state dicts (the learning rate is a function of the step: no scheduler state)
    progress        epoch, step_in_epoch, epoch_complete, order (the epoch's data order while it
                    is in progress), global_step, train_seconds, best_metric, best_epoch
    rng             this process's random streams (`capture_rng`); rank_rng: every rank's
                    augmentation stream, world_size: how many processes wrote it
    config          the resolved config of the run; classes: the class names; logger_ids: W&B ids

Format 1 (before) kept the progress fields at the top level, a LambdaLR `scheduler` state, the
RNG state of every visible GPU and the data generator's bare state; `upgrade` turns it into
format 2, so old checkpoints resume and load in the inspection commands.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp.errors import DataError, first_line

FORMAT_VERSION = 2
PROGRESS_KEYS = (
    "epoch",
    "step_in_epoch",
    "epoch_complete",
    "order",
    "global_step",
    "train_seconds",
    "best_metric",
    "best_epoch",
)
# Modules moved when the package was split into subpackages; stored configs still name them.
LEGACY_TARGETS = {"vitexp.optim.": "vitexp.training.optim.", "vitexp.loggers.": "vitexp.training.loggers."}
# A CUDA generator's state is 16 bytes (seed and offset); a CPU one's is the Mersenne Twister's.
_CUDA_GENERATOR_STATE_BYTES = 16


# --------------------------------------------------------------------------- random streams


def capture_rng(generator: torch.Generator | None, device: torch.device) -> dict[str, Any]:
    """Every random stream this process draws from, in a form `weights_only` loading accepts:
    Python, numpy, torch's CPU stream, the CUDA stream of this process's own device (not every
    visible GPU's: another machine may see fewer), and `generator` with its device type."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: ("MT19937", keys, pos, has_gauss, gauss)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    if generator is not None:
        state["generator"] = {"device": generator.device.type, "state": generator.get_state()}
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None, device: torch.device) -> bool:
    """Restore what `capture_rng` captured. Returns False when `generator`'s saved state is of
    another device type (a GPU checkpoint resumed on the CPU, or the reverse): its state cannot
    be carried over, and the caller re-derives the stream instead."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy(), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    saved = state.get("generator")
    if generator is None or saved is None:
        return True
    if saved["device"] != generator.device.type:
        return False
    generator.set_state(saved["state"])
    return True


# --------------------------------------------------------------------------- files


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, then a
    rename, so a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temporary files that `save_checkpoint` leaves when the process is killed
    mid-write (`.last.pt.XXXX.tmp`); returns what was removed."""
    removed = []
    for tmp in folder.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def verify_archive(path: Path) -> None:
    """Refuse a torch file whose bytes changed after it was written. `torch.save` writes a zip
    archive with a CRC-32 of every member, but `torch.load` does not check them: a zeroed block
    inside a tensor loads as different weights without a word. `testzip` reads every member
    once and checks its CRC (about the cost of reading the file, which also leaves it in the
    page cache for `torch.load`); a file in torch's legacy (non-zip) format has no checksums."""
    if not zipfile.is_zipfile(path):
        return  # not a zip at all: torch.load judges it (and names a truncated file)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(
            f"{path} is truncated or corrupt and cannot be read ({first_line(e)}); use another checkpoint"
        ) from e
    if damaged is not None:
        raise DataError(
            f"{path} is damaged: its member {damaged} does not match the checksum written with it (a bad "
            f"disk or an interrupted copy); use another checkpoint"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read any torch-saved file (a checkpoint, a state dict) without executing code, after
    checking that its bytes are those written (`verify_archive`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; check the path")
    if path.stat().st_size == 0:
        raise DataError(
            f"{path} is empty (0 bytes: a full disk or an interrupted copy); use another checkpoint"
        )
    verify_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"refused to load {path}: it needs arbitrary code to unpickle, which vitexp never runs "
            f"({first_line(e)})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as e:
        raise DataError(
            f"{path} is truncated or corrupt and cannot be read ({first_line(e)}); use another checkpoint"
        ) from e


def _modern_target(target: Any) -> Any:
    if isinstance(target, str):
        for old, new in LEGACY_TARGETS.items():
            if target.startswith(old):
                return new + target[len(old) :]
    return target


def _modern_config(node: Any) -> Any:
    """The stored config with targets of moved modules renamed (see LEGACY_TARGETS)."""
    if isinstance(node, dict):
        return {k: _modern_target(v) if k == "_target_" else _modern_config(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_modern_config(v) for v in node]
    return node


def _upgrade_rng_1(rng: dict[str, Any]) -> dict[str, Any]:
    out = {k: rng[k] for k in ("python", "numpy", "torch")}
    cuda = rng.get("cuda") or []
    # Format 1 kept every visible GPU's stream; a single-process run used the first one.
    out["cuda"] = cuda[0] if cuda else None
    data = rng.get("data")
    if data is not None:
        device = "cuda" if data.numel() == _CUDA_GENERATOR_STATE_BYTES else "cpu"
        out["generator"] = {"device": device, "state": data}
    return out


def upgrade(ckpt: dict[str, Any], source: str) -> dict[str, Any]:
    """A training checkpoint of any known format as format 2. Raises DataError for files that
    are no vitexp training checkpoint, or come from a newer vitexp."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise DataError(
            f"{source} is not a vitexp training checkpoint (it holds no model state dict and progress); "
            f"use last.pt, best.pt or epoch<N>.pt from a run directory"
        )
    version = ckpt.get("format_version")
    if version == FORMAT_VERSION:
        return ckpt
    if version != 1:
        raise DataError(
            f"{source} has checkpoint format {version!r}; this vitexp reads formats 1 and {FORMAT_VERSION} "
            f"(a newer vitexp wrote it: upgrade vitexp)"
        )
    # What is there is converted; what resuming needs is checked by `require_resumable`.
    out = {k: v for k, v in ckpt.items() if k not in (*PROGRESS_KEYS, "scheduler")}
    out["format_version"] = FORMAT_VERSION
    out["progress"] = {k: ckpt[k] for k in PROGRESS_KEYS if k in ckpt}
    if "rng" in ckpt:
        out["rng"] = _upgrade_rng_1(ckpt["rng"])
    out["rank_rng"] = [_upgrade_rng_1(r) for r in ckpt["rank_rng"]] if ckpt.get("rank_rng") else None
    if isinstance(ckpt.get("config"), dict):
        out["config"] = _modern_config(ckpt["config"])
    return out


def require_resumable(ckpt: Mapping[str, Any], source: str) -> None:
    """A checkpoint to resume must hold all a run's state, not just weights to inspect."""
    missing = [k for k in ("optimizer", "scaler", "rng", "config", "progress") if k not in ckpt]
    missing += [f"progress.{k}" for k in PROGRESS_KEYS if k not in ckpt.get("progress", {})]
    if missing:
        raise DataError(
            f"{source} cannot be resumed: it lacks {', '.join(missing[:4])} (written for inference, or "
            f"damaged); start a fresh run with model.pretrained={source} to use its weights"
        )


def read_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A vitexp training checkpoint (`last.pt`, `best.pt`, `epoch<N>.pt`) as format 2."""
    return upgrade(load_checkpoint(path, map_location), str(path))
