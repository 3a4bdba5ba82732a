"""The dataset stored in a checkpoint is rebuilt through an allow-list, never by calling what
its `_target_` names, and never by downloading into a folder the file names."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from vitexp.commands.attention import attention_figure
from vitexp.commands.evaluate import evaluate_checkpoint
from vitexp.data import build_stored_dataset
from vitexp.errors import ConfigError, DataError
from vitexp.inference import load_trained
from vitexp.training.checkpoint import save_checkpoint

FIXTURE = REPO / "tests" / "fixtures" / "format1_digits_step15.pt"
SOURCE = "the dataset of evil.pt"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def hostile_configs(marker: Path, victim: Path) -> dict[str, dict]:
    return {
        "touch": {"_target_": "pathlib.Path.touch", "self": str(marker)},
        "truncate": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        "look_alike": {
            "_target_": "vitexp.data.load_fake.__globals__.open",
            "file": str(victim),
            "mode": "w",
        },
        "hidden_in_an_argument": {
            "_target_": "vitexp.data.load_fake",
            "num_train": {"_target_": "pathlib.Path.touch", "self": str(marker)},
        },
        "hidden_in_a_list": {
            "_target_": "vitexp.data.load_imagefolder",
            "root": str(marker.parent),
            "image_size": [8, {"_target_": "builtins.open", "file": str(victim), "mode": "w"}],
        },
        "positional_arguments": {
            "_target_": "vitexp.data.load_fake",
            "_args_": [{"_target_": "builtins.open"}],
        },
        "unknown_argument": {
            "_target_": "vitexp.data.load_digits",
            "test_fraction": 0.2,
            "path": str(victim),
        },
        "not_a_mapping": ["pathlib.Path.touch", str(marker)],
    }


CASES = list(hostile_configs(Path("m"), Path("v")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_stored_configs_are_refused_without_calling_anything(case, tmp_path, victim):
    marker = tmp_path / "marker"
    with pytest.raises(DataError) as e:
        build_stored_dataset(hostile_configs(marker, victim)[case], source=SOURCE)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{SOURCE}: ")
    assert not marker.exists() and victim.read_text() == "precious\n"


def test_the_messages_say_what_was_refused(tmp_path, victim):
    configs = hostile_configs(tmp_path / "marker", victim)
    expected = {
        "touch": r"names _target_='pathlib.Path.touch', which is not one of vitexp's own dataset.load "
        r"constructors \(load_cifar10, load_cifar100, load_digits, load_fake, load_hf, load_imagefolder, "
        r"load_wds\); refused",
        "hidden_in_an_argument": r"dataset.load.num_train._target_: a nested Hydra directive",
        "hidden_in_a_list": r"dataset.load.image_size\[1\]._target_: a nested Hydra directive",
        "positional_arguments": r"a key '_args_' that vitexp never writes",
        "unknown_argument": r"path=.*victim.txt', which load_digits does not take",
    }
    for case, pattern in expected.items():
        with pytest.raises(DataError, match=pattern):
            build_stored_dataset(configs[case], source=SOURCE)


@pytest.mark.parametrize("module", ["vitexp.data", "vitexp.data.datasets"])
def test_vitexps_own_loaders_rebuild_under_both_paths(module):
    fake = build_stored_dataset(
        {"_target_": f"{module}.load_fake", "num_train": 6, "num_test": 2, "img_size": 4, "num_classes": 3},
        source=SOURCE,
    )
    assert fake.train.images.shape == (6, 3, 4, 4) and fake.num_classes == 3
    digits = build_stored_dataset({"_target_": f"{module}.load_digits", "test_fraction": 0.2}, source=SOURCE)
    assert len(digits.test) == 360


def test_a_stored_imagefolder_rebuilds(tmp_path):
    from tests.test_data_folders import image_folder

    root = image_folder(tmp_path / "images")
    stored = {"_target_": "vitexp.data.folders.load_imagefolder", "root": str(root), "train_dir": "train",
              "test_dir": "val", "image_size": [8, 8], "in_channels": 3, "on_error": "fail"}  # fmt: skip
    data = build_stored_dataset(stored, source=SOURCE)
    assert len(data.train) == 12 and data.test.image_size == (8, 8)
    with pytest.raises(ConfigError, match=rf"{SOURCE}: .*gone/train is not here .*pass dataset=imagefolder"):
        build_stored_dataset({**stored, "root": str(tmp_path / "gone")}, source=SOURCE)


@pytest.mark.parametrize(("target", "folder"), [("load_cifar10", "cifar-10-batches-py"),
                                                ("load_cifar100", "cifar-100-python")])  # fmt: skip
def test_a_stored_cifar_config_never_downloads(target, folder, tmp_path, monkeypatch):
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("an inspection command must not download")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", no_download)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "__init__", no_download)
    root = tmp_path / "their_data"
    for module in ("vitexp.data", "vitexp.data.cifar"):
        with pytest.raises(ConfigError) as e:
            build_stored_dataset(
                {"_target_": f"{module}.{target}", "root": str(root), "download": True}, source=SOURCE
            )
        message = str(e.value)
        assert "\n" not in message and f"{root / folder} is not here" in message
        assert message.endswith(f"pass dataset={target[5:]} dataset.root=DIR to name where the data is")
    assert not root.exists()  # nothing was written where the stored config points


def test_a_stored_cifar_config_reads_an_existing_folder(tmp_path):
    from tests.test_data_errors import cifar10

    cifar10(tmp_path)
    data = build_stored_dataset(
        {"_target_": "vitexp.data.load_cifar10", "root": str(tmp_path)}, source=SOURCE
    )
    assert len(data.train) == 20


# --------------------------------------------------------------------------- through the commands


def _checkpoint_with(load_cfg: dict, path: Path) -> Path:
    state = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    state = copy.deepcopy(state)
    state["config"]["dataset"]["load"] = load_cfg
    save_checkpoint(state, path)
    return path


@pytest.mark.parametrize("case", ["touch", "truncate", "hidden_in_an_argument"])
def test_attention_and_evaluate_refuse_a_hostile_stored_dataset(case, tmp_path, victim):
    marker = tmp_path / "marker"
    evil = _checkpoint_with(hostile_configs(marker, victim)[case], tmp_path / "evil.pt")
    with pytest.raises(DataError, match=r"the dataset of .*evil\.pt: ") as e:
        attention_figure(evil, indices=[0])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"the dataset of .*evil\.pt: "):
        evaluate_checkpoint(evil, device="cpu", output=tmp_path / "report.json")
    assert not marker.exists() and victim.read_text() == "precious\n"
    assert not (tmp_path / "report.json").exists() and not list(tmp_path.glob("evil_attention*"))


def test_the_fixtures_own_dataset_still_rebuilds(tmp_path):
    data = load_trained(FIXTURE).load_dataset()
    assert len(data.train) == 1437 and len(data.test) == 360
    recorded = json.loads((FIXTURE.parent / "format1_digits_step15.json").read_text())["evaluate"]
    report = evaluate_checkpoint(FIXTURE, device="cpu", output=tmp_path / "report.json")
    assert report["num_samples"] == recorded["num_samples"]
    for key in ("loss", "acc1", "acc5"):
        assert report[key] == pytest.approx(recorded[key], rel=1e-6)
