"""The run directory: one run at a time, and a finished run never overwritten by accident.

A fresh run into a folder that already holds a run's records stops with one line offering
`trainer.resume=auto` or `trainer.overwrite=true`; a run holds an OS file lock on its folder
for its whole life, so a second run started on the same folder stops at once. The lock is
`flock`, which the kernel releases when the process ends however it ends (SIGKILL included):
there is never a stale lock file to delete by hand.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import IO

from vitexp.errors import ConfigError
from vitexp.training.checkpoint import remove_partial_writes

log = logging.getLogger(__name__)

LOCK_NAME = ".vitexp.lock"
# What a run writes that a second run would replace or mix its own records into.
RECORDS = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "attention.png", "error.txt")


def records_in(run_dir: Path) -> list[str]:
    """The run records `run_dir` holds (checkpoints, metrics, summary), by name."""
    names = [name for name in RECORDS if (run_dir / name).is_file()]
    epochs = sorted(p.name for p in run_dir.glob("epoch*.pt"))
    return names + epochs


class RunDirLock:
    """Exclusive lock on a run directory for as long as the `with` block runs."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def __enter__(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"another vitexp run ({holder}) is training in {self.path.parent}; wait for it to end, "
                f"or give this run another hydra.run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def prepare(run_dir: Path, *, resume_from: Path | None, auto: bool, overwrite: bool) -> None:
    """Check that this run may write into `run_dir` (call it holding the lock).

    `resume_from`: the checkpoint this run continues (None: a fresh run); `auto`: the run was
    asked to continue the folder's own run if there is one (`trainer.resume=auto` or a requeued
    SLURM job), so records without a checkpoint (a run killed before its first one) are
    replaced; `overwrite`: the user asked to replace whatever is there."""
    for tmp in remove_partial_writes(run_dir):
        log.info("removed %s, left by a checkpoint write that was interrupted", tmp.name)
    found = records_in(run_dir)
    continues_this_folder = resume_from is not None and resume_from.resolve().parent == run_dir.resolve()
    if not found or continues_this_folder:
        return
    checkpoints = [name for name in found if name.endswith(".pt")]
    if overwrite or (auto and not checkpoints):
        for name in found:
            (run_dir / name).unlink(missing_ok=True)
        log.warning("replaced the records of an earlier run in %s: %s", run_dir, ", ".join(found))
        return
    where = "" if resume_from is None else f" (this run resumes {resume_from}, from elsewhere)"
    raise ConfigError(
        f"{run_dir} already holds a run ({', '.join(found[:4])}){where}: add trainer.resume=auto to continue "
        f"it, give another hydra.run.dir, or add trainer.overwrite=true to replace it"
    )
