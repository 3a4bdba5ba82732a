"""Resume as `Checkpoints` does it: the new config is what a resumed run does
(`trainer.resume_allow_changes`), a longer run says what its learning rate does, a damaged
checkpoint is refused wherever it is read, a run that died at start-up does not block its
re-run, and `train` works from Python with a run directory alone."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MODEL, compose_cfg, rows
from vitexp.commands.evaluate import evaluate_checkpoint
from vitexp.commands.predict import predict_images
from vitexp.errors import ConfigError, DataError
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint, read_training_checkpoint
from vitexp.training.distributed import SINGLE_PROCESS
from vitexp.training.optim import warmup_cosine
from vitexp.training.setup import build
from vitexp.training.state import TrainState

# 1024 fake images in batches of 64: 16 optimizer steps per epoch; AdamW (weight decay 0.05),
# warmup-cosine with one epoch of warmup, lr 1e-3.
FAST = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false",
        "trainer.sample_figures=false", "trainer.log_every_steps=1"]  # fmt: skip
STEPS_PER_EPOCH = 16
ALLOW = ["trainer.resume_allow_changes=true"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch run (32 steps)."""
    run_dir = tmp_path_factory.mktemp("finished")
    train(compose_cfg([*FAST, "trainer.max_epochs=2"]), run_dir=run_dir)
    return run_dir


def continued(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run to continue (each test changes its own)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


@pytest.mark.slow
def test_a_changed_weight_decay_is_the_optimizers_after_resume(finished, tmp_path):
    run_dir = continued(finished, tmp_path)
    before = load_checkpoint(run_dir / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in before] == [0.05, 0.0]
    cfg = compose_cfg(
        [*FAST, "trainer.max_epochs=3", "optimizer.weight_decay=0.2", "trainer.resume=auto", *ALLOW]
    )
    train(cfg, run_dir=run_dir)
    after = load_checkpoint(run_dir / "last.pt")
    assert after["progress"]["global_step"] == 48
    # The decayed group takes the new rate; the group without decay (norms, biases) keeps none.
    assert [g["weight_decay"] for g in after["optimizer"]["param_groups"]] == [0.2, 0.0]
    assert after["config"]["optimizer"]["weight_decay"] == 0.2


@pytest.mark.slow
def test_another_optimizer_starts_with_fresh_state_and_says_so(finished, tmp_path, caplog):
    run_dir = continued(finished, tmp_path)
    cfg = compose_cfg([*FAST, "trainer.max_epochs=3", "optimizer=sgd", "trainer.resume=auto", *ALLOW])
    with caplog.at_level(logging.WARNING, logger="vitexp.training"):
        train(cfg, run_dir=run_dir)
    assert (
        "the checkpoint was trained with torch.optim.AdamW, this run uses torch.optim.SGD "
        "(trainer.resume_allow_changes): the new optimizer starts with fresh state" in caplog.text
    )
    optimizer = load_checkpoint(run_dir / "last.pt")["optimizer"]
    assert [g["momentum"] for g in optimizer["param_groups"]] == [0.9, 0.9]
    state = next(iter(optimizer["state"].values()))
    assert set(state) == {"momentum_buffer"}  # SGD's, not AdamW's exp_avg/exp_avg_sq


def test_the_seed_cannot_change_in_the_middle_of_a_run(finished, tmp_path):
    run_dir = continued(finished, tmp_path)
    cfg = compose_cfg([*FAST, "trainer.max_epochs=3", "seed=1", "trainer.resume=auto", *ALLOW])
    with pytest.raises(ConfigError) as e:
        train(cfg, run_dir=run_dir)
    assert f"resuming {run_dir / 'last.pt'} would change seed (0 -> 1), which cannot change" in str(e.value)
    assert "not even with trainer.resume_allow_changes" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["auto", "path"])
def test_extending_a_finished_run_stretches_the_schedule_and_says_so(finished, tmp_path, caplog, how):
    """Two epochs continued to four: the warmup-cosine schedule is recomputed for 64 steps
    and continues at step 32 (no second warmup), and one line says what the rate does."""
    if how == "auto":
        run_dir, resume = continued(finished, tmp_path), "auto"
    else:
        run_dir, resume = tmp_path / "longer", str(finished / "last.pt")
    cfg = compose_cfg([*FAST, "trainer.max_epochs=4", f"trainer.resume={resume}", *ALLOW])
    with caplog.at_level(logging.WARNING, logger="vitexp.training"):
        train(cfg, run_dir=run_dir)
    lrs = {r["step"]: r["train/lr"] for r in rows(run_dir) if "train/lr" in r}
    last = {r["step"]: r["train/lr"] for r in rows(finished) if "train/lr" in r}[32]
    expected = 1e-3 * warmup_cosine(32, warmup_steps=STEPS_PER_EPOCH, total_steps=64)
    assert lrs[33] == pytest.approx(expected, rel=1e-6)
    assert (
        "the run now ends at step 64 instead of 32: the warmup_cosine schedule is recomputed for 64 steps "
        f"and continues at step 32 without a new warmup; the learning rate goes from {last:.3g} to "
        f"{expected:.3g}" in caplog.text
    )
    later = [lrs[s] for s in range(33, 65)]
    assert later == sorted(later, reverse=True)  # decaying from there on: no warmup again


