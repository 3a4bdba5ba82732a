"""The Slurm tier: `hydra/launcher=slurm` (submitit) against a real one-node Slurm cluster
started on this machine by tests/slurm/cluster.sh, and stopped after the module.

Skipped, with the reason, where Slurm (Debian's slurm-wlm and munge) is not installed or the
tests do not run as root (Slurm's daemons do); `.ci/run` installs it. What runs: a 2-job sweep,
a 2-task DDP job (gloo) equal to one process, and a job stopped by its 1-minute time limit that
checkpoints on submitit's signal, is requeued, resumes and ends as an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_MODEL, rows, run_cli
from vitexp.commands.report import read_sweep

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def _why_not() -> str | None:
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing: apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "Slurm's daemons run as root, and these tests do not"
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return "hydra-submitit-launcher is not installed (pip install -e '.[sweep]')"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A one-node cluster for the module: SLURM_CONF set for the tests (and so for the jobs,
    which inherit the environment), the daemons stopped afterwards whatever happened."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True)
    try:
        if started.returncode != 0:
            logs = "".join(p.read_text()[-1500:] for p in sorted((state / "log").glob("*.log")))
            pytest.fail(f"cluster.sh start failed: {started.stderr[-1500:]}\n{logs}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(state / "slurm.conf"))
            mp.setenv("OMP_NUM_THREADS", "1")  # one CPU per task
            yield state
    finally:
        subprocess.run(
            ["bash", str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=120
        )


# One CPU and no GPU per task, on the default partition.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
TINY = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false",
        "trainer.sample_figures=false"]  # fmt: skip
# As in tests/test_distributed.py: no dropout, no augmentation, so 2 ranks reproduce 1.
EXACT = ["dataset=fake", "model=vit_ti4", "model.img_size=16", *TINY_MODEL, "trainer.batch_size=32",
         "trainer.max_epochs=2", "trainer.log_every_steps=1", "trainer.progress=false",
         "trainer.sample_figures=false"]  # fmt: skip


def job_logs(sweep: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*")))


@contextlib.contextmanager
def requeues_without_delay() -> Iterator[None]:
    """Slurm holds a requeued job for two minutes (BeginTime = requeue + 120 s, measured on
    22.05); to keep the tier short, a thread brings such a job's start forward to now. Not at
    once: slurmd refuses to start a job in the same second its credential was revoked by the
    requeue ("Job credential revoked", and the job fails), so a job is released only after it
    has been held for 3 seconds."""
    done = threading.Event()

    def release() -> None:
        held_since: dict[str, float] = {}
        while not done.wait(1.0):
            held = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True)
            for line in held.stdout.splitlines():
                job, _, reason = line.partition(" ")
                if reason != "BeginTime":
                    continue
                since = held_since.setdefault(job, time.monotonic())
                if time.monotonic() - since >= 3.0:
                    subprocess.run(
                        ["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True
                    )
                    del held_since[job]  # the job may be requeued again later

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in rows(run_dir) if "train/loss" in r]


def test_a_two_job_sweep_runs_as_slurm_jobs(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", *LAUNCHER, "hydra.launcher.timeout_min=10", *TINY, "trainer.max_steps=3",
        "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = read_sweep(sweep)
    assert sorted(j.overrides for j in jobs) == ["optimizer.lr=0.001", "optimizer.lr=0.003"]
    assert all(j.status == "completed" for j in jobs)
    assert "SLURM_JOB_ID" in job_logs(sweep) or list(sweep.glob(".submitit/*/*_submission.sh"))
    assert (sweep / "report.md").is_file() and "sweep " in result.stdout


def test_a_two_task_job_trains_like_one_process(slurm, tmp_path):
    single = tmp_path / "single"
    reference = run_cli(*EXACT, f"hydra.run.dir={single}", timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    sweep = tmp_path / "ddp"
    result = run_cli(
        "-m", *LAUNCHER, "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", *EXACT,
        f"hydra.sweep.dir={sweep}", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + job_logs(sweep)[-3000:]
    ours, theirs = train_losses(sweep / "0"), train_losses(single)
    assert [s for s, _ in ours] == [s for s, _ in theirs] and len(ours) == 64
    for (step, a), (_, b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: {a} vs {b}"
    final = json.loads((sweep / "0" / "summary.json").read_text())["final"]
    expected = json.loads((single / "summary.json").read_text())["final"]
    assert final["val/acc1"] == expected["val/acc1"]
    assert final["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-5)


# About 35 s of training on one idle core (digits, 50 epochs): longer than Slurm lets a
# 1-minute job run before its signal (20-30 s here), so it is stopped at least once. Every
# step is logged, so a resumed run's rows line up with the uninterrupted run's one by one.
LONG = [
    "experiment=digits",
    "trainer.max_epochs=50",
    "trainer.log_every_steps=1",
    "trainer.progress=false",
    "trainer.sample_figures=false",
]


def test_a_time_limited_job_is_requeued_and_ends_as_an_uninterrupted_run(slurm, tmp_path):
    """timeout_min=1, signal_delay_s=30: Slurm signals (SIGUSR2) 30 s or more before the
    limit, vitexp checkpoints at the end of the step and hands the signal to submitit, which
    requeues the job; the requeued job (SLURM_RESTART_COUNT > 0) resumes, as often as it takes.
    The uninterrupted reference runs meanwhile, on the other core."""
    single, sweep = tmp_path / "single", tmp_path / "requeued"
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    with (tmp_path / "reference.log").open("w") as out:
        reference = subprocess.Popen(
            [sys.executable, "-m", "vitexp", *LONG, f"hydra.run.dir={single}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            with requeues_without_delay():
                result = run_cli(
                    "-m", *LAUNCHER, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30",
                    "hydra.launcher.max_num_timeout=6", *LONG, f"hydra.sweep.dir={sweep}", timeout=900,
                )  # fmt: skip
            reference.wait(timeout=600)
        finally:
            reference.kill()
    logs = job_logs(sweep)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs[-3000:]
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    job_log = "".join(p.read_text() for p in (sweep / "0").glob("*.log"))
    stops = job_log.count("SIGUSR2 received")
    assert stops >= 1 and job_log.count("resuming from") == stops, job_log[-3000:]
    assert logs.count("this job is timed-out") >= stops  # submitit's handler got the signal each time
    # The same loss at every step as the uninterrupted run.
    ours, theirs = train_losses(sweep / "0"), train_losses(single)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, 50 * 44 + 1))
    for (step, a), (_, b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"step {step}: {a} vs {b}"
    final = json.loads((sweep / "0" / "summary.json").read_text())["final"]
    expected = json.loads((single / "summary.json").read_text())["final"]
    assert final == pytest.approx(expected, rel=1e-6)
