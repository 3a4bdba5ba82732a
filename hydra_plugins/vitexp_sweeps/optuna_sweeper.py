"""`hydra/sweeper=vitexp_optuna` (alias `optuna_resumable`): vitexp's Optuna sweeper.

Hydra's Optuna sweeper settings and search-space grammar (`params:` with `choice`, `range`,
`interval`, `int(...)`, `tag(log, ...)`; the older `search_space:`; `sampler`, `direction`
incl. several, `n_trials`, `n_jobs`, `study_name`, `storage`, `max_failure_rate`,
`custom_search_space`), on current Optuna, plus:

- `pruner`: any Optuna pruner by `_target_` (`hydra/sweeper/pruner=median`, `successive_halving`,
  `hyperband`). Each job reaches its own trial through the study's storage (its number and the
  storage are in the job's `trial.*` overrides, for apps whose config has a `trial` node, as
  vitexp's does), reports its monitored metric after every evaluation and stops when the
  pruner says so. Nothing passes through the sweeper's process, so it works with any launcher.
- `storage`: by default a journal file in the sweep folder (safe for parallel jobs, also over a
  shared filesystem); an RDB URL (`sqlite:///…`, `postgresql://…`) still works; null keeps the
  study in memory (no pruning then).
- a stored study continues: `n_trials` counts every trial it holds, trials the previous run
  left running are run again, and a different search space or direction is refused.

Hydra imports this module at start-up to find plugins, so it imports only Hydra; Optuna is
imported from the private modules when a sweep starts.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig

# --------------------------------------------------------------------------- configs

# Samplers and pruners are built by the sweeper from these nodes (`_recursive_: false` below):
# a null setting is left out, so Optuna's own default applies.


@dataclass
class SamplerConf:
    _target_: str = MISSING
    seed: int | None = None


@dataclass
class TPESamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.TPESampler"
    consider_prior: bool | None = None
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    n_startup_trials: int | None = None
    n_ei_candidates: int | None = None
    multivariate: bool | None = None
    group: bool | None = None
    constant_liar: bool | None = None
    warn_independent_sampling: bool | None = None


@dataclass
class RandomSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf(SamplerConf):
    # The grid is the search space (hydra.sweeper.params), filled in when the sweep starts.
    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.CmaEsSampler"
    x0: dict[str, Any] | None = None
    sigma0: float | None = None
    n_startup_trials: int | None = None
    warn_independent_sampling: bool | None = None
    consider_pruned_trials: bool | None = None
    restart_strategy: str | None = None
    inc_popsize: int | None = None
    use_separable_cma: bool | None = None
    with_margin: bool | None = None
    lr_adapt: bool | None = None


@dataclass
class NSGAIISamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.NSGAIISampler"
    population_size: int | None = None
    mutation_prob: float | None = None
    crossover_prob: float | None = None
    swapping_prob: float | None = None


@dataclass
class GPSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.GPSampler"
    n_startup_trials: int | None = None
    deterministic_objective: bool | None = None
    warn_independent_sampling: bool | None = None


@dataclass
class QMCSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.QMCSampler"
    qmc_type: str | None = None
    scramble: bool | None = None
    warn_asynchronous_seeding: bool | None = None
    warn_independent_sampling: bool | None = None


@dataclass
class MOTPESamplerConf(SamplerConf):
    # Optuna 4 removed MOTPESampler (TPESampler handles several objectives): refused in one line.
    _target_: str = "optuna.samplers.MOTPESampler"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class VitexpOptunaConf:
    _target_: str = "hydra_plugins.vitexp_sweeps.optuna_sweeper.OptunaSweeper"
    # The sweeper builds the sampler and the pruner itself (and keeps the pruner's config in
    # the study, where the jobs find it).
    _recursive_: bool = False
    # hydra/sweeper/pruner=median (or successive_halving, hyperband): none unless chosen.
    # (_self_ first: a chosen pruner's settings replace `pruner: None`.)
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}])
    sampler: Any = MISSING
    direction: Any = "minimize"  # or maximize, or a list of them (several objectives)
    # A journal file (a path: safe for parallel jobs), an RDB URL, or null (in memory).
    storage: Any = "${hydra.sweep.dir}/optuna.journal"
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 2  # trials launched at once (in parallel where the launcher runs them so)
    max_failure_rate: float = 0.0
    params: dict[str, Any] | None = None
    search_space: dict[str, Any] | None = None  # Hydra's older form of params
    custom_search_space: str | None = None
    pruner: Any = None


store = ConfigStore.instance()
for _name in ("vitexp_optuna", "optuna_resumable"):  # optuna_resumable: the name before Optuna 4
    store.store(group="hydra/sweeper", name=_name, node=VitexpOptunaConf, provider="vitexp")
for _name, _node in {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "grid": GridSamplerConf,
    "cmaes": CmaEsSamplerConf,
    "nsgaii": NSGAIISamplerConf,
    "gp": GPSamplerConf,
    "qmc": QMCSamplerConf,
    "motpe": MOTPESamplerConf,
}.items():
    store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="vitexp")
for _name, _node in {
    "median": MedianPrunerConf,
    "successive_halving": SuccessiveHalvingPrunerConf,
    "hyperband": HyperbandPrunerConf,
}.items():
    store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="vitexp")


# --------------------------------------------------------------------------- the plugin


class OptunaSweeper(Sweeper):
    """Hydra's Optuna sweeper settings (`hydra/sweeper=vitexp_optuna`); see the module."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.sweeper: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from vitexp.cli import exit_on_error
        from vitexp.errors import ConfigError

        with exit_on_error():  # one line and exit 2, rather than Hydra's traceback of the sweeper
            try:
                from hydra_plugins.vitexp_sweeps._optuna_sweep import OptunaSweep
            except ModuleNotFoundError as e:
                if e.name != "optuna":
                    raise
                raise ConfigError(
                    "hydra/sweeper=vitexp_optuna needs optuna: pip install -e '.[sweep]'"
                ) from e

            self.sweeper = OptunaSweep.from_settings(self.settings, config)
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from vitexp.cli import exit_on_error

        with exit_on_error():
            return self.sweeper.sweep(arguments)
