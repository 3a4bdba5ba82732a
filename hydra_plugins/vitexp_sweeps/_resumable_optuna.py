"""The implementation behind `ResumableOptunaSweeper` (imports Optuna, so not at plugin scan)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

# Added to a trial that is run again in its own job folder: it continues from its checkpoint.
RESUME = "trainer.resume=auto"


def sqlite_file(storage: Any) -> Path | None:
    """The database file of a `sqlite:///PATH` storage URL (PATH relative or absolute)."""
    prefix = "sqlite:///"
    if isinstance(storage, str) and storage.startswith(prefix) and storage != prefix + ":memory:":
        return Path(storage[len(prefix) :])
    return None


def stored_trials(storage: Any, study_name: str | None) -> list[FrozenTrial]:
    """The trials of study `study_name` in `storage` (none when either is unset or the study
    does not exist yet)."""
    if storage is None or study_name is None:
        return []
    summaries = optuna.get_all_study_summaries(storage=storage)
    if study_name not in {s.study_name for s in summaries}:
        return []
    return list(optuna.load_study(study_name=study_name, storage=storage).trials)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        database = sqlite_file(self.storage)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)  # the sweep dir, before any job
        trials = stored_trials(self.storage, self.study_name)
        if trials:
            interrupted = [t for t in trials if t.state == TrialState.RUNNING]
            self._rerun(interrupted)
            log.info(
                "study %s continues: %d trial(s) stored, %d of them run again, %d of n_trials=%d to go",
                self.study_name,
                len(trials),
                len(interrupted),
                max(0, self.n_trials - len(trials)),
                self.n_trials,
            )
            self.n_trials = max(0, self.n_trials - len(trials))
            self.job_idx = len(trials)
            if hasattr(self.sampler, "reseed_rng"):  # not the grid sampler, which has no draws
                self.sampler.reseed_rng()  # else a seeded sampler draws the first trials' values again
        super().sweep(arguments)

    def _rerun(self, interrupted: list[FrozenTrial]) -> None:
        """Launch the trials the interrupted sweep left unfinished, each as its own job number
        (so into its own job folder), and record their values in the study."""
        if not interrupted:
            return
        assert self.storage is not None and self.launcher is not None
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        for trial in interrupted:
            overrides = [f"{k}={v}" for k, v in {**trial.params, **trial.user_attrs}.items()] + [RESUME]
            log.info("trial %d was interrupted: running it again (%s)", trial.number, " ".join(overrides))
            (result,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            try:
                study.tell(trial.number, result.return_value)
            except ValueError:  # NaN (the job failed) or not a number: as Hydra's sweeper does
                study.tell(trial.number, state=TrialState.FAIL)
