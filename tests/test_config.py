"""Config composition: every group option, every preset, from any working directory."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from tests.helpers import REPO, compose_cfg, composed, model_config, model_target, run_cli
from vitexp.config import (
    TrainerConfig,
    conf_dir,
    experiments_dir,
    group_options,
    missing_keys,
    register_experiments,
)
from vitexp.registry import keyword_arguments

GROUPS = ["model", "dataset", "optimizer", "scheduler", "trainer", "logger"]


def options(group: str) -> list[str]:
    return group_options(group)  # conf/GROUP/*.yaml, or ConfigStore entries (trainer=default)


def test_defaults_compose_and_resolve():
    cfg = compose_cfg()
    assert cfg.model.num_classes == 10 and cfg.model.in_channels == 1  # from dataset=digits
    OmegaConf.to_container(cfg, resolve=True)


# Options with settings that have no default (marked ???) and must be given.
REQUIRED = {
    "timm": ["model.name=vit_small_patch14_dinov2"],
    "imagefolder": ["dataset.root=/data/images", "dataset.num_classes=2"],
    "hf": ["dataset.path=/data/hf", "dataset.num_classes=10"],
    "wds": [
        "dataset.train_shards=/data/train.json",
        "dataset.test_shards=/data/test.json",
        "dataset.num_classes=10",
    ],
}


def _converted(option: str, cifar_root, tmp_path) -> list[str]:
    """The CIFAR subset as shards or as a Hugging Face dataset on disk, for dataset=wds|hf."""
    from vitexp.data import ImageData, load_cifar10

    pytest.importorskip("datasets" if option == "hf" else "webdataset")
    cifar = load_cifar10(cifar_root, download=False)
    if option == "wds":
        from vitexp.commands.shards import write_shards

        first_40 = torch.arange(40)  # of each split: enough to read back, and quick to write
        subset = ImageData(cifar.train.subset(first_40), cifar.test.subset(first_40), cifar.classes)
        write_shards(subset, tmp_path / "shards", shard_size=2000)
        return [
            f"dataset.train_shards={tmp_path}/shards/train.json",
            f"dataset.test_shards={tmp_path}/shards/test.json",
        ]
    import datasets

    tables = {
        name: datasets.Dataset.from_dict(
            {
                "image": [x.permute(1, 2, 0).numpy() for x in split.images[:40]],
                "label": split.labels[:40].tolist(),
            },
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
            ),
        )
        for name, split in (("train", cifar.train), ("test", cifar.test))
    }
    datasets.DatasetDict(tables).save_to_disk(str(tmp_path / "hf"))
    return [f"dataset.path={tmp_path}/hf"]


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = composed(f"{group}={option}", *REQUIRED.get(option, []))
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("option", options("dataset"))
def test_every_dataset_config_instantiates(option, cifar_root, tmp_path):
    from tests.test_reliability import _image_folder

    if option == "cifar100":
        pytest.skip("CIFAR-100 is not available offline; its loader is tested with a simulated download")
    root = {"cifar10": cifar_root, "imagefolder": _image_folder(tmp_path / "images")}.get(option)
    overrides = [f"dataset={option}", *REQUIRED.get(option, [])] + ([f"dataset.root={root}"] if root else [])
    if option in ("hf", "wds"):
        overrides += _converted(option, cifar_root, tmp_path)
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


@pytest.mark.slow
def test_cli_composes_from_any_working_directory(tmp_path):
    # PYTHONPATH: this checkout's vitexp, not whichever one is installed
    result = run_cli(
        "experiment=digits",
        "model.hidden_size=96",
        "--cfg",
        "job",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model.hidden_size == 96 and cfg.trainer.max_epochs == 100
    assert cfg.model.mlp_dim == 128 and cfg.model.classifier == "gap"  # the preset over the shared base


@pytest.mark.slow
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


@pytest.mark.slow
def test_model_group_instantiates_on_meta_for_each_size():
    from vitexp.models import build_model

    for option in options("model"):
        cfg = compose_cfg([f"model={option}", *REQUIRED.get(option, [])])
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0


# --------------------------------------------------------------------------- shared bases


# Constructor arguments that take a module, not a setting: no config lists them.
NOT_SETTINGS = {"embed_layer"}


@pytest.mark.parametrize("option", options("model"))
def test_each_model_option_lists_every_constructor_setting_and_nothing_else(option):
    """The model files share a base (conf/model_vit.yaml, model_cct.yaml, model_cvt.yaml) and
    list only their sizes: composed, each is a complete set of keyword arguments."""
    model = composed(f"model={option}", *REQUIRED.get(option, [])).model
    assert model._target_ == model_target(option)  # the tests' shortcut reads the files right
    # The constructor's keyword arguments, shared ones (`**encoder: Unpack[...]`) included.
    arguments = set(keyword_arguments(get_object(model._target_)) or ())
    keys = set(model) - {"_target_", "pretrained", "pretrained_format"}
    assert keys <= arguments, keys - arguments
    assert arguments - keys <= NOT_SETTINGS, arguments - keys
    assert missing_keys(OmegaConf.create({"model": model})) == []  # every size key of the base is set
    assert next(iter(model)) == "_target_" and list(model)[-2:] == ["pretrained", "pretrained_format"]


# The ViT paper's sizes (Dosovitskiy et al. 2021, table 1): width, MLP, heads, depth.
VIT_SIZES = {"ti": (192, 768, 3, 12), "s": (384, 1536, 6, 12), "b": (768, 3072, 12, 12),
             "l": (1024, 4096, 16, 24), "h": (1280, 5120, 16, 32)}  # fmt: skip


@pytest.mark.parametrize("option", [o for o in options("model") if re.fullmatch(r"vit_[a-z]+\d+", o)])
def test_each_vit_size_is_the_one_its_name_says(option):
    size, patch = re.fullmatch(r"vit_([a-z]+)(\d+)", option).groups()
    model = model_config(option)
    assert (model.hidden_size, model.mlp_dim, model.num_heads, model.num_layers) == VIT_SIZES[size]
    assert model.patch_size == int(patch) and model.img_size == (32 if patch == "4" else 224)
    # ... and the settings every size shares, as before the configs shared a base
    assert (model.qkv_bias, model.classifier, model.norm_eps, model.dropout_rate) == (
        True,
        "token",
        1e-6,
        0.0,
    )


def test_the_bases_are_no_options():
    for group in GROUPS:
        assert not [o for o in group_options(group) if "model_" in o or "schema" in o], group
    for base in ("model_vit", "model_cct", "model_cvt"):
        assert (conf_dir() / f"{base}.yaml").is_file()


@pytest.mark.parametrize("command", ["evaluate", "attention", "predict", "export"])
def test_inspection_commands_share_one_hydra_settings_file(command):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(command, return_hydra_config=True)
    hydra_cfg = cfg.hydra
    assert hydra_cfg.output_subdir is None and hydra_cfg.run.dir == "." and hydra_cfg.sweep.subdir == "."
    assert list(hydra_cfg.job_logging.handlers) == ["console"]
    assert hydra_cfg.job_logging.handlers.console.stream == "ext://sys.stderr"
    assert hydra_cfg.runtime.choices["hydra/job_logging"] == "stdout"
    assert hydra_cfg.help.app_name == f"vitexp.{command}"
    assert "output_subdir" not in (conf_dir() / f"{command}.yaml").read_text()


# --------------------------------------------------------------------------- the trainer schema


def test_the_trainer_schema_lists_exactly_the_trainer_settings():
    trainer = compose_cfg().trainer
    assert list(trainer) == [f.name for f in dataclasses.fields(TrainerConfig)]
    assert OmegaConf.get_type(trainer) is TrainerConfig


@pytest.mark.parametrize(
    "override", ["trainer.batch_size=abc", "trainer.compile=maybe", "trainer.max_epochs=2.5", "trainer.foo=1"]
)
def test_a_wrong_type_or_an_unknown_trainer_key_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([override])


def test_a_preset_with_a_wrong_type_fails_at_composition():
    store = ConfigStore.instance()
    store.store(group="experiment", name="_typo", node={"trainer": {"max_epochs": "ten"}}, package="_global_")
    try:
        with pytest.raises(ConfigCompositionException, match=r"trainer\.max_epochs"):
            compose_cfg(["experiment=_typo"])
    finally:
        del store.repo["experiment"]["_typo.yaml"]


@pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None, reason="optuna is not installed (pip install -e '.[sweep]')"
)
@pytest.mark.parametrize("name", options("hparams_search"))
def test_every_hparams_search_composes(name):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", [f"hparams_search={name}", "experiment=digits"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert all(OmegaConf.select(cfg, key) is not None for key in cfg.hydra.sweeper.params)
