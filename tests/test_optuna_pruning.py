"""Pruning across jobs and journal studies: each job reports its monitored metric to its own
trial through the study's storage and stops when the study's pruner says so (checkpoint and
summary written, the trial PRUNED in the study, the sweep table and the report); the default
storage is a journal file that parallel jobs write together; a study kept in SQLite by the
earlier sweeper continues in the journal."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import run_cli
from tests.test_reliability_sweeps import SPACE, FakeLauncher, refused, sweeper
from tests.test_sweeps import RAY_ENV, TINY, needs_ray, overlap, span, with_repo
from vitexp.commands.report import read_sweep
from vitexp.errors import ConfigError

optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[sweep]')")

from optuna.trial import TrialState  # noqa: E402

from vitexp.studies import PRUNER_ATTR, open_storage  # noqa: E402
from vitexp.training.trial import TrialReport  # noqa: E402

MEDIAN = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1, "n_warmup_steps": 0}
# Prunes every trial after its second evaluation (from epoch n_warmup_steps on; an accuracy
# never reaches 2): the same outcome whatever the trials learn.
ALWAYS_AFTER_2 = "{_target_:optuna.pruners.ThresholdPruner,lower:2.0,n_warmup_steps:2}"


def journal_study(path: Path, pruner: dict | None = MEDIAN) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)), direction="maximize")
    study.set_user_attr(PRUNER_ATTR, pruner)
    return study


# --------------------------------------------------------------------------- the job's side


def test_a_job_reports_to_its_trial_and_stops_when_the_studys_pruner_says_so(tmp_path):
    journal = tmp_path / "optuna.journal"
    study = journal_study(journal)
    first = study.ask()
    for epoch, value in enumerate([0.5, 0.6, 0.7], 1):
        first.report(value, epoch)
    study.tell(first, 0.7)
    good, bad = study.ask().number, study.ask().number
    report = TrialReport(str(journal), "s", good)  # what a job builds from its trial.* overrides
    assert report(1, 0.9) is False and report(2, 0.95) is False  # above trial 0's values
    report = TrialReport(str(journal), "s", bad)
    assert report(1, 0.1, last=True) is False  # the run is over: reported, never pruned
    assert report(2, 0.1) is True  # below trial 0's 0.6 at epoch 2
    trials = optuna.load_study(study_name="s", storage=open_storage(str(journal))).trials
    assert trials[good].state == TrialState.RUNNING
    assert trials[bad].state == TrialState.PRUNED and trials[bad].intermediate_values == {1: 0.1, 2: 0.1}
    assert report(3, 0.1) is False  # nothing more is asked of a finished trial


def test_a_job_whose_trial_is_finished_or_whose_study_is_gone_trains_on(tmp_path, caplog):
    from vitexp.training.trial import trial_report

    journal = tmp_path / "optuna.journal"
    study = journal_study(journal)
    done = study.ask()
    study.tell(done, 0.5)
    with caplog.at_level("WARNING"):
        report = trial_report(
            OmegaConf.create({"trial": {"storage": str(journal), "study": "s", "number": 0}})
        )
        assert report is not None and report(1, 0.0) is False
        gone = {"storage": str(journal), "study": "no_such_study", "number": 0}
        assert trial_report(OmegaConf.create({"trial": gone})) is None
    assert "trial 0 of study s is complete already" in caplog.text
    assert "could not open trial 0 of study no_such_study" in caplog.text
    assert trial_report(OmegaConf.create({"trial": {"storage": None, "study": None, "number": None}})) is None


WRITER = """
import sys
from vitexp.training.trial import TrialReport
report = TrialReport(sys.argv[1], "s", int(sys.argv[2]))
for step in range(1, 41):
    assert report(step, 0.5) is False
