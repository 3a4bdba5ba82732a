"""The sweep behind `OptunaSweeper` (imports Optuna, so not at plugin scan): draw a batch of
trials, launch them as jobs, record what they return; continue a stored study."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.vitexp_sweeps._optuna_space import (
    distribution_from_config,
    grid_choices,
    params_from_overrides,
)
from hydra_plugins.vitexp_sweeps._optuna_study import (
    check_same_study,
    has_study,
    interrupted_trials,
    move_sqlite_study,
    open_backend,
    storage_spec,
)
from vitexp.config import check_target_arguments
from vitexp.errors import ConfigError, first_line
from vitexp.studies import PRUNER_ATTR

log = logging.getLogger(__name__)

# Added to a trial that is run again in its own job folder (for apps with trainer.resume, as
# vitexp's): it continues from its checkpoint.
RESUME = "trainer.resume=auto"


def plain(node: Any) -> Any:
    """A config node as plain containers, its null settings left out (Optuna's defaults)."""
    if isinstance(node, DictConfig | Mapping):
        container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        assert isinstance(container, dict)
        return {k: v for k, v in container.items() if v is not None}
    return node


def build(what: str, node: dict[str, Any], **kwargs: Any) -> Any:
    """A sampler or pruner from its `_target_` node, in one line when it cannot be built."""
    target = str(node.get("_target_"))
    if target.endswith(".MOTPESampler"):
        raise ConfigError(
            f"{what}: the 'motpe' sampler was removed in Optuna 4.0; use hydra/sweeper/sampler=tpe, "
            "whose TPESampler handles several objectives"
        )
    check_target_arguments(what, node)
    try:
        return instantiate({**node, **kwargs})
    except Exception as e:  # Optuna refusing a value (reduction_factor=1, a seed of the wrong type)
        raise ConfigError(f"{what} ({target}) cannot be built: {first_line(e.__cause__ or e)}") from e


def directions_of(direction: Any) -> list[str]:
    listed = (
        list(direction) if isinstance(direction, Sequence) and not isinstance(direction, str) else [direction]
    )
    names = [str(getattr(d, "name", d)).lower() for d in listed]
    if not names or any(n not in ("minimize", "maximize") for n in names):
        raise ConfigError(
            f"hydra.sweeper.direction={direction} must be minimize, maximize, or a list of them "
            "(several objectives)"
        )
    return names


@dataclass
class OptunaSweep:
    sampler: dict[str, Any]
    directions: list[str]
    storage: str | None
    study_name: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    params: dict[str, Any] | None
    search_space: dict[str, Any] | None
    extend: Callable[[DictConfig, optuna.Trial], None] | None
    pruner: dict[str, Any] | None
    config: Any = field(default=None, repr=False)  # the sweep's composed config (DictConfig)
    launcher: Any = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any], config: DictConfig) -> OptunaSweep:
        """The sweeper's settings, each checked (one line for the first that is wrong)."""
        s = settings
        for key, low in (("n_trials", 0), ("n_jobs", 1)):
            if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < low:
                raise ConfigError(f"hydra.sweeper.{key}={s[key]} must be an integer of at least {low}")
        if not 0.0 <= float(s["max_failure_rate"]) <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={s['max_failure_rate']} must be within [0, 1]")
        custom = s.get("custom_search_space")
        sweep = cls(
            sampler=plain(s["sampler"]),
            directions=directions_of(s["direction"]),
            storage=storage_spec(s.get("storage")),
            study_name=s.get("study_name"),
            n_trials=s["n_trials"],
            n_jobs=s["n_jobs"],
            max_failure_rate=float(s["max_failure_rate"]),
            params=plain(s.get("params")),
            search_space=plain(s.get("search_space")),
            extend=get_method(custom) if custom else None,
            pruner=plain(s.get("pruner")) or None,
            config=config,
        )
        sweep.check_pruner()
        return sweep

    @property
    def reports(self) -> bool:
        """Whether each job reports to its trial: the app takes a `trial` node (vitexp's
        config does), the jobs can reach the study, and it has one objective (Optuna prunes
        only those)."""
        node = OmegaConf.select(self.config, "trial", default=None)
        takes = isinstance(node, DictConfig) and {"storage", "study", "number"} <= set(node.keys())
        return takes and self.storage is not None and len(self.directions) == 1

    def check_pruner(self) -> None:
        if self.pruner is None:
            return
        build("hydra.sweeper.pruner", self.pruner)
        if not self.reports:
            why = (
                "the study is kept in memory (hydra.sweeper.storage=null), where jobs cannot reach it"
                if self.storage is None
                else "Optuna prunes single-objective studies only"
                if len(self.directions) > 1
                else "this app's config has no trial node (trial.storage, trial.study, trial.number) "
                "to receive its trial"
            )
            raise ConfigError(f"hydra.sweeper.pruner is set but {why}")

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # ------------------------------------------------------------------- the space

    def space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str], list[str]]:
        """The distributions drawn from, the fixed parameters, the overrides passed as they are."""
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        drawn, fixed, passed = params_from_overrides(params + arguments)
        if self.search_space is not None:
            if self.params is not None:
                warnings.warn(
                    "both hydra.sweeper.params and hydra.sweeper.search_space are set: params is used",
                    stacklevel=1,
                )
            else:
                warnings.warn(
                    "hydra.sweeper.search_space is Hydra's older form of the search space: prefer "
                    "hydra.sweeper.params (https://hydra.cc/docs/upgrades/1.1_to_1.2/changes_to_sweeper_config/)",
                    stacklevel=1,
                )
                old = {str(k): distribution_from_config(str(k), v) for k, v in self.search_space.items()}
                drawn = {**old, **drawn}
        return {k: d for k, d in drawn.items() if k not in fixed}, fixed, passed

    def make_sampler(self, space: dict[str, BaseDistribution]) -> optuna.samplers.BaseSampler:
        if str(self.sampler.get("_target_")).endswith("GridSampler"):
            grid = {name: grid_choices(name, d) for name, d in space.items()}
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info(
                "a grid of %d points: n_trials=%d", math.prod(len(v) for v in grid.values()), self.n_trials
            )
            return build("hydra.sweeper.sampler", self.sampler, search_space=grid)
        return build("hydra.sweeper.sampler", self.sampler)

    # ------------------------------------------------------------------- the sweep

    def open_study(
        self, space: dict[str, BaseDistribution], sampler: Any
    ) -> tuple[optuna.Study, list[FrozenTrial]]:
        """The study (created, or continued as it was run); the trials to run again."""
        backend: Any = None if self.storage is None else open_backend(self.storage)
        interrupted: list[FrozenTrial] = []
        if backend is not None and self.study_name is not None:
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            if not has_study(backend, self.study_name):
                move_sqlite_study(backend, self.storage or "", self.study_name, sweep_dir)
            if has_study(backend, self.study_name):
                stored = optuna.load_study(study_name=self.study_name, storage=backend)
                check_same_study(stored, self.storage or "", self.directions, space)
                interrupted = interrupted_trials(stored, space)
                if hasattr(
                    sampler, "reseed_rng"
                ):  # else a seeded sampler draws the first trials' values again
                    sampler.reseed_rng()
        pruner = build("hydra.sweeper.pruner", self.pruner) if self.pruner else None
        study = optuna.create_study(
            study_name=self.study_name, storage=backend, sampler=sampler, pruner=pruner,
            directions=[StudyDirection[d.upper()] for d in self.directions], load_if_exists=True,
        )  # fmt: skip
        if study.user_attrs.get(PRUNER_ATTR) != self.pruner:
            study.set_user_attr(PRUNER_ATTR, self.pruner)  # where the jobs find it
        return study, interrupted

    def sweep(self, arguments: list[str]) -> None:
        space, fixed, passed = self.space(arguments)
        sampler = self.make_sampler(space)
        study, interrupted = self.open_study(space, sampler)
        log.info(
            "study %s | storage %s | sampler %s | pruner %s | direction %s",
            study.study_name, self.storage or "in memory", type(sampler).__name__,
            (self.pruner or {}).get("_target_", "none"), ", ".join(self.directions),
        )  # fmt: skip
        stored = len(study.trials)
        if stored:
            log.info(
                "study %s continues: %d trial(s) stored, %d of them run again, %d of n_trials=%d to go",
                study.study_name, stored, len(interrupted), max(0, self.n_trials - stored), self.n_trials,
            )  # fmt: skip
        for trial in interrupted:
            overrides = self.overrides(study, trial.number, trial.params, fixed, passed)
            trainer = OmegaConf.select(self.config, "trainer", default=None)
            if isinstance(trainer, DictConfig) and "resume" in trainer:
                overrides.append(RESUME)
            log.info("trial %d was interrupted: running it again (%s)", trial.number, " ".join(overrides))
            self.launch_and_record(study, [trial.number], [overrides])
        to_go = max(0, self.n_trials - stored)
        while to_go > 0:
            batch = [study.ask(space) for _ in range(min(self.n_jobs, to_go))]
            configured = [self.configure(study, trial, fixed, passed) for trial in batch]
            self.launch_and_record(study, [t.number for t in batch], configured)
            to_go -= len(batch)
        self.write_results(study)

    def configure(
        self, study: optuna.Study, trial: optuna.Trial, fixed: dict[str, str], passed: list[str]
    ) -> list[str]:
        for name, value in fixed.items():
            trial.set_user_attr(name, value)
        if self.extend is not None:
            self.extend(self.config, trial)
        overlap = trial.params.keys() & fixed.keys()
        if overlap:
            raise ConfigError(f"hydra.sweeper.params: {sorted(overlap)} are both drawn and fixed")
        return self.overrides(study, trial.number, trial.params, fixed, passed)

    def overrides(
        self,
        study: optuna.Study,
        number: int,
        params: dict[str, Any],
        fixed: dict[str, str],
        passed: list[str],
    ) -> list[str]:
        """A trial's job overrides: its parameters, the fixed ones, and where it reports."""
        overrides = [f"{k}={v}" for k, v in {**params, **fixed}.items()] + passed
        if self.reports:
            quoted = str(self.storage).replace("\\", "\\\\").replace("'", "\\'")
            overrides += [
                f"trial.storage='{quoted}'",
                f"trial.study='{study.study_name}'",
                f"trial.number={number}",
            ]
        return overrides

    def launch_and_record(self, study: optuna.Study, numbers: list[int], overrides: list[list[str]]) -> None:
        """Launch one job per trial (job number = trial number, so its folder is named by it)
        and record what each returned; a trial its job already finished (pruned) is left."""
        returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        failures = []
        for number, ret in zip(numbers, returns, strict=True):
            if states[number].is_finished():
                log.info("trial %d was %s by its job", number, states[number].name.lower())
                continue
            try:
                values = self.values(ret)
            except Exception as e:  # the job raised, or returned something that is not a value
                study.tell(number, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", number, first_line(e))
                failures.append(e)
                continue
            try:
                study.tell(number, values=values)
            except RuntimeError as e:  # a grid search that has run its whole grid stops the study
                if "Study.stop" not in str(e):
                    raise
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            log.error(
                "%d of %d trials failed, over hydra.sweeper.max_failure_rate=%s",
                len(failures), len(returns), self.max_failure_rate,
            )  # fmt: skip
            for ret in returns:
                _ = ret.return_value  # raises the job's own exception, with its traceback

    def values(self, ret: JobReturn) -> list[float]:
        returned = ret.return_value
        if len(self.directions) == 1:
            return [float(returned)]
        values = [float(v) for v in returned]
        if len(values) != len(self.directions):
            raise ValueError(f"{len(values)} values returned for {len(self.directions)} objectives")
        return values

    def write_results(self, study: optuna.Study) -> None:
        """optimization_results.yaml in the sweep folder: the best trial (or the Pareto front)."""
        counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState}
        log.info("study %s: %s", study.study_name, ", ".join(f"{n} {k}" for k, n in counts.items() if n))
        results: dict[str, Any] = {"name": "optuna"}
        # The lines Hydra's Optuna sweeper logs, which scripts may look for.
        if len(self.directions) > 1:
            results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
            log.info("Number of Pareto solutions: %d", len(study.best_trials))
        elif counts["complete"]:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value)
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s (trial %d)", best.value, best.number)
        OmegaConf.save(
            OmegaConf.create(results), Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml"
        )
