"""Resume, preemption, checkpoint hygiene, numerical faults and clear errors for bad input."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, TINY_MODEL, NanAtStep, assert_final_is_last_checkpoint, rows, run_cli
from vitexp.errors import ConfigError, DataError, TrainingDiverged
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint, save_checkpoint
from vitexp.training.preemption import EXIT_PREEMPTED

# Dropout, drop path, crops and flips all draw random numbers: resume must restore every RNG.
RESUMABLE = [
    "dataset=fake", "model=vit_ti4", "model.img_size=32", "model.hidden_size=64", "model.mlp_dim=128",
    "model.num_heads=2", "model.num_layers=3", "model.dropout_rate=0.1", "model.drop_path_rate=0.1",
    "dataset.augment.crop_padding=2", "dataset.augment.hflip=true", "trainer.batch_size=32",
    "trainer.max_epochs=2", "trainer.log_every_steps=1", "trainer.checkpoint_every_steps=4",
    "trainer.progress=false",
]  # fmt: skip
STEPS = 2 * (1024 // 32)


def curve(run_dir: Path) -> tuple[list, list]:
    """Per-step train losses and per-epoch eval metrics (timings left out)."""
    records = rows(run_dir)
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["val/loss"], r["val/acc1"], r["val/acc5"]) for r in records if "val/loss" in r]
    return losses, evals


def run_signalled(
    run_dir: Path, step: int, name: str, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The command `python -m vitexp RESUMABLE... EXTRA`, whose process sends itself SIG<name>
    while it computes training step `step`'s loss (tests/signal_at_step.py): a run interrupted
    at a known step, not wherever a poll of its metrics.jsonl happened to notice it."""
    args = (str(step), name, *RESUMABLE, *extra, f"hydra.run.dir={run_dir}")
    return run_cli(*args, module="tests.signal_at_step", env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    result = run_cli(*RESUMABLE, "trainer.save_every_epoch=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert curve(run_dir) == curve(reference)
    ours, theirs = (
        load_checkpoint(run_dir / "last.pt")["model"],
        load_checkpoint(reference / "last.pt")["model"],
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "final weights differ"
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["final"] == ref_summary["final"] and summary["best"] == ref_summary["best"]


@pytest.mark.signals
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_signalled(run_dir, 43, "KILL")  # mid-epoch 2, three steps after the step-40 checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    assert max(r["step"] for r in rows(run_dir)) == 42  # step 43 never ended
    progress = load_checkpoint(run_dir / "last.pt")["progress"]
    assert (progress["global_step"], progress["epoch"], progress["step_in_epoch"]) == (40, 2, 8)
    assert not progress["epoch_complete"]
    resumed = run_cli(*RESUMABLE, f"hydra.run.dir={run_dir}", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.signals
@pytest.mark.wandb
def test_sigterm_checkpoints_at_the_step_boundary_and_says_how_to_resume(reference, tmp_path):
    """Also with W&B (offline): the resumed run continues the same W&B run id."""
    run_dir = tmp_path / "run"
    offline = {"WANDB_MODE": "offline"}
    stopped = run_signalled(run_dir, 10, "TERM", "logger=wandb", env=offline)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "SIGTERM received" in output and "Resume with: python -m vitexp" in output
    ckpt = load_checkpoint(run_dir / "last.pt")
    # The step the signal arrived in ends, is checkpointed, and is the last.
    assert ckpt["progress"]["global_step"] == 10 and not ckpt["progress"]["epoch_complete"]
    assert max(r["step"] for r in rows(run_dir)) == 10
    command = output.split("Resume with: ")[1].splitlines()[0]
    assert f"hydra.run.dir={run_dir}" in command and command.endswith("trainer.resume=auto")
    wandb_id = ckpt["logger_ids"]["wandb"]
    resumed = run_cli(
        *RESUMABLE, "logger=wandb", f"hydra.run.dir={run_dir}", "trainer.resume=auto", env=offline
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_run(run_dir, reference)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{wandb_id}") for r in runs)


@pytest.mark.slow
def test_resume_from_a_checkpoint_path_into_a_new_run_dir(reference, tmp_path):
    """trainer.resume=PATH continues from any checkpoint (the reference's epoch-1 file here)
    in a new run dir, which then logs only what it trained."""
    run_dir = tmp_path / "continued"
    result = run_cli(*RESUMABLE, f"trainer.resume={reference}/epoch1.pt", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:]
    weights = load_checkpoint(run_dir / "last.pt")["model"]
    ref = load_checkpoint(reference / "last.pt")["model"]
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    assert min(r["step"] for r in rows(run_dir)) == 33


@pytest.mark.slow
def test_resume_auto_of_a_finished_run_trains_nothing(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "done"
    shutil.copytree(reference, run_dir)
    before = (run_dir / "last.pt").read_bytes()
    result = run_cli(*RESUMABLE, f"hydra.run.dir={run_dir}", "trainer.resume=auto")
    assert result.returncode == 0 and "epoch 1/2" not in result.stdout
    assert (run_dir / "last.pt").read_bytes() == before
    assert json.loads((run_dir / "summary.json").read_text())["completed"]


def test_resume_auto_without_a_checkpoint_starts_fresh(cfg_factory):
    cfg = cfg_factory("dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.max_steps=2",
                      "trainer.batch_size=32", "trainer.resume=auto", "trainer.progress=false")  # fmt: skip
    train(cfg)
    assert load_checkpoint(Path(cfg.run_dir) / "last.pt")["progress"]["global_step"] == 2


def test_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from vitexp.training.preemption import PreemptionGuard\n"
        "with PreemptionGuard() as guard:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    assert guard.requested and guard.signal_name == 'SIGUSR1'\n"
        "    print('first signal noted', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(5)\n"
        "    print('not reached')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert "first signal noted" in result.stdout and "not reached" not in result.stdout
    assert result.returncode == 128 + signal.SIGUSR1


def test_guard_restores_the_previous_handlers():
    from vitexp.training.preemption import PreemptionGuard

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- checkpoints

TINY_RUN = [*TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false"]
FAST = ["dataset=fake", *TINY_RUN]


@pytest.mark.slow
def test_keep_last_k_bounds_epoch_checkpoints(cfg_factory):
    cfg = cfg_factory(*FAST, "trainer.max_epochs=4", "trainer.save_every_epoch=true", "trainer.keep_last_k=2")
    train(cfg)
    assert sorted(p.name for p in Path(cfg.run_dir).glob("epoch*.pt")) == ["epoch3.pt", "epoch4.pt"]


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(cfg_factory, caplog):
    calls = []

    def save(state, path):
        calls.append(Path(path).name)
        if len(calls) > 2:  # epoch 1 saves last.pt and best.pt; later writes find the disk full
            raise OSError(28, "No space left on device")
        save_checkpoint(state, path)

    cfg = cfg_factory(*FAST, "trainer.max_epochs=3")
    with caplog.at_level(logging.WARNING, logger="vitexp.training"):
        train(cfg, write_checkpoint=save)
    assert calls[:3] == ["last.pt", "best.pt", "last.pt"]
    assert load_checkpoint(Path(cfg.run_dir) / "last.pt")["progress"]["epoch"] == 1
    assert "(No space left on device); the previous last.pt is kept" in caplog.text
    assert json.loads((Path(cfg.run_dir) / "summary.json").read_text())["epochs"] == 3


def test_resume_from_another_architecture_names_the_key_and_shapes(cfg_factory, tmp_path):
    first = cfg_factory(*FAST, "trainer.max_steps=1")
    train(first)
    other = cfg_factory(*FAST, "trainer.max_steps=2", "model.hidden_size=48", "model.mlp_dim=96",
                        f"trainer.resume={first.run_dir}/last.pt")  # fmt: skip
    other.run_dir = str(tmp_path / "other")
    with pytest.raises(
        ConfigError, match=r"would change the run: model\.hidden_size: 32 -> 48; model\.mlp_dim"
    ) as e:
        train(other)
    assert "trainer.max_steps: 1 -> 2" in str(e.value) and "trainer.resume_allow_changes=true" in str(e.value)
    assert "\n" not in str(e.value)
    other.trainer.resume_allow_changes = True  # then the weights themselves do not fit
    with pytest.raises(
        ConfigError, match=r"is \(32, 3, 4, 4\) in the file but \(48, 3, 4, 4\) in the model"
    ) as e:
        train(other)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_resume_a_run_cut_short_by_max_steps_to_a_longer_one(cfg_factory):
    """The first run ends after 4 of the epoch's 16 steps; continued to 7 steps (a change it
    must be allowed), it trains 3 more in a new epoch and ends, instead of looping over
    empty epochs."""
    cfg = cfg_factory(*FAST, "trainer.max_steps=4", "scheduler=constant")
    train(cfg)
    cfg.trainer.max_steps, cfg.trainer.resume, cfg.trainer.resume_allow_changes = 7, "auto", True
    signal.alarm(120)  # a regression would loop forever: fail instead
    try:
        train(cfg)
    finally:
        signal.alarm(0)
    ckpt = load_checkpoint(Path(cfg.run_dir) / "last.pt")
    assert ckpt["progress"]["global_step"] == 7 and ckpt["progress"]["epoch"] == 2


def test_resume_from_a_corrupt_or_missing_checkpoint(cfg_factory, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(DataError, match="truncated or corrupt"):
        train(cfg_factory(*FAST, f"trainer.resume={broken}"))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        train(cfg_factory(*FAST, f"trainer.resume={tmp_path}/nope.pt"))


# --------------------------------------------------------------------------- numerical faults


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(cfg_factory):
    cfg = cfg_factory(
        *FAST, "trainer.max_steps=8", "trainer.checkpoint_every_steps=2", "trainer.log_every_steps=3"
    )
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, loss_fn=NanAtStep(5))
    message = str(e.value)
    assert e.value.step == 5 and e.value.exit_code == 4
    # Found at the first log point after it (step 6), before the loss was logged.
    assert not any(r["step"] >= 5 for r in rows(Path(cfg.run_dir)) if "train/loss" in r)
    assert (
        "non-finite at step 5" in message
        and f"Last good checkpoint: {cfg.run_dir}/last.pt (step 4)" in message
    )
    assert "trainer.on_nonfinite=skip" in message
    ckpt = load_checkpoint(Path(cfg.run_dir) / "last.pt")
    assert ckpt["progress"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_nonfinite_loss_can_skip_the_step(cfg_factory, caplog):
    cfg = cfg_factory(*FAST, "trainer.max_steps=8", "trainer.on_nonfinite=skip", "trainer.log_every_steps=1")
    with caplog.at_level(logging.WARNING, logger="vitexp.training"):
        train(cfg, loss_fn=NanAtStep(5))
    assert "step 5: non-finite loss or gradient; step skipped" in caplog.text
    logged = [r["step"] for r in rows(Path(cfg.run_dir)) if "train/loss" in r]
    assert logged == [1, 2, 3, 4, 6, 7, 8]  # the skipped step has no finite loss to log
    ckpt = load_checkpoint(Path(cfg.run_dir) / "last.pt")
    assert ckpt["progress"]["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(r["train/loss"] == r["train/loss"] for r in rows(Path(cfg.run_dir)) if "train/loss" in r)


# --------------------------------------------------------------------------- bad input


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message", "a_valid_choice"),
    [
        (["model=vit_zz9"], "error: unknown model 'vit_zz9': choose one of ", "vit_b16"),
        (["dataset=imagenet"], "error: unknown dataset 'imagenet': choose one of ", "cifar100"),
        (["optimizer=adam"], "error: unknown optimizer 'adam': choose one of adamw, sgd", "adamw"),
        (["-m", "model=vit_ti4,vit_q"], "error: unknown model 'vit_q': choose one of ", "vit_ti4"),
    ],
)
def test_unknown_names_list_the_choices_in_one_line(args, message, a_valid_choice):
    result = run_cli(*args)
    assert result.returncode == 2
    error = result.stderr.strip()
    assert error.startswith(message) and len(error.splitlines()) == 1
    assert a_valid_choice in error.split("choose one of ")[1].split(", ")


def _image_folder(root: Path, broken: bool = False) -> Path:
    for split in ("train", "val"):
        for label, color in enumerate(("red", "blue")):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                Image.new("RGB", (20 + i, 16), color).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@pytest.mark.slow
def test_imagefolder_trains_through_workers(cfg_factory, tmp_path):
    root = _image_folder(tmp_path / "images")
    cfg = cfg_factory(
        "dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=2", "dataset.num_workers=1",
        *TINY_RUN, "trainer.batch_size=4", "trainer.max_epochs=2",
    )  # fmt: skip
    train(cfg)
    assert assert_final_is_last_checkpoint(Path(cfg.run_dir))["steps"] == 6


def test_imagefolder_without_images_says_what_it_expected(cfg_factory, tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    cfg = cfg_factory(
        "dataset=imagefolder", f"dataset.root={tmp_path / 'empty'}", "dataset.num_classes=1", *TINY_RUN
    )
    with pytest.raises(DataError, match=r"no images found under .*train: expected one folder per class"):
        train(cfg)


def test_unreadable_image_fails_naming_the_file(cfg_factory, tmp_path):
    root = _image_folder(tmp_path / "images", broken=True)
    cfg = cfg_factory("dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=2", *TINY_RUN,
                      "trainer.batch_size=13", "trainer.max_steps=1")  # fmt: skip
    with pytest.raises(
        DataError, match=r"cannot read image .*class1/broken.jpg .*dataset.on_error=skip"
    ) as e:
        train(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_unreadable_image_can_be_skipped_with_a_warning(cfg_factory, tmp_path, caplog):
    root = _image_folder(tmp_path / "images", broken=True)
    cfg = cfg_factory("dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=2", *TINY_RUN,
                      "dataset.on_error=skip", "trainer.batch_size=13", "trainer.max_steps=1")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vitexp.data"):
        train(cfg)
    assert "skipping unreadable image" in caplog.text and "broken.jpg" in caplog.text
