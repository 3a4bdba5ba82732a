"""Checkpoints and resume in one component, as torchtitan's `CheckpointManager` over `Stateful`
parts: `Checkpoints` owns which checkpoint a run continues (`trainer.resume`), the run
directory (its lock and the overwrite policy), reading and verifying that checkpoint, whether
continuing it is still the same run, restoring the run's state from it, and saving with
rotation. The parts keep their own `state_dict`/`load_state_dict` (`TrainState` gathers them:
model, EMA, optimizer, grad scaler, progress, random streams, data loader, loggers' run ids);
the file format is `vitexp.training.checkpoint`'s.

    with Checkpoints(cfg, settings, ctx) as checkpoints:   # resolve, lock, read, check
        run = build(cfg, world, resuming=checkpoints.resuming)
        state = checkpoints.restore(run)                     # fresh, or as the checkpoint left it
        ...
        checkpoints.save(state, epoch_end=True, best=improved)

The run directory holds one run at a time. A fresh run into a folder that already holds a
run's progress (a checkpoint, metrics, a summary) stops with one line offering
`trainer.resume=auto` or `trainer.overwrite=true`; records without progress (what a run that
died at start-up leaves: an empty metrics.jsonl, an error.txt) are replaced. The lock is
`flock`, which the kernel releases when the process ends however it ends (SIGKILL included):
there is never a stale lock file to delete by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from omegaconf import DictConfig

from vitexp.config import TrainerConfig, leaves, plain, trainer_keys
from vitexp.errors import ConfigError
from vitexp.training import distributed
from vitexp.training.checkpoint import (
    read_training_checkpoint,
    remove_partial_writes,
    require_resumable,
    save_checkpoint,
)
from vitexp.training.context import RunContext
from vitexp.training.setup import Run
from vitexp.training.state import TrainState

log = logging.getLogger(__name__)

CheckpointWriter = Callable[[Mapping[str, Any], Path], None]


# --------------------------------------------------------------------------- which checkpoint


def resolve(setting: str | None, run_dir: Path) -> tuple[Path | None, bool]:
    """`trainer.resume`: null (fresh run), `auto` (this run dir's last.pt when there is one, so
    re-running a command continues it) or a checkpoint path. A SLURM job that was requeued
    (after preemption or its time limit) resumes as with `auto`: it is the same run. Returns
    the checkpoint (or None) and whether the folder's own run was asked for (auto)."""
    last = run_dir / "last.pt"
    if not setting:
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            log.info("requeued SLURM job (restart %s): resuming", os.environ["SLURM_RESTART_COUNT"])
            return (last if last.is_file() else None), True
        return None, False
    if setting == "auto":
        return (last if last.is_file() else None), True
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.resume={setting}: no such checkpoint; give a checkpoint file, or auto")
    return path, False


# --------------------------------------------------------------------------- the run directory

LOCK_NAME = ".vitexp.lock"
# What a run writes that a second run would replace or mix its own records into.
RECORDS = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "attention.png", "error.txt")


def records_in(run_dir: Path) -> list[str]:
    """The run records `run_dir` holds (checkpoints, metrics, summary), by name."""
    names = [name for name in RECORDS if (run_dir / name).is_file()]
    epochs = sorted(p.name for p in run_dir.glob("epoch*.pt"))
    return names + epochs


def holds_progress(path: Path) -> bool:
    """Whether a record keeps something of the run's work: a checkpoint, the summary, metrics
    with at least one row. An empty metrics.jsonl or an error.txt (a run that died at
    start-up) holds nothing a re-run could lose."""
    if path.name == "metrics.jsonl":
        with path.open(encoding="utf-8", errors="replace") as rows:
            return any(row.strip() for row in rows)
    return path.name.endswith(".pt") or path.name == "summary.json"


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
    progress = [name for name in found if holds_progress(run_dir / name)]
    checkpoints = [name for name in progress if name.endswith(".pt")]
    if overwrite or not progress or (auto and not checkpoints):
        for name in found:
            (run_dir / name).unlink(missing_ok=True)
        if progress:
            log.warning("replaced the records of an earlier run in %s: %s", run_dir, ", ".join(found))
        else:
            log.info(
                "removed %s in %s: left by a run that ended before it made progress",
                ", ".join(found),
                run_dir,
            )
        return
    where = "" if resume_from is None else f" (this run resumes {resume_from}, from elsewhere)"
    raise ConfigError(
        f"{run_dir} already holds a run ({', '.join(found[:4])}){where}: add trainer.resume=auto to continue "
        f"it, give another hydra.run.dir, or add trainer.overwrite=true to replace it"
    )


# --------------------------------------------------------------------------- the same run

