"""Building models from configs: a user's (`build_model`) and one stored in a checkpoint
(`build_stored_model`, used by `load_trained` and so by every inspection command).

A stored config is written by whoever made the file. The refusals below are checked against
payloads that are live: Hydra's `instantiate`, which rebuilt stored models before, runs each of
them (the control cases), while the stored-model path refuses them in one line before calling
anything: the marker file never appears and the victim file keeps its content.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from tests.helpers import run_cli
from vitexp.errors import ConfigError, DataError
from vitexp.inference import load_trained
from vitexp.models import (
    CCT,
    CvT,
    HybridVisionTransformer,
    VisionTransformer,
    build_model,
    build_stored_model,
    timm_model,
)
from vitexp.models.build import MODEL_REGISTRY
from vitexp.training.checkpoint import save_checkpoint

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format1_digits_step15.pt"


@pytest.fixture(scope="module")
def fixture_checkpoint() -> dict[str, Any]:
    """The committed format-1 checkpoint: a tiny gap-pooling ViT on 8×8 digits, EMA on."""
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def _tiny_vit_cfg(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_target_": "vitexp.models.VisionTransformer",
        "img_size": 8, "patch_size": 2, "in_channels": 1, "num_classes": 10, "hidden_size": 32,
        "mlp_dim": 64, "num_heads": 2, "num_layers": 2, "classifier": "gap",
    }  # fmt: skip
    return cfg | overrides


# --- build_model: a user's config --------------------------------------------------------------


def test_unknown_argument_is_a_config_error_naming_the_class() -> None:
    with pytest.raises(ConfigError) as error:
        build_model(_tiny_vit_cfg(foo=1))
    message = str(error.value)
    assert message.startswith(
        "model.foo is not an argument of VisionTransformer; its arguments are img_size,"
    )
    assert "\n" not in message


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            _tiny_vit_cfg(hiden_size=32),
            "model.hiden_size is not an argument of VisionTransformer; did you mean model.hidden_size?",
        ),
        (
            _tiny_vit_cfg(drop_path=0.1),
            "model.drop_path is not an argument of VisionTransformer; did you mean model.drop_path_rate?",
        ),
        (
            {"_target_": "vitexp.models.CCT", "conv_layer": 2},
            "model.conv_layer is not an argument of CCT; did you mean model.conv_layers?",
        ),
        (
            {"_target_": "vitexp.models.CvT", "num_head": [1, 2, 3]},
            "model.num_head is not an argument of CvT; did you mean model.num_heads?",
        ),
    ],
)  # fmt: skip
def test_misspelt_argument_suggests_the_closest(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_model(cfg)
    assert str(error.value) == message


def test_target_that_cannot_be_imported_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"model\._target_=vitexp\.models\.VisionTransformr cannot be imported"
    ):
        build_model(_tiny_vit_cfg(_target_="vitexp.models.VisionTransformr"))
    with pytest.raises(ConfigError, match=r"model\._target_=None must name the model class"):
        build_model({"hidden_size": 32})


class BuggyModel(nn.Module):
    """A constructor with a bug of its own: the TypeError it raises must reach the caller as is."""

    def __init__(self, *, width: int = 4) -> None:
        super().__init__()
        raise TypeError(f"unsupported operand type(s) for +: 'int' and 'str' (width={width})")


def test_errors_from_inside_a_constructor_are_not_wrapped() -> None:
    with pytest.raises(TypeError, match=r"unsupported operand .*width=3") as error:
        build_model({"_target_": f"{__name__}.BuggyModel", "width": 3})
    assert type(error.value) is TypeError


def test_bad_values_pass_through_as_the_constructors_config_errors() -> None:
    with pytest.raises(ConfigError) as error:
        build_model(_tiny_vit_cfg(drop_path_rate=1.5))
    assert str(error.value) == "drop_path_rate=1.5 must be in [0, 1)"


@pytest.mark.slow
def test_cli_reports_a_misspelt_model_setting_in_one_line(tmp_path: Path) -> None:
    result = run_cli("+model.hiden_size=32", "dataset=digits", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.hiden_size is not an argument of VisionTransformer; did you mean model.hidden_size?" in (
        result.stdout + result.stderr
    )
    assert "Traceback" not in result.stderr


# --- build_stored_model: a config read from a file ---------------------------------------------


def test_registry_holds_each_model_class_under_its_public_and_module_paths() -> None:
    expected = {
        "vitexp.models.VisionTransformer": VisionTransformer,
        "vitexp.models.vit.VisionTransformer": VisionTransformer,
        "vitexp.models.HybridVisionTransformer": HybridVisionTransformer,
        "vitexp.models.hybrid.HybridVisionTransformer": HybridVisionTransformer,
        "vitexp.models.CvT": CvT,
        "vitexp.models.cvt.CvT": CvT,
        "vitexp.models.CCT": CCT,
        "vitexp.models.cct.CCT": CCT,
        # timm's models, by name (model=timm): the builder refuses arguments that read files.
        "vitexp.models.timm_model": timm_model,
        "vitexp.models.timm_models.timm_model": timm_model,
    }
    assert expected == MODEL_REGISTRY


@pytest.mark.parametrize("target", ["vitexp.models.VisionTransformer", "vitexp.models.vit.VisionTransformer"])
def test_stored_config_builds_and_ignores_its_pretrained_file(target: str, tmp_path: Path) -> None:
    cfg = _tiny_vit_cfg(_target_=target, pretrained=str(tmp_path / "gone.npz"), pretrained_format="npz")
    model = build_stored_model(cfg, source="last.pt")
    assert isinstance(model, VisionTransformer) and model.img_size == (8, 8)
    assert not (tmp_path / "gone.npz").exists()  # never read, and nothing was written in its place


def test_stored_config_that_the_class_refuses_is_a_data_error_naming_the_file() -> None:
    with pytest.raises(DataError) as error:
        build_stored_model(_tiny_vit_cfg(drop_path_rate=1.5), source="runs/a/last.pt")
    assert str(error.value) == (
        "runs/a/last.pt: its stored model config cannot be built (drop_path_rate=1.5 must be in [0, 1)); "
        "the checkpoint is damaged or was edited"
    )
    # A string is data, not a call: naming a function in an argument builds nothing either.
    with pytest.raises(DataError, match=r"embed_layer='builtins\.open' must be a module class"):
        build_stored_model(_tiny_vit_cfg(embed_layer="builtins.open"), source="last.pt")


def _payloads(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Stored model configs that would act on files if called, with what the refusal says."""
    marker, victim = tmp_path / "marker", tmp_path / "victim.txt"
    return {
        "touch": ({"_target_": "pathlib.Path.touch", "self": str(marker)}, "_target_='pathlib.Path.touch'"),
        "truncate": (
            {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
            "_target_='builtins.open'",
        ),
        "system": ({"_target_": "os.system", "command": f"touch {marker}"}, "_target_='os.system'"),
        "nested": (
            _tiny_vit_cfg(embed_layer={"_target_": "pathlib.Path.touch", "self": str(marker)}),
            "model.embed_layer._target_: a nested Hydra directive",
        ),
        "nested-in-list": (
            _tiny_vit_cfg(img_size=[{"_target_": "builtins.open", "file": str(victim), "mode": "w"}, 8]),
            "model.img_size[0]._target_: a nested Hydra directive",
        ),
    }


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


def test_payloads_are_live_under_hydra_instantiate(tmp_path: Path) -> None:
    """Control: what the refused configs do when called, as `instantiate` did with them."""
    victim = _victim(tmp_path)
    payloads = _payloads(tmp_path)
    instantiate(payloads["touch"][0])
    assert (tmp_path / "marker").exists()
    (tmp_path / "marker").unlink()
    instantiate(payloads["truncate"][0]).close()
    assert victim.read_text() == ""
    with pytest.raises(Exception):  # noqa: B017 - the nested target runs before the model fails
        instantiate(payloads["nested"][0])
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("payload", ["touch", "truncate", "system", "nested", "nested-in-list"])
def test_stored_payloads_are_refused_before_anything_runs(payload: str, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    cfg, expected = _payloads(tmp_path)[payload]
    with pytest.raises(DataError) as error:
        build_stored_model(cfg, source="evil.pt")
    message = str(error.value)
    assert message.startswith("evil.pt: ") and expected in message and "\n" not in message
    assert not (tmp_path / "marker").exists()
    assert victim.read_text() == "precious"


def _checkpoint_with_model_config(ckpt: dict[str, Any], model_cfg: dict[str, Any], path: Path) -> Path:
    state = copy.deepcopy(ckpt)
    state["config"]["model"] = model_cfg
    save_checkpoint(state, path)
    return path


@pytest.mark.parametrize("payload", ["touch", "truncate", "system", "nested"])
def test_commands_refuse_checkpoints_with_payloads(
    payload: str, fixture_checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    from vitexp.commands.attention import attention_figure
    from vitexp.commands.evaluate import evaluate_checkpoint

    victim = _victim(tmp_path)
    cfg, expected = _payloads(tmp_path)[payload]
    path = _checkpoint_with_model_config(fixture_checkpoint, cfg, tmp_path / "last.pt")
    for command in (
        lambda: evaluate_checkpoint(path, device="cpu"),
        lambda: attention_figure(path, indices=[0], device="cpu"),
        lambda: load_trained(path),
    ):
        with pytest.raises(DataError) as error:
            command()
        message = str(error.value)
        assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    assert not (tmp_path / "marker").exists()
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "victim.txt"]  # no report, no figure


def test_pretrained_checkpoint_with_a_payload_gives_only_its_weights(
    fixture_checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    victim = _victim(tmp_path)
    cfg, _ = _payloads(tmp_path)["touch"]
    path = _checkpoint_with_model_config(fixture_checkpoint, cfg, tmp_path / "evil.pt")
    model = build_model(_tiny_vit_cfg(pretrained=str(path)))
    loaded = model.state_dict()
    assert loaded.keys() == fixture_checkpoint["model"].keys()
    for key, value in fixture_checkpoint["model"].items():
        assert torch.equal(loaded[key], value), key
    assert not (tmp_path / "marker").exists()
    assert victim.read_text() == "precious"


def test_committed_format1_checkpoint_rebuilds_through_the_stored_path(
    fixture_checkpoint: dict[str, Any],
) -> None:
    trained = load_trained(FIXTURE)
    model = trained.model
    assert type(model) is VisionTransformer
    assert trained.img_size == (8, 8) and trained.num_classes == 10 and trained.in_channels == 1
    assert model.classifier == "gap" and len(model.encoder.layer) == 2
    # The run had EMA on: the weight average is what evaluation uses.
    state = model.state_dict()
    assert state.keys() == fixture_checkpoint["ema"].keys()
    for key, value in fixture_checkpoint["ema"].items():
        assert torch.equal(state[key], value), key
    assert any(not torch.equal(fixture_checkpoint["ema"][k], fixture_checkpoint["model"][k]) for k in state)
