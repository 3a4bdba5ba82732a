"""Shared fixtures; the helpers they build on are in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import SHARED_DATA, compose_cfg


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
