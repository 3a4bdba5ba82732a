"""Shared fixtures; the helpers they build on are in tests/helpers.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import SHARED_DATA, compose_cfg


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers on this 2-core machine) each worker and
    the commands it starts take one thread (`trainer.num_threads=auto` reads OMP_NUM_THREADS):
    two processes of two threads each on two cores run many times slower, not twice."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


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


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch.hub's cache (TORCH_HOME) in `tmp_path`, for this test only."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub (HF_HUB_OFFLINE) with its cache in `tmp_path`: huggingface_hub read both
    when it was imported, so its constants are set, for this test only."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
