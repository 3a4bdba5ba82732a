"""The sweep plugins under bad settings and faults: the Ray launcher's settings are checked
before Ray starts, a sweep reaches a Ray cluster by RAY_ADDRESS (as `ray job submit` sets it),
and a stored Optuna study is never continued with another search space or direction, nor left
unusable by a run that failed."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hydra_plugins.vitexp_sweeps.local_gpus import (
    LocalGPUsLauncher,
    check_cluster,
    check_settings,
    cluster_address,
)
from tests.helpers import run_cli
from tests.test_sweeps import RAY_ENV, needs_optuna, needs_ray, with_repo
from vitexp.commands.report import read_sweep
from vitexp.errors import ConfigError

# --------------------------------------------------------------------------- local_gpus settings


@pytest.mark.slow
def test_a_launcher_setting_out_of_its_domain_is_one_line_before_ray_starts():
    """The issue's command: one line, exit 2, and no Ray (it used to start Ray, then fail in 25 lines)."""
    result = run_cli(
        "-m", "hydra/launcher=local_gpus", "hydra.launcher.jobs=0", "experiment=digits", "seed=0,1",
        "hydra.sweep.dir=/nonexistent/never/made", env=RAY_ENV,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.strip()]
    assert error == [
        "error: hydra.launcher.jobs=0 must be a positive integer (jobs at once), or null (one per GPU)"
    ], result.stderr[-3000:]
    assert "Ray" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("jobs", "gpus_per_job", "ray", "says"),
    [
        (-1, 1, {}, r"^hydra.launcher.jobs=-1 must be a positive integer"),
        ("two", 1, {}, r"^hydra.launcher.jobs=two must be a positive integer"),
        (True, 1, {}, r"^hydra.launcher.jobs=True must be a positive integer"),
        (None, -1, {}, r"^hydra.launcher.gpus_per_job=-1 must be an integer of at least 0"),
        (None, 1.5, {}, r"^hydra.launcher.gpus_per_job=1.5 must be an integer of at least 0"),
        (None, 1, {"inti": {}}, r"^unknown key hydra.launcher.ray.inti: hydra.launcher.ray holds init"),
        (None, 1, {"init": 3}, r"^hydra.launcher.ray.init=3 must be a mapping"),
        (
            None,
            1,
            {"init": {"num_gpus": -2}},
            r"^hydra.launcher.ray.init.num_gpus=-2 must be an integer of at",
        ),
        (
            None,
            1,
            {"init": {"address": "10.0.0.1:6379", "num_cpus": 4}},
            r"^hydra.launcher.ray.init.num_cpus=4: ",
        ),
    ],
)
def test_each_launcher_setting_is_checked_against_its_domain(jobs, gpus_per_job, ray, says):
    with pytest.raises(ConfigError, match=says):
        check_settings(jobs, gpus_per_job, ray, {})


def test_settings_that_fit_pass():
    check_settings(None, 1, {"init": {"address": None, "num_gpus": 2}, "remote": {}}, {})
    check_settings(4, 0, {"init": {"address": "10.0.0.1:6379", "num_cpus": None}}, {})


