"""Sweeps at scale: parallel jobs through the Ray launcher (hydra/launcher=local_gpus), Optuna
studies that resume, and the command a W&B Sweeps agent runs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, TINY_MODEL, run_cli
from vitexp.commands.report import read_sweep

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e '.[ray]')"
)
needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None, reason="optuna is not installed (pip install -e '.[sweep]')"
)
# Ray's own chatter off; a local Ray needs no network.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
TINY = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false"]


def with_repo() -> str:
    """PYTHONPATH for a process started outside the repository that must import its vitexp."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def span(job_dir: Path) -> tuple[float, float]:
    """When a job ran: Hydra writes .hydra/ as it starts, vitexp summary.json as it ends."""
    return (job_dir / ".hydra" / "overrides.yaml").stat().st_mtime, (job_dir / "summary.json").stat().st_mtime


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# --------------------------------------------------------------------------- local_gpus (Ray)


@pytest.mark.sweep
@needs_ray
def test_local_gpus_runs_two_cpu_jobs_at_once_and_reports_the_sweep(tmp_path):
    """The issue's command on a 2-core machine: 4 jobs, 2 at a time, 1 torch thread each."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "hydra/launcher=local_gpus",
        "hydra.launcher.jobs=2",
        "experiment=digits",
        "trainer.max_epochs=3",
        "trainer.progress=false",
        "seed=0,1,2,3",
        f"hydra.sweep.dir={sweep}",
        env=RAY_ENV,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 jobs, 2 at once, each with 0 GPU(s) and 1 torch thread(s)" in result.stdout + result.stderr
    jobs = read_sweep(sweep)
    assert sorted(j.name for j in jobs) == ["0", "1", "2", "3"] and all(j.status == "completed" for j in jobs)
    assert len({j.objective for j in jobs}) > 1  # four seeds, four runs
    spans = [span(sweep / str(i)) for i in range(4)]
    # Jobs 0 and 1 share the machine, then 2 and 3; never three at once.
    assert overlap(spans[0], spans[1]) and overlap(spans[2], spans[3])
    for t in sorted(s[0] + 1e-3 for s in spans):
        assert sum(s[0] <= t < s[1] for s in spans) <= 2
    assert "sweep " in result.stdout and (sweep / "report.md").is_file()
    assert result.stdout.count("1 torch thread(s)") + result.stderr.count("1 torch thread(s)") >= 4


APP = """
import json, os, signal, sys, time
import hydra, torch
from hydra.core.hydra_config import HydraConfig
from vitexp.config import conf_dir, register_experiments, register_resolvers

register_experiments()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def app(cfg):
    out = HydraConfig.get().runtime.output_dir
    record = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "threads": torch.get_num_threads(), "start": time.time()}
    time.sleep(2)
    if cfg.seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies: no Python error handler runs
    record["end"] = time.time()
    with open(os.path.join(out, "placement.json"), "w") as f:
        json.dump(record, f)
    return float(cfg.seed)


if __name__ == "__main__":
    app()
"""


@pytest.mark.sweep
@needs_ray
def test_local_gpus_gives_each_job_its_gpu_and_a_dead_job_fails_alone(tmp_path):
    """Ray told of 2 GPUs (a CPU machine: CUDA is never started) runs 2 jobs at once and sets
    CUDA_VISIBLE_DEVICES in each job's process to a GPU of its own; a job whose process is
    killed gets its error.txt, the others finish, and the sweep exits 1."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    sweep = tmp_path / "sweep"
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": with_repo(), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [
            sys.executable,
            str(app),
            "-m",
            "hydra/launcher=local_gpus",
            "hydra.launcher.ray.init.num_gpus=2",
            "seed=0,1,2,3",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    error = (sweep / "1" / "error.txt").read_text()
    assert error.startswith("error: the job's process died (WorkerCrashedError") and error.count("\n") == 1
    assert "error: 1 of 4 jobs failed (1)" in result.stderr
    placed = {i: json.loads((sweep / str(i) / "placement.json").read_text()) for i in (0, 2, 3)}
    assert {p["CUDA_VISIBLE_DEVICES"] for p in placed.values()} <= {"0", "1"}
    assert all(p["threads"] == 1 for p in placed.values())  # 2 cores shared by 2 jobs
    # Whenever two jobs ran at once they had different GPUs.
    for i, a in placed.items():
        for j, b in placed.items():
            if i < j and overlap((a["start"], a["end"]), (b["start"], b["end"])):
                assert a["CUDA_VISIBLE_DEVICES"] != b["CUDA_VISIBLE_DEVICES"]
    assert any(
        overlap((a["start"], a["end"]), (b["start"], b["end"]))
        for i, a in placed.items()
        for j, b in placed.items()
        if i < j
    )


