"""What the tests share: composing configs as the CLI does, running the CLI, a tiny model,
reading a run's records back, and losses that inject faults (a NaN, a signal) through the
loop's seam."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from vitexp.config import conf_dir, register_experiments, register_resolvers

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("VITEXP_TEST_DATA", REPO.parent / "shared" / "data"))

register_experiments()
register_resolvers()

# Small enough to train in a second or two on 2 CPU cores.
TINY_MODEL = [
    "model.hidden_size=32",
    "model.mlp_dim=64",
    "model.num_heads=2",
    "model.num_layers=2",
]


def compose_cfg(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, like `python -m vitexp` does."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


@functools.cache
def composed(*overrides: str) -> DictConfig:
    """`compose_cfg(overrides)`, composed once per test process and read-only (a test that
    tries to change it fails): for the tests that only read what an option composes to, as
    several files check each model option."""
    cfg = compose_cfg(list(overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def model_config(name: str) -> DictConfig:
    """The composed `model` config of option `name`, its family's base merged in (the files
    in conf/model/ list only what differs from it). Read-only."""
    return composed(f"model={name}").model


@functools.cache
def model_target(name: str) -> str:
    """The constructor model option `name` names, for the tests that pick options by family as
    they are collected: read from the option's file or, where the file leaves it to its
    family's base (`defaults: [/model_vit@_here_, _self_]`), from that base, as Hydra merges
    them. tests/test_config.py checks it against the composed option, for every option; this
    takes about 10 ms where composing the option takes about 80 ms."""
    option = OmegaConf.load(conf_dir() / "model" / f"{name}.yaml")
    if "_target_" in option:
        return str(option["_target_"])
    (base,) = [entry for entry in option.get("defaults", []) if entry != "_self_"]
    base_file = conf_dir() / f"{str(base).lstrip('/').removesuffix('@_here_')}.yaml"
    return str(OmegaConf.load(base_file)["_target_"])


def model_options() -> list[str]:
    from vitexp.config import group_options

    return group_options("model")


def run_cli(
    *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300, module: str = "vitexp"
) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` in a subprocess, as a user would."""
    inherited = {k: v for k, v in os.environ.items() if k != "VITEXP_DEBUG"}  # tracebacks only when asked
    full_env = {**inherited, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class NanAtStep(nn.Module):
    """Cross-entropy whose `step`-th training loss (1-based) is NaN: passed as `train(...,
    loss_fn=NanAtStep(5))`, so no test patches torch."""

    def __init__(self, step: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.step, self.calls = step, 0
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.calls += 1
        loss = self.loss(logits, target)
        return loss * float("nan") if self.calls == self.step else loss


class SignalAtStep(nn.Module):
    """Cross-entropy that sends its own process `signum` as it computes the `step`-th training
    loss (1-based): SIGKILL dies there, mid-step, after the checkpoint before it; SIGTERM is
    noted by the run's preemption guard, which stops at the end of that step. Used through
    tests/signal_at_step.py, so a test interrupts a run at a known step, never polling."""

    def __init__(self, step: int, signum: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.step, self.signum, self.calls = step, signum, 0
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), self.signum)
        return self.loss(logits, target)


def assert_final_is_last_checkpoint(run_dir: Path) -> dict:
    """The summary's final metrics are what last.pt scores when evaluated afresh (rebuilt from
    its stored config, on the same split): the loop's evaluation, its checkpoint and its
    summary agree. Returns the summary."""
    from vitexp.commands.evaluate import evaluate_checkpoint

    summary = json.loads((run_dir / "summary.json").read_text())
    report = evaluate_checkpoint(run_dir / "last.pt", output=run_dir / "recheck.json", device="cpu")
    assert report["acc1"] == summary["final"]["val/acc1"]
    assert abs(report["loss"] - summary["final"]["val/loss"]) <= 1e-5 * summary["final"]["val/loss"]
    return summary


def state_dicts_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> str:
    """Put the files of `folder` (as saved by timm or transformers) into the Hub cache `cache`
    as huggingface_hub lays it out: blobs by content, a snapshot of symlinks for `commit`, and
    refs/main naming it. Returns the commit."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub's own reader of the cache sees the repo, its revision and its files.
    (info,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == repo_id]
    (revision,) = info.revisions
    assert revision.commit_hash == commit and {f.file_name for f in revision.files} == {
        f.name for f in folder.iterdir()
    }
    return commit
