"""The study a sweep writes: its storage (a journal file by default, a database URL, or
memory), continuing a stored study only as it was run, and the trials a dead run left behind."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.vitexp_sweeps._optuna_space import space_difference
from vitexp.errors import ConfigError, first_line
from vitexp.studies import open_storage

log = logging.getLogger(__name__)


def storage_spec(storage: Any) -> str | None:
    """The storage setting as the jobs get it: None (in memory), a database URL whose SQLite
    file is absolute, or the absolute path of a journal file (the jobs may run elsewhere)."""
    if storage is None:
        return None
    if not isinstance(storage, str) or not storage.strip():
        raise ConfigError(
            f"hydra.sweeper.storage={storage} must be a journal file's path, a database URL "
            "(sqlite:///FILE, postgresql://…) or null (in memory)"
        )
    prefix = "sqlite:///"
    if storage.startswith(prefix) and storage != prefix + ":memory:":
        return prefix + str(Path(storage[len(prefix) :]).absolute())
    if "://" in storage:
        return storage
    return str(Path(storage).absolute())


def local_file(spec: str) -> Path | None:
    """The file holding a journal or SQLite study (None for a database server)."""
    if spec.startswith("sqlite:///"):
        return Path(spec[len("sqlite:///") :])
    return None if "://" in spec else Path(spec)


def open_backend(spec: str) -> Any:
    """The storage, or one line when it cannot be opened (before any trial or engine starts)."""
    try:
        backend = open_storage(spec)
        backend.get_all_studies()
    except Exception as e:  # a URL SQLAlchemy cannot use, a database it cannot reach or read
        raise ConfigError(f"hydra.sweeper.storage={spec} cannot be opened: {first_line(e)}") from e
    return backend


def has_study(backend: Any, name: str) -> bool:
    return name in {s.study_name for s in backend.get_all_studies()}


def move_sqlite_study(backend: Any, spec: str, name: str, sweep_dir: Path) -> None:
    """A study that the sweeper kept in `optuna.db` (SQLite, before journal files were the
    default) continues in the journal file: copied once, trials, numbers and states as they
    were; optuna.db is left as it is."""
    old = sweep_dir / "optuna.db"
    if local_file(spec) is None or not old.is_file():
        return
    url = f"sqlite:///{old.absolute()}"
    try:
        if not has_study(optuna.storages.get_storage(url), name):
            return
        optuna.copy_study(from_study_name=name, from_storage=url, to_storage=backend)
    except Exception as e:  # an optuna.db another Optuna wrote, a half-written one
        raise ConfigError(
            f"study {name} in {old} could not be moved to {spec} ({first_line(e)}): continue it there "
            f"with hydra.sweeper.storage={url}, or start afresh with another hydra.sweeper.study_name"
        ) from e
    log.info("study %s moved from %s to %s (journal storage); %s is left as it was", name, old, spec, old)


def stored_space(trials: list[FrozenTrial]) -> dict[str, BaseDistribution]:
    """The search space a study was run with: the distributions of its finished trials (those
    it never finished may hold only some, or the ones of a run that was refused)."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    space: dict[str, BaseDistribution] = {}
    for trial in finished or [t for t in trials if t.state != TrialState.RUNNING] or trials:
        space.update(trial.distributions)
    return space


def check_same_study(study: optuna.Study, spec: str, directions: list[str], space: dict[str, Any]) -> None:
    """A stored study continues only with its own direction(s) and search space: else one line
    naming the difference and the way out, before any trial starts."""
    file = local_file(spec)
    delete = f"rm {file}" if file else f"optuna delete-study --study-name {study.study_name} --storage {spec}"
    way_out = (
        f"run it as it was, start another study (hydra.sweeper.study_name=NEW_NAME) or delete this "
        f"one ({delete})"
    )
    stored_directions = [d.name.lower() for d in study.directions]
    if stored_directions != directions:
        raise ConfigError(
            f"study {study.study_name} in {spec} was run to {', '.join(stored_directions)}, but "
            f"hydra.sweeper.direction={', '.join(directions)}: {way_out}"
        )
    difference = space_difference(stored_space(study.trials), space)
    if difference:
        raise ConfigError(f"study {study.study_name} in {spec} {difference}: {way_out}")


def interrupted_trials(study: optuna.Study, space: dict[str, BaseDistribution]) -> list[FrozenTrial]:
    """The trials a dead run left RUNNING: those that never got all their parameters (the run
    stopped before launching them) are marked failed; the others are returned, to run again."""
    launched = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if set(trial.params) == set(space):
            launched.append(trial)
            continue
        log.warning(
            "trial %d was left RUNNING without all its parameters by a run that stopped before "
            "launching it: marked failed",
            trial.number,
        )
        study.tell(trial.number, state=TrialState.FAIL)
    return launched