"""


@pytest.mark.sweep
def test_two_parallel_jobs_write_one_journal_study_without_errors(tmp_path):
    journal = tmp_path / "optuna.journal"
    study = journal_study(journal, pruner=None)
    numbers = [study.ask().number, study.ask().number]
    env = {"PYTHONPATH": with_repo(), "PATH": "/usr/bin:/bin"}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(journal), str(n)], env=env, stderr=subprocess.PIPE
        )
        for n in numbers
    ]
    errors = [job.communicate(timeout=300)[1].decode() for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], errors
    trials = optuna.load_study(study_name="s", storage=open_storage(str(journal))).trials
    assert [sorted(t.intermediate_values) for t in trials] == [list(range(1, 41))] * 2


# --------------------------------------------------------------------------- the sweeper's side


def test_the_pruner_is_kept_in_the_study_and_refused_where_jobs_cannot_report(tmp_path, capsys):
    from hydra_plugins.vitexp_sweeps._optuna_sweep import OptunaSweep

    trial_node = {"trial": {"storage": None, "study": None, "number": None}}
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, **trial_node})
    settings = {
        "sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 0}, "direction": "maximize",
        "study_name": "s", "storage": str(tmp_path / "optuna.journal"), "n_trials": 2, "n_jobs": 2,
        "max_failure_rate": 0.0, "search_space": None, "custom_search_space": None,
        "params": {"x": "interval(0, 1)"}, "pruner": MEDIAN,
    }  # fmt: skip
    sweep = OptunaSweep.from_settings(settings, config)
    sweep.launcher = FakeLauncher()
    sweep.sweep([])
    study = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / "optuna.journal")))
    assert study.user_attrs[PRUNER_ATTR] == MEDIAN and len(study.trials) == 2
    # Each job was told where its trial is.
    for number, overrides in enumerate(sweep.launcher.launched):
        assert overrides[-3:] == [
            f"trial.storage='{tmp_path / 'optuna.journal'}'",
            "trial.study='s'",
            f"trial.number={number}",
        ]
    for change, says in [
        ({"storage": None}, "hydra.sweeper.pruner is set but the study is kept in memory"),
        ({"direction": ["maximize", "minimize"]}, "Optuna prunes single-objective studies only"),
        ({"pruner": {**MEDIAN, "n_warmup_step": 1}}, "hydra.sweeper.pruner.n_warmup_step is not an argument"),
        (
            {"pruner": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "reduction_factor": 1}},
            "hydra.sweeper.pruner (optuna.pruners.SuccessiveHalvingPruner) cannot be built",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            OptunaSweep.from_settings({**settings, **change}, config)
    with pytest.raises(ConfigError, match="this app's config has no trial node"):
        OptunaSweep.from_settings(settings, OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))


def test_a_job_that_returns_nan_or_raises_leaves_its_trial_failed(tmp_path):
    class Failing(FakeLauncher):
        def launch(self, job_overrides, initial_job_idx):
            from hydra.core.utils import JobStatus

            results = super().launch(job_overrides, initial_job_idx)
            results[0].return_value = math.nan  # vitexp's job that failed (error.txt)
            results[1].status, results[1].return_value = JobStatus.FAILED, RuntimeError("died")
            return results

    plugin = sweeper(tmp_path, n_trials=2)
    plugin.sweeper.n_jobs, plugin.sweeper.max_failure_rate = 2, 1.0
    plugin.sweeper.launcher = Failing()
    plugin.sweep([])
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]


@pytest.mark.sweep
def test_a_study_the_sqlite_sweeper_kept_continues_in_the_journal(tmp_path, caplog, capsys):
    """The sweep folder of a search run before journal files were the default: optuna.db."""
    sweeper(tmp_path, n_trials=2).sweep([])  # into sqlite:///…/optuna.db, as the presets did
    journal = tmp_path / "optuna.journal"
    plugin = sweeper(tmp_path, n_trials=3, storage=str(journal))
    with caplog.at_level("INFO"):
        plugin.sweep([])
    assert f"study study moved from {tmp_path}/optuna.db to {journal}" in caplog.text
    assert "2 trial(s) stored, 0 of them run again, 1 of n_trials=3 to go" in caplog.text
    trials = optuna.load_study(study_name="study", storage=open_storage(str(journal))).trials
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in trials)
    assert len(plugin.sweeper.launcher.launched) == 1
    # The journal is the study now; a changed space is still refused.
    assert "searched x over interval(0.0, 1.0), this command over interval(0.0, 0.5)" in refused(
        sweeper(tmp_path, space={**SPACE, "x": "interval(0, 0.5)"}, storage=str(journal)), capsys
    )


# --------------------------------------------------------------------------- whole searches


def check_pruned_search(sweep: Path, n_trials: int) -> None:
    study = optuna.load_study(study_name="digits_optuna", storage=open_storage(str(sweep / "optuna.journal")))
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * n_trials
    assert all(t.intermediate_values.keys() == {1, 2} for t in study.trials)
    jobs = read_sweep(sweep)
    assert sorted(j.name for j in jobs) == [str(i) for i in range(n_trials)]
    assert all(j.status == "pruned" and "trial." not in j.overrides for j in jobs)
    for t in study.trials:
        job = sweep / str(t.number)
        summary = json.loads((job / "summary.json").read_text())
        assert summary["stopped_by"] == "pruned" and summary["epochs"] == 2
        assert (job / "last.pt").is_file()
        epochs = [json.loads(line)["epoch"] for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert max(epochs) == 2
    assert "| pruned |" in (sweep / "report.md").read_text()
    assert (sweep / "report_study.png").is_file()


SEARCH = [
    *TINY,
    "hparams_search=digits_optuna",
    "trainer.max_epochs=3",
    f"hydra.sweeper.pruner={ALWAYS_AFTER_2}",
]


@pytest.mark.sweep
def test_a_pruned_search_through_the_basic_launcher(tmp_path):
    sweep = tmp_path / "study"
    result = run_cli(*SEARCH, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "trial 1 of study digits_optuna pruned after epoch 2" in log
    assert "study digits_optuna: 2 pruned" in log
    check_pruned_search(sweep, 2)


@pytest.mark.sweep
@needs_ray
def test_a_pruned_search_through_local_gpus_two_jobs_at_once(tmp_path):
    sweep = tmp_path / "study"
    result = run_cli(
        *SEARCH, "hydra/launcher=local_gpus", "hydra.launcher.jobs=2", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", env=RAY_ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    check_pruned_search(sweep, 2)
    assert overlap(span(sweep / "0"), span(sweep / "1"))  # both wrote the journal at once


@pytest.mark.sweep
def test_a_pruned_run_is_tagged_pruned_in_wandb(tmp_path):
    from types import SimpleNamespace

    from vitexp.training.loggers import JsonlLogger, Loggers, WandbLogger

    wandb = object.__new__(WandbLogger)  # its W&B run: an object with tags, as wandb's Run
    wandb._failed, wandb.run = False, SimpleNamespace(tags=("sweep",))
    loggers = Loggers([JsonlLogger(tmp_path / "metrics.jsonl")])  # a logger without tags
    loggers.add("wandb", wandb)
    loggers.tag("pruned")
    assert wandb.run.tags == ("sweep", "pruned")
