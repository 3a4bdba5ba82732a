"""Data-parallel training: 2 gloo processes on the CPU against one process, rank-0-only
outputs, resume under DDP, the shards, and the launchers' environments (torchrun, SLURM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, run_cli
from vitexp.data import BatchTransform, DeviceLoader, Split
from vitexp.errors import ConfigError
from vitexp.training.checkpoint import load_checkpoint
from vitexp.training.distributed import World, launch_world

# No dropout and no augmentation: every random draw then comes from the shared shuffle, so two
# processes must reproduce one process's run up to the order of floating-point sums.
EXACT = [
    "dataset=fake", "model=vit_ti4", "model.img_size=16", *TINY_MODEL, "trainer.batch_size=32",
    "trainer.max_epochs=2", "trainer.log_every_steps=1", "trainer.progress=false",
    "trainer.sample_figures=false", "trainer.save_every_epoch=true",
]  # fmt: skip
# Dropout, drop path, crops and flips: per-rank random streams that resume must restore.
RANDOM = [*EXACT, "model.dropout_rate=0.1", "model.drop_path_rate=0.1", "dataset.augment.crop_padding=2",
          "dataset.augment.hflip=true", "trainer.checkpoint_every_steps=8"]  # fmt: skip


def torchrun(
    *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "vitexp", *args]  # fmt: skip
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in rows(run_dir) if "train/loss" in r]


def evals(run_dir: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("step", "val/loss", "val/acc1", "val/acc5")}
        for r in rows(run_dir)
        if "val/loss" in r
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    result = run_cli(*EXACT, f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_same_curve(run_dir: Path, reference: Path) -> None:
    ours, theirs = losses(run_dir), losses(reference)
    assert [s for s, _ in ours] == [s for s, _ in theirs] and len(ours) == 64
    for (step, a), (_, b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"step {step}: {a} vs {b}"
    for a, b in zip(evals(run_dir), evals(reference), strict=True):
        assert a["step"] == b["step"] and a["val/acc1"] == b["val/acc1"] and a["val/acc5"] == b["val/acc5"]
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-5)


@pytest.mark.ddp
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(single, tmp_path, accumulation):
    """Same loss at every step (to 1e-5) and the same eval metrics: with 2 accumulation steps
    each rank runs micro-batches of 8 and synchronises gradients once per step."""
    run_dir = tmp_path / "ddp"
    result = torchrun(*EXACT, f"trainer.grad_accum_steps={accumulation}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_curve(run_dir, single)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 64
    reference = json.loads((single / "summary.json").read_text())
    assert summary["final"]["val/acc1"] == reference["final"]["val/acc1"]
    ours, theirs = load_checkpoint(run_dir / "last.pt")["model"], load_checkpoint(single / "last.pt")["model"]
    for key in theirs:
        a, b = ours[key], theirs[key]
        if key.endswith("qkv.bias"):
            # The key bias cannot change the attention (softmax ignores a constant per row): its
            # gradient is rounding noise, which AdamW normalises into steps of size lr either way.
            a, b = torch.cat([a[:32], a[64:]]), torch.cat([b[:32], b[64:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.ddp
def test_only_rank_0_writes_and_all_ranks_share_one_run_dir(tmp_path):
    """No hydra.run.dir given: each process composes Hydra's outputs/DATE/TIME itself, and they
    must land in one directory, written once (one metrics row per step, one W&B run)."""
    result = torchrun(
        *EXACT, "trainer.max_epochs=1", "logger=wandb", cwd=tmp_path, env={"WANDB_MODE": "offline"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra")]
    assert len(run_dirs) == 1 and len(list((tmp_path / "outputs").glob("*/*"))) == 1
    run_dir = run_dirs[0]
    steps = [r["step"] for r in rows(run_dir) if "train/loss" in r]
    assert steps == list(range(1, 33))
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["best.pt", "epoch1.pt", "last.pt"]
    assert result.stdout.count("epoch 1/1 |") + result.stderr.count("epoch 1/1 |") == 1  # rank 0 reports


@pytest.mark.ddp
def test_resume_under_ddp_restores_every_ranks_random_streams(tmp_path):
    """Dropout and augmentation draw per rank; resuming from the epoch-1 checkpoint must give
    the same second epoch, bitwise, as the uninterrupted 2-process run."""
    reference = tmp_path / "reference"
    result = torchrun(*RANDOM, f"hydra.run.dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(reference / "epoch1.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2
    assert not torch.equal(
        ckpt["rank_rng"][0]["generator"]["state"], ckpt["rank_rng"][1]["generator"]["state"]
    )  # own streams
    resumed = tmp_path / "resumed"
    result = torchrun(*RANDOM, f"trainer.resume={reference}/epoch1.pt", f"hydra.run.dir={resumed}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(resumed) == [row for row in losses(reference) if row[0] > 32]
    ours, theirs = (
        load_checkpoint(resumed / "last.pt")["model"],
        load_checkpoint(reference / "last.pt")["model"],
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.ddp
@pytest.mark.signals
def test_sigterm_under_ddp_checkpoints_mid_epoch_and_resumes_exactly(tmp_path):
    """The signal reaches the ranks at different moments; they agree at the next log point,
    rank 0 writes the mid-epoch checkpoint, all exit (status 75), and the resumed
    run replays the rest of the epoch's shards exactly."""
    reference = tmp_path / "reference"
    assert torchrun(*RANDOM, f"hydra.run.dir={reference}").returncode == 0
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "vitexp", *RANDOM, f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and '"step": 40,' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    output = proc.communicate(timeout=120)[0]
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert "stopped by SIGTERM at step" in output, output[-3000:]
    assert "Resume with: torchrun --nproc_per_node=2 -m vitexp" in output
    assert (
        ckpt["progress"]["epoch"] == 2
        and not ckpt["progress"]["epoch_complete"]
        and ckpt["progress"]["global_step"] >= 40
    )
    resumed = torchrun(*RANDOM, f"hydra.run.dir={run_dir}", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run_dir) == losses(reference)
    ours, theirs = (
        load_checkpoint(run_dir / "last.pt")["model"],
        load_checkpoint(reference / "last.pt")["model"],
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert proc.returncode != 0  # torchrun, signalled itself, reports the interruption


def test_shards_make_up_the_single_process_batches():
    """Rank r's batch i holds the entries of global batch i that fall on r: together the ranks
    see exactly the single-process batches; evaluation shards cover every sample once."""
    n, global_batch = 103, 8
    split = Split(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))
    transform = BatchTransform(img_size=(2, 2), mean=[0.0], std=[1.0])

    def loader(train: bool, batch: int, rank: int = 0, world: int = 1) -> DeviceLoader:
        return DeviceLoader(
            split, batch_size=batch, transform=transform, train=train, rank=rank, world_size=world,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    order = loader(True, global_batch).new_order()
    single = [y for _, y in loader(True, global_batch).iter_from(order)]
    ranks = [[y for _, y in loader(True, global_batch // 2, r, 2).iter_from(order)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == n // global_batch
    for i, batch in enumerate(single):
        assert sorted(torch.cat([ranks[0][i], ranks[1][i]]).tolist()) == sorted(batch.tolist())
    # Resuming mid-epoch: from batch 5 on, the same shards.
    assert [y.tolist() for _, y in loader(True, 4, 1, 2).iter_from(order, 5)] == [
        y.tolist() for y in ranks[1][5:]
    ]
    seen = [y for r in range(3) for _, y in loader(False, 10, r, 3)]
    assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_torchrun_environment_gives_the_rank(monkeypatch):
    for key in ("SUBMITIT_EXECUTOR", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_world() == World(rank=3, local_rank=1, size=4)
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="RANK is not set: start the run with torchrun"):
        launch_world()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_world() == World() and not World().distributed


def test_slurm_tasks_started_by_submitit_map_to_ranks():
    """A SLURM job of 2 nodes × 4 tasks, as the submitit launcher starts it: every task must
    find its global and local rank and the same rendezvous host and port."""
    pytest.importorskip("submitit")
    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}  # fmt: skip
    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = dict(os.environ)  # submitit exports into os.environ itself: put everything back after
    seen = []
    try:
        for procid in range(8):
            node, local = divmod(procid, 4)
            for key in exported:
                os.environ.pop(key, None)
            os.environ.update(
                {**job, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node)}
            )
            assert launch_world() == World(rank=procid, local_rank=local, size=8)
            seen.append(tuple(os.environ[key] for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert len(set(seen)) == 1 and seen[0][0] == "gpu07" and seen[0][2] == "4"


def test_slurm_preset_composes_for_a_multi_gpu_job():
    from hydra import compose, initialize_config_dir

    from vitexp.config import conf_dir

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.nodes=2",
                "hydra.launcher.tasks_per_node=4",
                "hydra.launcher.gpus_per_node=4",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0  # preempted or timed-out jobs are requeued


def test_launch_time_names_the_run_dir(tmp_path):
    import datetime

    from hydra import compose, initialize_config_dir

    from vitexp.config import conf_dir, set_launch_time

    set_launch_time(datetime.datetime(2031, 2, 3, 4, 5, 6))
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True)
        assert cfg.hydra.run.dir == "outputs/2031-02-03/04-05-06"
        assert cfg.hydra.sweep.dir == "outputs/multirun/2031-02-03/04-05-06"
    finally:
        set_launch_time(None)


def test_submitits_requeue_signal_checkpoints_first_then_reaches_its_handler():
    """submitit asks SLURM for SIGUSR2 before the time limit and requeues the job in its
    handler: vitexp takes the signal as a preemption (checkpoint at the step boundary) and
    then hands it on to that handler."""
    from vitexp.training.preemption import PreemptionGuard, pass_on

    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert guard.requested and guard.signal_name == "SIGUSR2" and calls == []
        pass_on("SIGUSR2")
        assert calls == [signal.SIGUSR2]
        pass_on("SIGTERM")  # default action: not repeated (the process would die)
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_its_run(tmp_path, monkeypatch):
    from tests.helpers import compose_cfg
    from vitexp.training import train

    class Killed(Exception):
        """The job dies at step 40 (a node failure): last.pt is the end of epoch 1."""

    def dies_at_step_40(logits, target, calls=[]):  # noqa: B006 (the counter is the point)
        calls.append(1)
        if len(calls) == 40:
            raise Killed
        return torch.nn.functional.cross_entropy(logits, target)

    cfg = compose_cfg([*EXACT, "trainer.max_epochs=2"], run_dir=tmp_path)
    with pytest.raises(Killed):
        train(cfg, loss_fn=dies_at_step_40)
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 32
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(cfg)
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 64
    assert [r["step"] for r in rows(tmp_path) if "train/loss" in r] == list(range(1, 65))