# --------------------------------------------------------------------------- integrity


def damage(path: Path, *, zero: int = 0) -> str:
    """Flip one byte inside the largest tensor of a torch file (or zero `zero` bytes of it),
    leaving the zip structure intact; returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    blob = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", blob[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    if zero:
        blob[start : start + zero] = bytes(zero)
    else:
        blob[start] ^= 0x01
    path.write_bytes(bytes(blob))
    return member.filename


@pytest.mark.parametrize("zero", [0, 4096], ids=["one flipped byte", "4 KiB zeroed"])
def test_a_damaged_checkpoint_is_refused_wherever_it_is_read(finished, tmp_path, zero):
    path = tmp_path / "last.pt"
    shutil.copy(finished / "last.pt", path)
    member = damage(path, zero=zero)
    assert torch.load(path, weights_only=True)["model"]  # torch itself reads it without a word
    readers = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "resume": lambda: train(compose_cfg([*FAST, f"trainer.resume={path}"]), run_dir=tmp_path / "resumed"),
        "evaluate": lambda: evaluate_checkpoint(path, device="cpu", output=tmp_path / "eval.json"),
        "predict": lambda: predict_images(path, [tmp_path / "not-read.png"]),
    }
    for what, read in readers.items():
        with pytest.raises(DataError) as e:
            read()
        assert str(e.value).startswith(f"{path} is damaged: its member {member} does not match"), what
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the run directory


def test_records_without_progress_do_not_block_a_fresh_rerun(tmp_path, caplog):
    """A run that died at start-up (W&B unreachable, a bad setting caught late) leaves an empty
    metrics.jsonl or an error.txt: the same command run again starts, replacing them. Metrics
    with rows are progress: a fresh run still refuses them."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "error.txt").write_text("W&B could not be reached\n")
    cfg = compose_cfg([*FAST, "trainer.max_steps=2"])
    with caplog.at_level(logging.INFO, logger="vitexp.training"):
        train(cfg, run_dir=run_dir)
    assert "removed metrics.jsonl, error.txt in" in caplog.text
    assert "ended before it made progress" in caplog.text
    assert not (run_dir / "error.txt").exists() and [r["step"] for r in rows(run_dir)][:2] == [1, 2]
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.3}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\)"):
        train(cfg, run_dir=other)


# --------------------------------------------------------------------------- from Python


def test_train_from_python_with_a_run_dir_logs_to_the_console(tmp_path, monkeypatch, capsys):
    """`train(cfg, run_dir=...)` needs no RunContext, and with no logging set up (a script, a
    notebook) the run's progress goes to the console."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh interpreter
    monkeypatch.setattr(root, "level", logging.WARNING)
    cfg = compose_cfg([*FAST, "trainer.max_steps=2"])
    with pytest.raises(ConfigError, match=r"no run directory: pass train\(cfg, run_dir=...\)"):
        train(cfg)
    best = train(cfg, run_dir=tmp_path / "py")
    assert (tmp_path / "py" / "summary.json").is_file() and (tmp_path / "py" / "last.pt").is_file()
    console = capsys.readouterr().err
    assert "epoch 1/1" in console and f"done: best val/acc1 {best:.4f}" in console


def test_a_checkpoint_without_loss_scaling_resumes_into_fp16(finished):
    """An fp32 or bf16 checkpoint holds an empty grad-scaler state, which an enabled scaler
    (fp16, a GPU run) refuses with a RuntimeError: the scaler starts at its first scale
    instead. A CPU GradScaler stands in for the GPU's here."""
    run = build(compose_cfg([*FAST, "trainer.max_epochs=2"]), SINGLE_PROCESS)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    run = dataclasses.replace(run, step=dataclasses.replace(run.step, scaler=scaler))
    ckpt = read_training_checkpoint(finished / "last.pt")
    assert ckpt["scaler"] == {}
    state = TrainState(run)
    with contextlib.closing(run):
        state.load_state_dict(ckpt, finished / "last.pt")
    assert scaler.get_scale() == 1024.0 and state.progress.global_step == 32