# What decides the run: the model, the data each step sees, the objective and the schedule.
# Everything else (device, precision, compile, workers, logging and checkpoint intervals, the
# dataset's folder) may change between the interrupted run and the resumed one.
RUN_DEFINING = ("model", "dataset", "optimizer", "scheduler", "seed")
RUN_DEFINING_TRAINER = trainer_keys("same_run") + trainer_keys("fixed")
# What cannot change in the middle of a run even with trainer.resume_allow_changes: the seed
# (a resumed run draws from the checkpoint's random streams, so a new seed would be recorded
# and never used) and the trainer settings declared `fixed`.
FIXED = ("seed", *(f"trainer.{key}" for key in trainer_keys("fixed")))
FREE = {
    "model.pretrained",
    "model.pretrained_format",
    "dataset.root",
    "dataset.download",
    "dataset.num_workers",
}
FREE_PREFIXES = ("dataset.load.root", "dataset.load.download", "dataset.load.on_error", "dataset.on_error")
_MISSING = object()


def _defining(config: Mapping[str, Any]) -> dict[str, Any]:
    # A stored config is plain data from a file, not the typed settings: read it as such.
    keys = {k: config.get(k) for k in RUN_DEFINING}
    trainer = config.get("trainer") or {}
    keys["trainer"] = {k: trainer.get(k) for k in RUN_DEFINING_TRAINER}
    flat = leaves(keys)
    return {k: v for k, v in flat.items() if k not in FREE and not k.startswith(FREE_PREFIXES)}


def changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`key: (stored, current)` for every run-defining setting that differs (`_MISSING` where
    one side does not have it)."""
    before, after = _defining(stored), _defining(current)
    found = {}
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, _MISSING), after.get(key, _MISSING)
        # A setting added since the checkpoint was written, at its null default (off), is no change.
        if old in (_MISSING, None) and new in (_MISSING, None):
            continue
        if old != new:
            found[key] = (old, new)
    return found


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else repr(value)


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: stored -> current` for every run-defining setting that differs."""
    return [f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes(stored, current).items()]


def check_same_run(
    stored: Mapping[str, Any], current: Mapping[str, Any], *, source: Path, allow: bool
) -> None:
    """Refuse to resume `source` when the run-defining settings changed (one line naming each
    difference), unless `allow` (trainer.resume_allow_changes), which logs each as a warning.
    A FIXED setting is refused even then."""
    changed = changes(stored, current)
    fixed = [key for key in changed if key in FIXED]
    if fixed:
        key, (old, new) = fixed[0], changed[fixed[0]]
        raise ConfigError(
            f"resuming {source} would change {key} ({_show(old)} -> {_show(new)}), which cannot change in "
            f"the middle of a run (not even with trainer.resume_allow_changes): keep {key}={old}, or start "
            f"a fresh run"
        )
    lines = differences(stored, current)
    if not lines:
        return
    if allow:
        for line in lines:
            log.warning("resuming %s with a changed setting (trainer.resume_allow_changes): %s", source, line)
        return
    raise ConfigError(
        f"resuming {source} would change the run: {'; '.join(lines[:6])}"
        f"{' (and more)' if len(lines) > 6 else ''}. Give the settings it was trained with, or add "
        f"trainer.resume_allow_changes=true to continue with the new ones"
    )


# --------------------------------------------------------------------------- the component


