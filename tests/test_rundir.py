"""Run directories are never silently reused: a finished run is not overwritten by accident,
two runs never share a folder, and a resume that would change the run is refused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_MODEL, rows, run_cli
from vitexp.errors import ConfigError
from vitexp.training import train
from vitexp.training.checkpointing import RunDirLock

FAST = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false",
        "trainer.sample_figures=false", "trainer.max_epochs=1"]  # fmt: skip


@pytest.mark.slow
def test_a_fresh_run_into_a_finished_run_stops_and_leaves_it_alone(cfg_factory):
    cfg = cfg_factory(*FAST)
    train(cfg)
    run_dir = Path(cfg.run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as e:
        train(cfg)
    message = str(e.value)
    assert f"{run_dir} already holds a run (last.pt, best.pt, metrics.jsonl, summary.json)" in message
    assert "trainer.resume=auto" in message and "trainer.overwrite=true" in message and "\n" not in message
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_overwrite_replaces_the_old_records(cfg_factory):
    cfg = cfg_factory(*FAST)
    train(cfg)
    cfg.trainer.overwrite = True
    train(cfg)
    steps = [r["step"] for r in rows(Path(cfg.run_dir)) if "train/loss" in r]
    assert steps == sorted(set(steps))  # one run's rows, not two interleaved


@pytest.mark.slow
def test_resume_auto_after_a_run_that_died_before_its_first_checkpoint(cfg_factory):
    cfg = cfg_factory(*FAST, "trainer.resume=auto")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')  # nothing to resume
    train(cfg)
    assert 9.0 not in [r.get("train/loss") for r in rows(run_dir)]


@pytest.mark.slow
def test_resume_from_another_folder_into_a_finished_run_is_refused(cfg_factory, tmp_path):
    first = cfg_factory(*FAST)
    train(first)
    second = cfg_factory(*FAST)
    second.run_dir = str(tmp_path / "second")
    train(second)
    second.trainer.resume = str(Path(first.run_dir) / "last.pt")
    with pytest.raises(ConfigError, match=r"already holds a run .* \(this run resumes .*, from elsewhere\)"):
        train(second)


@pytest.mark.slow
def test_leftovers_of_an_interrupted_save_are_removed_at_start(cfg_factory, caplog):
    cfg = cfg_factory(*FAST)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / ".last.pt.x1y2.tmp").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="vitexp.training"):
        train(cfg)
    assert not (run_dir / ".last.pt.x1y2.tmp").exists()
    assert "left by a checkpoint write that was interrupted" in caplog.text


@pytest.mark.slow
def test_a_locked_run_dir_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        started = time.time()
        result = run_cli(*FAST, f"hydra.run.dir={run_dir}")
        assert time.time() - started < 60
    assert result.returncode == 2
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert (
        len(errors) == 1 and f"another vitexp run (pid {os.getpid()}) is training in {run_dir}" in errors[0]
    )
    assert "Traceback" not in output
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_the_lock_ends_with_its_process_even_on_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from vitexp.training.checkpointing import RunDirLock\n"
         "with RunDirLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)",
         str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        RunDirLock(run_dir).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunDirLock(run_dir):  # no stale lock to delete by hand
        pass


def test_resume_with_another_global_batch_is_refused_naming_the_change(cfg_factory, caplog):
    cfg = cfg_factory(
        *FAST, "trainer.max_epochs=2", "trainer.checkpoint_every_steps=4", "trainer.max_steps=6"
    )
    train(cfg)
    cfg.trainer.batch_size, cfg.trainer.resume = 32, "auto"
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert "would change the run: trainer.batch_size: 64 -> 32" in str(e.value)
    cfg.trainer.resume_allow_changes = True
    with caplog.at_level(logging.WARNING, logger="vitexp.training"):
        train(cfg)
    assert (
        "with a changed setting (trainer.resume_allow_changes): trainer.batch_size: 64 -> 32" in caplog.text
    )