@pytest.mark.sweep
@needs_ray
def test_a_job_that_fails_in_python_is_reported_as_with_the_basic_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "hydra/launcher=local_gpus", "hydra.launcher.jobs=2", *TINY, "trainer.max_steps=2",
        "optimizer.lr=1e-3,-1", f"hydra.sweep.dir={sweep}", env=RAY_ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:]
    assert (sweep / "0" / "summary.json").is_file()
    assert (sweep / "1" / "error.txt").read_text().strip() == "error: optimizer.lr=-1 must be positive"
    assert "error: 1 of 2 jobs failed (1)" in result.stderr


def test_local_gpus_without_ray_is_one_line_before_the_sweep_starts(monkeypatch, tmp_path):
    from vitexp import cli
    from vitexp.errors import ConfigError

    target = "hydra_plugins.vitexp_sweeps.local_gpus.LocalGPUsLauncher"
    monkeypatch.setitem(cli.LAUNCHER_NEEDS, target, ("local_gpus", "no_such_module_for_vitexp", "ray"))
    argv = ["-m", "hydra/launcher=local_gpus", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^hydra/launcher=local_gpus needs no_such_module_for_vitexp: pip"):
        cli.check_command_line("config", argv)
    cli.check_command_line("config", ["hydra/launcher=local_gpus", "seed=0"])  # one run launches nothing
    assert not any(tmp_path.iterdir())


def test_local_gpus_shares_out_the_machine():
    from hydra_plugins.vitexp_sweeps._ray_jobs import Plan, plan
    from vitexp.errors import ConfigError

    assert plan(None, 1, {"CPU": 16, "GPU": 8}) == Plan(slots=8, gpus=1, cpus=2, threads=2)
    assert plan(2, 1, {"CPU": 16, "GPU": 8}) == Plan(slots=2, gpus=1, cpus=8, threads=8)
    assert plan(None, 2, {"CPU": 16, "GPU": 8}) == Plan(slots=4, gpus=2, cpus=4, threads=4)
    assert plan(None, 1, {"CPU": 2}) == Plan(slots=1, gpus=0, cpus=2, threads=2)
    assert plan(2, 1, {"CPU": 2}) == Plan(slots=2, gpus=0, cpus=1, threads=1)
    assert plan(4, 1, {"CPU": 2}) == Plan(slots=4, gpus=0, cpus=1, threads=1)
    with pytest.raises(ConfigError, match="gpus_per_job=4 but Ray sees 2 GPU"):
        plan(None, 4, {"CPU": 8, "GPU": 2})
    with pytest.raises(ConfigError, match="jobs=0 must be at least 1"):
        plan(0, 1, {"CPU": 8})


# --------------------------------------------------------------------------- Optuna


OPTUNA = [
    "experiment=digits",
    "hparams_search=digits_optuna",
    "trainer.max_epochs=3",
    "trainer.progress=false",
]


def study_trials(sweep: Path) -> list:
    """The trials of the presets' study (a journal file in the sweep folder)."""
    import optuna

    from vitexp.studies import open_storage

    storage = open_storage(f"{sweep}/optuna.journal")
    return optuna.load_study(study_name="digits_optuna", storage=storage).trials


@pytest.mark.sweep
@needs_optuna
def test_an_interrupted_optuna_search_continues_to_n_trials_in_all(tmp_path):
    """Kill the search (SIGKILL, the whole process group) as its third trial trains; the same
    command then runs trial 2 again in its own folder (from its checkpoint) and trial 3, and
    leaves trials 0 and 1 as they were: 4 trials, numbered 0-3, none repeated."""
    sweep = tmp_path / "study"
    command = [
        sys.executable,
        "-m",
        "vitexp",
        *OPTUNA,
        "hydra.sweeper.n_trials=4",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    first = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (sweep / "2" / "last.pt").is_file():
            assert first.poll() is None and time.time() < deadline, "the search ended before its third trial"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = {i: (sweep / str(i) / "summary.json").read_bytes() for i in (0, 1)}
    assert [t.state.name for t in study_trials(sweep)] == ["COMPLETE", "COMPLETE", "RUNNING"]

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "trial 2 was interrupted: running it again" in log
    assert "3 trial(s) stored, 1 of them run again, 1 of n_trials=4 to go" in log
    trials = study_trials(sweep)
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no trial's values drawn twice
    assert {i: (sweep / str(i) / "summary.json").read_bytes() for i in (0, 1)} == before  # not run again
    jobs = {j.name: j for j in read_sweep(sweep)}
    assert sorted(jobs) == ["0", "1", "2", "3"] and all(j.status == "completed" for j in jobs.values())
    for t in trials:
        assert jobs[str(t.number)].objective == pytest.approx(t.value)
    # Trial 2 continued from its checkpoint: each step was logged once.
    records = [json.loads(line) for line in (sweep / "2" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    epochs = [r["epoch"] for r in records if "val/acc1" in r]
    assert len(steps) == len(set(steps)) and epochs == [1, 2, 3]

    # Once complete, the same command runs nothing more.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 of n_trials=4 to go" in again.stdout + again.stderr
    assert len(study_trials(sweep)) == 4


@pytest.mark.sweep
@needs_optuna
@needs_ray
def test_optuna_trials_run_in_parallel_through_local_gpus(tmp_path):
    sweep = tmp_path / "study"
    result = run_cli(
        *OPTUNA, "hydra/launcher=local_gpus", "hydra.launcher.jobs=2", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", env=RAY_ENV, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [t.state.name for t in study_trials(sweep)] == ["COMPLETE", "COMPLETE"]
    assert overlap(span(sweep / "0"), span(sweep / "1"))


# --------------------------------------------------------------------------- W&B Sweeps


def agent_command(sweep_config: dict, values: dict) -> list[str]:
    """The command `wandb agent` runs for one run with these parameter values: W&B's own
    expansion (wandb/wandb_agent.py, Agent._command_run), through its own functions."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep_config["command"]))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(interpreter=["python"], env=["/usr/bin/env"])
    expanded: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            expanded += macros.get(chunk[2:-1]) or []
        else:
            expanded.append(chunk)
    return expanded


@pytest.mark.wandb
def test_wandb_sweep_runs_python_m_vitexp_with_hydra_overrides(tmp_path):
    from vitexp.cli import check_command_line
    from vitexp.errors import ConfigError

    sweep_config = yaml.safe_load((REPO / "sweep.yaml").read_text())
    parameters = sweep_config["parameters"]
    assert "+optimizer.amsgrad" in parameters  # a key the defaults lack
    values = {"optimizer.lr": 2e-3, "optimizer.weight_decay": 0.03, "scheduler.warmup_epochs": 2,
              "model.drop_path_rate": 0.1, "+optimizer.amsgrad": True}  # fmt: skip
    assert set(values) == set(parameters)
    command = agent_command(sweep_config, values)
    assert command[:4] == ["/usr/bin/env", "python", "-m", "vitexp"]
    overrides = command[4:]
    assert "optimizer.lr=0.002" in overrides and "+optimizer.amsgrad=True" in overrides
    check_command_line("config", overrides)  # composes, as Hydra is about to
    with pytest.raises(ConfigError, match=r"optimizer\.amsgrad"):  # without its +, it cannot
        check_command_line("config", [o.lstrip("+") for o in overrides])

    # And the agent's process trains, each run in a folder of its own (one agent per GPU runs
    # its runs side by side with the others').
    env = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "run42", "PYTHONPATH": with_repo()}
    result = run_cli(*overrides, "trainer.max_steps=2", "trainer.sample_figures=false", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "wandb" / "abc123" / "run42"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optimizer"]["amsgrad"] is True and config["optimizer"]["lr"] == 0.002
    assert config["scheduler"]["warmup_epochs"] == 2 and config["model"]["drop_path_rate"] == 0.1
    assert (run_dir / "summary.json").is_file()


@pytest.mark.slow
def test_hydra_finds_vitexps_plugins_from_any_working_directory(tmp_path):
    """Hydra lists the folders of the hydra_plugins namespace; an editable install must add
    this checkout's (pyproject names the namespace for that), not only the current directory."""
    probe = subprocess.run(
        [sys.executable, "-c", "import vitexp; print(vitexp.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    if Path(probe.stdout.strip()).resolve().parent.parent != REPO:
        pytest.skip(f"the vitexp installed here is another checkout's ({probe.stdout.strip()})")
    result = run_cli("--info", "plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LocalGPUsLauncher" in result.stdout
    assert "OptunaSweeper" in result.stdout and "hydra_plugins.vitexp_sweeps.optuna_sweeper " in result.stdout