class Checkpoints:
    """A run's checkpoints, from the run directory it settles to the last file it writes.

    As a context manager it settles the run directory (`__enter__`: resolve `trainer.resume`,
    lock the directory and check this run may write there, read and verify the checkpoint to
    continue and check it is the same run) and holds the lock until the run ends. `restore`
    gives the run's state, fresh or as the checkpoint left it; `save` writes last.pt (best.pt,
    epoch{N}.pt) from it. `write` writes one file (tests pass a failing one)."""

    def __init__(
        self,
        cfg: DictConfig,
        settings: TrainerConfig,
        ctx: RunContext,
        *,
        write: CheckpointWriter = save_checkpoint,
    ) -> None:
        self.cfg, self.settings, self.run_dir, self.world = cfg, settings, ctx.run_dir, ctx.world
        self.write = write
        self.source: Path | None = None  # the checkpoint this run continues
        self.last_good: str | None = None  # the newest checkpoint written, for error messages
        self._ckpt: dict[str, Any] | None = None
        self._lock = contextlib.ExitStack()

    @property
    def resuming(self) -> bool:
        return self.source is not None

    def __enter__(self) -> Checkpoints:
        source, auto = resolve(self.settings.resume, self.run_dir)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.world)
        try:
            self._claim(source, auto=auto)
            if source is not None:
                self._ckpt = self._read(source)
                self.source = source
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.close()

    def _claim(self, source: Path | None, *, auto: bool) -> None:
        """Rank 0 locks the run dir and checks it may write there; every rank learns the
        verdict (collective), so a refusal stops all of them."""
        problem = None
        if self.world.is_main:
            try:
                self._lock.enter_context(RunDirLock(self.run_dir))
                prepare(self.run_dir, resume_from=source, auto=auto, overwrite=self.settings.overwrite)
            except ConfigError as e:
                problem = str(e)
        problem = distributed.agree(problem, self.world)
        if problem is not None:
            raise ConfigError(problem)

    def _read(self, source: Path) -> dict[str, Any]:
        """The checkpoint to continue, verified, complete, and of the same run."""
        ckpt = read_training_checkpoint(source)
        require_resumable(ckpt, str(source))
        check_same_run(
            ckpt["config"], plain(self.cfg), source=source, allow=self.settings.resume_allow_changes
        )
        return ckpt

    # ------------------------------------------------------------------- restore

    def restore(self, run: Run) -> TrainState:
        """The run's state: fresh, or restored from the checkpoint into every part of `run`
        (which then holds its tensors: the checkpoint is dropped)."""
        state = TrainState(run)
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is None or self.source is None:
            return state
        state.load_state_dict(ckpt, self.source)
        p = state.progress
        log.info(
            "resuming from %s: epoch %d, step %d", self.source, p.epoch + (p.order is None), p.global_step
        )
        self._say_what_the_schedule_does(run, ckpt, state)
        ckpt.clear()
        return state

    def _say_what_the_schedule_does(self, run: Run, ckpt: Mapping[str, Any], state: TrainState) -> None:
        """A run resumed to another length (more trainer.max_epochs or max_steps): the
        schedule, a function of the step and the run's length, is recomputed for the new
        length and continues from the current step (no new warmup). Say what that does to
        the learning rate."""
        stored = ckpt["config"].get("trainer") or {}
        before = stored.get("max_steps") or int(stored.get("max_epochs") or 0) * run.steps_per_epoch
        step = state.progress.global_step
        if self.settings.max_time is not None or not before or before == run.total_steps:
            return
        saved_groups = ckpt["optimizer"].get("param_groups") or [{}]
        last_lr = float(saved_groups[0].get("lr", float("nan")))
        next_lr = run.base_lrs[0] * run.schedule(step, run.total_steps)
        name = str(run.config["scheduler"]["_target_"]).rsplit(".", 1)[-1]
        log.warning(
            "the run now ends at step %d instead of %d: the %s schedule is recomputed for %d steps and "
            "continues at step %d without a new warmup; the learning rate goes from %.3g to %.3g",
            run.total_steps, before, name, run.total_steps, step, last_lr, next_lr,
        )  # fmt: skip

    # ------------------------------------------------------------------- save

    def due(self, global_step: int) -> bool:
        """Whether a mid-epoch last.pt is due after this step (`trainer.checkpoint_every_steps`)."""
        every = self.settings.checkpoint_every_steps
        return every is not None and global_step % every == 0

    def save(self, state: TrainState, *, epoch_end: bool = False, best: bool = False) -> None:
        """last.pt, plus best.pt when `best`, plus epoch{N}.pt at an epoch's end with
        `trainer.save_every_epoch` (the newest `keep_last_k` kept). Collective: every rank
        calls it (their random streams are gathered); rank 0 writes."""
        snapshot = state.state_dict(gather_rank_streams(state))
        names = ["last.pt", *(["best.pt"] if best else [])]
        if epoch_end and self.settings.save_every_epoch:
            names.append(f"epoch{state.progress.epoch}.pt")
        for name in names:
            self._write(snapshot, name)

    def _write(self, snapshot: Mapping[str, Any], name: str) -> bool:
        """A failed write (disk full) keeps the previous file and says so instead of stopping
        the run."""
        path = self.run_dir / name
        step = snapshot["progress"]["global_step"]
        if not self.world.is_main:
            self.last_good = f"{path} (step {step})"
            return True
        try:
            self.write(snapshot, path)
        except OSError as e:
            log.warning("could not write %s (%s); the previous %s is kept", path, e.strerror or e, name)
            return False
        if name == "last.pt":
            self.last_good = f"{path} (step {step})"
        if name.startswith("epoch") and self.settings.keep_last_k:
            epochs = sorted(self.run_dir.glob("epoch*.pt"), key=lambda p: int(p.stem[5:]))
            for old in epochs[: -self.settings.keep_last_k]:
                old.unlink(missing_ok=True)
        return True


def gather_rank_streams(state: TrainState) -> list[dict[str, Any]] | None:
    """Every rank's own random streams (collective: every rank must call it), or None when
    `rng` holds them all (one process on the CPU, where one generator shuffles and augments)."""
    run = state.run
    if run.augment_generator is run.data_generator:
        return None
    return distributed.gather(state.rank_stream(), run.world)
