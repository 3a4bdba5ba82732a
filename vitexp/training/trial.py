"""The Optuna trial a sweep job reports to (`trial.*`, set for each job by vitexp's Optuna
sweeper): after every evaluation the run reports its monitored metric to the trial, and stops
when the study's pruner says so.

The job reaches the study through its storage alone (a journal file or a database URL), never
through the sweeper's process, so this works whichever launcher ran the job. The pruner is the
one the sweeper stored in the study (`vitexp.studies.PRUNER_ATTR`). Optuna is imported only when a run has a
trial.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from vitexp.errors import first_line
from vitexp.studies import PRUNER_ATTR, open_storage

log = logging.getLogger(__name__)


class TrialReport:
    """Called after each evaluation with the epoch and the monitored value: reports it to the
    trial and returns True when the pruner says the run should stop (the trial is then
    recorded as pruned); never after the last evaluation, when the run is done anyway. A
    storage that fails turns reporting off, with one warning: the run goes on (as for a
    logger)."""

    def __init__(self, storage: str, study: str, number: int) -> None:
        import optuna
        from hydra.utils import instantiate

        self.where = f"trial {number} of study {study}"
        backend = open_storage(storage)
        study_id = backend.get_study_id_from_name(study)
        pruner_cfg = backend.get_study_user_attrs(study_id).get(PRUNER_ATTR)
        pruner = instantiate(pruner_cfg) if pruner_cfg else optuna.pruners.NopPruner()
        self.study = optuna.load_study(study_name=study, storage=backend, pruner=pruner)
        trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, number)
        self.trial = optuna.Trial(self.study, trial_id)
        self.number = number
        state = backend.get_trial(trial_id).state
        self.active = not state.is_finished()
        if not self.active:
            log.warning("%s is %s already: this run does not report to it", self.where, state.name.lower())

    def __call__(self, epoch: int, value: float, last: bool = False) -> bool:
        if not self.active:
            return False
        try:
            self.trial.report(value, epoch)
            if last or not self.trial.should_prune():
                return False
            from optuna.trial import TrialState

            self.study.tell(self.number, state=TrialState.PRUNED)
        except Exception as e:  # a database gone away, a journal file lost: training goes on
            self.active = False
            log.warning(
                "could not report to %s (%s); reporting is off for this run", self.where, first_line(e)
            )
            return False
        log.info("%s pruned after epoch %d: the study's pruner stops this run", self.where, epoch)
        return True


def trial_report(cfg: DictConfig) -> TrialReport | None:
    """The run's trial (`trial.storage`, `trial.study`, `trial.number`), or None when the run
    is not a trial of a study."""
    node = cfg.get("trial")
    if not node or node.get("number") is None:
        return None
    try:
        return TrialReport(str(node.storage), str(node.study), int(node.number))
    except Exception as e:  # the study cannot be reached: the run goes on, unreported
        log.warning(
            "could not open trial %s of study %s in %s (%s); this run does not report to it",
            node.number, node.study, node.storage, first_line(e),
        )  # fmt: skip
        return None
