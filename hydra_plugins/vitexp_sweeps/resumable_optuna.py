"""`hydra/sweeper=optuna_resumable`: Hydra's Optuna sweeper, continuing its study when re-run.

Hydra's sweeper loads a stored study (`storage`, `study_name`) but then starts over: trial
numbers, and so job folders, restart at 0, and `n_trials` more trials run whatever the study
already holds (hydra#3328). This one counts `n_trials` over the whole study: re-running the
same command runs only the trials still missing, numbered after the stored ones; a trial the
interrupted sweep left running is run again in its own job folder with `trainer.resume=auto`
(continuing from its last checkpoint), and the sampler is reseeded so that it does not draw
again the parameters it drew for the first trials.

A stored study continues only with the direction(s) and search space it was run with: a
re-run that differs stops before any trial starts, in one line naming the difference and the
way out (another `study_name`, or deleting the study). A trial that a run left RUNNING before
it got all its parameters is marked failed, so that a failed run never blocks the study.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ResumableOptunaSweeper(Sweeper):
    """Same settings as Hydra's `OptunaSweeper` (hydra/sweeper=optuna)."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.vitexp_sweeps._resumable_optuna import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from vitexp.cli import exit_on_error

        with exit_on_error():  # one line and exit 2, rather than Hydra's traceback of the sweeper
            return self.sweeper.sweep(arguments)
