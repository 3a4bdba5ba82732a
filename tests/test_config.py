"""Config composition: every group option, every preset, from any working directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import REPO, compose_cfg, run_cli
from vitexp.config import conf_dir, experiments_dir, register_experiments

GROUPS = ["model", "dataset", "optimizer", "scheduler", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def test_defaults_compose_and_resolve():
    cfg = compose_cfg()
    assert cfg.model.num_classes == 10 and cfg.model.in_channels == 1  # from dataset=digits
    OmegaConf.to_container(cfg, resolve=True)


# Options with settings that have no default (marked ???) and must be given.
REQUIRED = {"imagefolder": ["dataset.root=/data/images", "dataset.num_classes=2"]}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose_cfg([f"{group}={option}", *REQUIRED.get(option, [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("option", options("dataset"))
def test_every_dataset_config_instantiates(option, cifar_root, tmp_path):
    from tests.test_reliability import _image_folder

    if option == "cifar100":
        pytest.skip("CIFAR-100 is not available offline; its loader is tested with a simulated download")
    root = {"cifar10": cifar_root, "imagefolder": _image_folder(tmp_path / "images")}.get(option)
    overrides = [f"dataset={option}", *REQUIRED.get(option, [])] + ([f"dataset.root={root}"] if root else [])
    cfg = compose_cfg(overrides)
    data = instantiate(cfg.dataset.load)
    assert data.num_classes == cfg.dataset.num_classes
    assert len(data.train) > 0 and cfg.dataset.in_channels == len(cfg.dataset.mean)


def test_experiments_are_registered_as_a_group():
    names = register_experiments()
    assert names == sorted(p.stem for p in experiments_dir().glob("*.yaml"))
    assert "digits" in names


@pytest.mark.parametrize("name", sorted(p.stem for p in experiments_dir().glob("*.yaml")))
def test_every_experiment_composes(name):
    cfg = compose_cfg([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)


def test_experiment_overrides_beat_group_defaults():
    cfg = compose_cfg(["experiment=digits"])
    assert cfg.model.patch_size == 2 and cfg.trainer.batch_size == 32
    # and a command-line override beats the experiment
    assert compose_cfg(["experiment=digits", "trainer.batch_size=16"]).trainer.batch_size == 16


def test_cli_composes_from_any_working_directory(tmp_path):
    result = run_cli("experiment=digits", "model.hidden_size=96", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model.hidden_size == 96 and cfg.trainer.max_epochs == 100


def test_wheel_carries_the_configs(tmp_path):
    """A non-editable install finds conf/ and experiments/ inside the package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (wheel,) = tmp_path.glob("vitexp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vitexp/_conf/config.yaml" in names
    assert "vitexp/_conf/model/vit_b16.yaml" in names
    assert "vitexp/_experiments/digits.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "from vitexp.config import conf_dir, experiments_dir; print(conf_dir()); print(experiments_dir())"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == [str(site / "vitexp" / "_conf"), str(site / "vitexp" / "_experiments")], (
        out.stderr
    )


def test_model_group_instantiates_on_meta_for_each_size():
    from vitexp.models import build_model

    for option in options("model"):
        cfg = compose_cfg([f"model={option}"])
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0