def test_ray_address_is_where_ray_connects_as_ray_reads_it():
    assert cluster_address(None, {}) is None
    assert cluster_address("local", {"RAY_ADDRESS": "h:1"}) is None  # Ray starts a new one then
    assert cluster_address(None, {"RAY_ADDRESS": "h:1"}) == "h:1"
    assert cluster_address("auto", {"RAY_ADDRESS": "h:1"}) == "h:1"
    assert cluster_address("auto", {}) == "auto"
    assert cluster_address("g:2", {"RAY_ADDRESS": "h:1"}) == "g:2"
    with pytest.raises(
        ConfigError,
        match=r"^hydra.launcher.ray.init.num_gpus=2: Ray connects to the cluster at h:1 \(RAY_ADDRESS\)",
    ):
        check_settings(None, 1, {"init": {"num_gpus": 2}}, {"RAY_ADDRESS": "h:1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_answers_is_one_line_not_minutes_of_retries(monkeypatch, capsys):
    """Ray's own client retries for minutes; the launcher's setup says so at once and exits 2."""
    port = free_port()  # closed again: nothing listens there
    with pytest.raises(
        ConfigError, match=rf"^nothing answers at the Ray cluster's address 127.0.0.1:{port} "
    ):
        check_cluster(f"127.0.0.1:{port}", timeout_s=5)
    check_cluster("auto")  # no port: Ray's to find
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    launcher = LocalGPUsLauncher(jobs=None, gpus_per_job=1, ray={"init": {"address": None}})
    with pytest.raises(SystemExit) as exit_:
        launcher.setup(hydra_context=None, task_function=None, config=None)  # type: ignore[arg-type]
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: nothing answers at the Ray cluster's address 127.0.0.1:{port}"
    )


@needs_ray
def test_rays_environment_is_set_before_ray_is_imported():
    """RAY_DEDUP_LOGS is read as Ray is imported: set after, it did nothing."""
    probe = (
        "from hydra_plugins.vitexp_sweeps._ray_jobs import import_ray; import_ray(); "
        "from ray._private import ray_constants; print(ray_constants.RAY_DEDUP_LOGS)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}
    env["PYTHONPATH"] = with_repo()
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- a Ray cluster by address


@pytest.fixture
def ray_head():
    """A one-node Ray cluster started with `ray start --head` on a free port, with token
    authentication (what `ray start` turns on where it finds a token): yields the environment a
    client needs (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN). Stopped by ending the process group
    of the `ray start --block` this fixture started (`ray stop` would end every Ray on the machine)."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        pytest.skip("the ray command is not installed")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="vxray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # The jobs run in the cluster's worker processes, with the environment of its `ray start`.
    env = {**os.environ, **RAY_ENV, **auth, "PYTHONPATH": with_repo(), "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = Path(temp) / "head.log"
    command = [
        ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
        "--include-dashboard=false", "--object-store-memory=100000000", "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]  # fmt: skip
    with log.open("w") as out:
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"ray start did not finish in 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@needs_ray
def test_a_sweep_reaches_a_ray_cluster_started_with_ray_start_by_ray_address(tmp_path, ray_head):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "hydra/launcher=local_gpus", "experiment=digits", "trainer.max_steps=2",
        "trainer.progress=false", "seed=0,1", f"hydra.sweep.dir={sweep}",
        env={**RAY_ENV, **ray_head}, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"joining the Ray cluster at {ray_head['RAY_ADDRESS']}" in log
    assert "Connected to Ray cluster" in log and "Started a local Ray instance" not in log
    jobs = read_sweep(sweep)
    assert sorted(j.name for j in jobs) == ["0", "1"] and all(j.status == "completed" for j in jobs)


# --------------------------------------------------------------------------- Optuna studies


class FakeLauncher:
    """Runs a trial as a job would, in no time: its value is its x (or 0), and the overrides
    of each launch are kept."""

    def __init__(self) -> None:
        self.launched: list[list[str]] = []

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        results = []
        for overrides in job_overrides:
            self.launched.append(list(overrides))
            values = dict(o.split("=", 1) for o in overrides)
            result = JobReturn(overrides=list(overrides))
            result.status = JobStatus.COMPLETED
            result.return_value = float(values.get("x", 0))
            results.append(result)
        return results


SPACE = {"x": "interval(0, 1)", "k": "choice(1, 2, 4)"}


def sweeper(tmp_path, *, space=SPACE, direction="maximize", n_trials=2, storage=None):
    """The plugin as Hydra sets it up, with a launcher that runs no training."""
    from omegaconf import OmegaConf

    from hydra_plugins.vitexp_sweeps._optuna_sweep import OptunaSweep
    from hydra_plugins.vitexp_sweeps.optuna_sweeper import OptunaSweeper

    settings = {
        "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 0}, "direction": direction,
        "study_name": "study", "storage": storage or f"sqlite:///{tmp_path}/optuna.db", "n_trials": n_trials,
        "n_jobs": 1, "max_failure_rate": 0.0, "search_space": None, "custom_search_space": None,
        "params": OmegaConf.create(space), "pruner": None,
    }  # fmt: skip
    plugin = OptunaSweeper(**settings)
    plugin.sweeper = OptunaSweep.from_settings(
        settings, OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "trainer": {"resume": None}})
    )
    plugin.sweeper.launcher = FakeLauncher()
    return plugin


def stored(tmp_path):
    import optuna

    return optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db").trials


def refused(plugin, capsys) -> str:
    """The one line a refused sweep printed (it exits 2)."""
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as exit_:
        plugin.sweep([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@needs_optuna
def test_a_study_rerun_with_another_search_space_or_direction_stops_in_one_line(tmp_path, capsys):
    sweeper(tmp_path).sweep([])
    assert [t.state.name for t in stored(tmp_path)] == ["COMPLETE", "COMPLETE"]
    way_out = (
        "run it as it was, start another study (hydra.sweeper.study_name=NEW_NAME) or delete this one "
        f"(rm {tmp_path}/optuna.db)"
    )
    study = f"error: study study in sqlite:///{tmp_path}/optuna.db"
    # A parameter of another kind (Optuna: "Cannot set different distribution kind"), a range
    # changed, a parameter added, one dropped, the direction flipped.
    assert refused(sweeper(tmp_path, space={**SPACE, "k": "interval(1, 4)"}), capsys) == (
        f"{study} searched k over choice(1, 2, 4), this command over interval(1.0, 4.0): {way_out}"
    )
    assert "searched x over interval(0.0, 1.0), this command over interval(0.0, 0.5)" in refused(
        sweeper(tmp_path, space={**SPACE, "x": "interval(0, 0.5)"}), capsys
    )
    assert "did not search lr, which this command searches over tag(log, interval(0.0001, 0.01))" in refused(
        sweeper(tmp_path, space={**SPACE, "lr": "tag(log, interval(1e-4, 1e-2))"}), capsys
    )
    assert "searched k over choice(1, 2, 4), which this command does not search" in refused(
        sweeper(tmp_path, space={"x": SPACE["x"]}), capsys
    )
    assert refused(sweeper(tmp_path, direction="minimize"), capsys) == (
        f"{study} was run to maximize, but hydra.sweeper.direction=minimize: {way_out}"
    )
    # Nothing was asked of the study: the original command continues it.
    assert [t.state.name for t in stored(tmp_path)] == ["COMPLETE", "COMPLETE"]
    sweeper(tmp_path, n_trials=3).sweep([])
    assert [t.state.name for t in stored(tmp_path)] == ["COMPLETE"] * 3


@needs_optuna
def test_a_trial_a_dead_run_left_running_without_its_parameters_is_failed_on_the_next_start(tmp_path, caplog):
    """What a re-run with a changed parameter kind used to leave (a RUNNING trial with the
    parameters drawn before the changed one, then Optuna's traceback), and a run killed between
    asking for a trial and launching it."""
    import optuna
    from optuna.distributions import FloatDistribution

    sweeper(tmp_path).sweep([])
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db")
    stray = study.ask()
    stray.suggest_float("x", 0, 1)
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):
        stray._suggest("k", FloatDistribution(1, 4))  # as the sweeper draws k=interval(1, 4)
    study.ask()  # and one that got no parameter at all
    plugin = sweeper(tmp_path, n_trials=5)
    with caplog.at_level("INFO"):
        plugin.sweep([])
    assert [t.state.name for t in stored(tmp_path)] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    for number in (2, 3):
        assert f"trial {number} was left RUNNING without all its parameters" in caplog.text
    assert "4 trial(s) stored, 0 of them run again, 1 of n_trials=5 to go" in caplog.text
    assert len(plugin.sweeper.launcher.launched) == 1


@needs_optuna
def test_a_trial_that_was_launched_when_its_run_died_is_run_again(tmp_path):
    import optuna

    sweeper(tmp_path).sweep([])
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.suggest_categorical("k", [1, 2, 4])
    plugin = sweeper(tmp_path, n_trials=3)
    plugin.sweep([])
    assert [t.state.name for t in stored(tmp_path)] == ["COMPLETE"] * 3
    (again,) = plugin.sweeper.launcher.launched
    assert "trainer.resume=auto" in again and f"x={trial.params['x']}" in again


@needs_optuna
def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    error = refused(sweeper(tmp_path, storage="nosuchdb://user@host/db"), capsys)
    assert error.startswith("error: hydra.sweeper.storage=nosuchdb://user@host/db cannot be opened: ")
