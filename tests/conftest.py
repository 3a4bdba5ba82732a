"""Shared fixtures: composing configs as the CLI does, and the CIFAR subset beside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

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


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        return compose_cfg(list(overrides), run_dir=tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"the CIFAR-10 subset is not at {SHARED_DATA}/cifar-10-batches-py (set VITEXP_TEST_DATA)")
    return SHARED_DATA


def run_cli(
    *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python -m vitexp ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vitexp", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
