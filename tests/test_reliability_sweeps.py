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
from tests.test_sweeps import RAY_ENV, needs_ray, with_repo
from vitexp.errors import ConfigError
from vitexp.report import read_sweep

# --------------------------------------------------------------------------- local_gpus settings


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
