"""The implementation behind `ResumableOptunaSweeper` (imports Optuna, so not at plugin scan)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from vitexp.errors import ConfigError

log = logging.getLogger(__name__)

# Added to a trial that is run again in its own job folder: it continues from its checkpoint.
RESUME = "trainer.resume=auto"


def sqlite_file(storage: Any) -> Path | None:
    """The database file of a `sqlite:///PATH` storage URL (PATH relative or absolute)."""
    prefix = "sqlite:///"
    if isinstance(storage, str) and storage.startswith(prefix) and storage != prefix + ":memory:":
        return Path(storage[len(prefix) :])
    return None


def open_study(storage: Any, study_name: str | None) -> optuna.Study | None:
    """Study `study_name` in `storage`; None when either is unset or the study does not exist
    yet. A storage that cannot be opened is one line (before any trial or engine starts)."""
    if storage is None or study_name is None:
        return None
    try:
        summaries = optuna.get_all_study_summaries(storage=storage)
    except Exception as e:  # a URL SQLAlchemy cannot use, a database it cannot reach or read
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"hydra.sweeper.storage={storage} cannot be opened: {detail}") from e
    if study_name not in {s.study_name for s in summaries}:
        return None
    return optuna.load_study(study_name=study_name, storage=storage)


def describe(distribution: BaseDistribution) -> str:
    """A distribution as Hydra's sweeper grammar writes it (`tag(log, interval(1e-4, 1e-2))`)."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice({', '.join(map(str, distribution.choices))})"
    bounds = getattr(distribution, "low", "?"), getattr(distribution, "high", "?")
    step = getattr(distribution, "step", None) or getattr(distribution, "q", None)
    text = f"range({bounds[0]}, {bounds[1]}, step={step})" if step not in (None, 1) else f"interval{bounds}"
    return f"tag(log, {text})" if "Log" in type(distribution).__name__ else text


def stored_space(trials: list[FrozenTrial]) -> dict[str, BaseDistribution]:
    """The search space a study was run with: the distributions of its finished trials (those
    it never finished may hold only some, or the ones of a run that was refused)."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    space: dict[str, BaseDistribution] = {}
    for trial in finished or [t for t in trials if t.state != TrialState.RUNNING] or trials:
        space.update(trial.distributions)
    return space


def space_difference(stored: dict[str, BaseDistribution], new: dict[str, BaseDistribution]) -> str | None:
    """The first difference between the stored search space and this command's, in words."""
    for name in sorted(stored.keys() | new.keys()):
        if name not in new:
            return f"searched {name} over {describe(stored[name])}, which this command does not search"
        if name not in stored:
            return f"did not search {name}, which this command searches over {describe(new[name])}"
        if stored[name] != new[name]:
            return f"searched {name} over {describe(stored[name])}, this command over {describe(new[name])}"
    return None


def check_same_study(study: optuna.Study, storage: Any, directions: list[str], space: dict[str, Any]) -> None:
    """A stored study continues only with its own direction(s) and search space: else one line
    naming the difference and the way out, before any trial starts."""
    database = sqlite_file(storage)
    delete = (
        f"rm {database}"
        if database is not None
        else f"optuna delete-study --study-name {study.study_name} --storage {storage}"
    )
    way_out = (
        f"run it as it was, start another study (hydra.sweeper.study_name=NEW_NAME) or delete this "
        f"one ({delete})"
    )
    stored_directions = [d.name.lower() for d in study.directions]
    if stored_directions != [str(d).lower() for d in directions]:
        raise ConfigError(
            f"study {study.study_name} in {storage} was run to {', '.join(stored_directions)}, but "
            f"hydra.sweeper.direction={', '.join(map(str, directions))}: {way_out}"
        )
    difference = space_difference(stored_space(study.trials), space)
    if difference:
        raise ConfigError(f"study {study.study_name} in {storage} {difference}: {way_out}")


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def drawn_space(self, arguments: list[str]) -> dict[str, BaseDistribution]:
        """The distributions this command's sweep draws from, as Hydra's sweeper builds them."""
        self._process_searchspace_config()
        try:
            drawn, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        except Exception as e:  # Hydra's override grammar, or a sweep Optuna cannot draw from
            raise ConfigError(f"hydra.sweeper.params: {str(e).splitlines()[0]}") from e
        space = {**(self.search_space_distributions or {}), **drawn}
        return {name: d for name, d in space.items() if name not in fixed}

    def sweep(self, arguments: list[str]) -> None:
        database = sqlite_file(self.storage)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)  # the sweep dir, before any job
        study = open_study(self.storage, self.study_name)
        if study is not None:
            space = self.drawn_space(arguments)
            check_same_study(study, self.storage, self._get_directions(), space)
            trials = study.trials
            interrupted = self._fail_unlaunched(
                study, [t for t in trials if t.state == TrialState.RUNNING], space
            )
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

    @staticmethod
    def _fail_unlaunched(
        study: optuna.Study, running: list[FrozenTrial], space: dict[str, BaseDistribution]
    ) -> list[FrozenTrial]:
        """Of the trials a dead run left RUNNING, those that never got all their parameters
        (the run stopped before launching them) are marked failed; the others are returned, to
        run again."""
        launched = []
        for trial in running:
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
