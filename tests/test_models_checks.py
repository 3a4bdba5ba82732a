"""Settings every model family checks before building: a value out of its domain is a one-line
ConfigError that names the setting and its range, for the ViT, the R50 hybrid, CvT and CCT alike,
whether the model is built directly or from its config (as `python -m vitexp` does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers import compose_cfg
from vitexp.errors import ConfigError
from vitexp.models import CCT, CvT, HybridVisionTransformer, VisionTransformer, build_model


def _vit(**overrides: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(
        img_size=16, patch_size=4, num_classes=7, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2
    )
    return VisionTransformer(**(kwargs | overrides))


def _hybrid(**overrides: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(
        img_size=16,
        num_classes=7,
        hidden_size=32,
        mlp_dim=64,
        num_heads=4,
        num_layers=1,
        resnet_layers=[1, 1],
    )
    return HybridVisionTransformer(**(kwargs | overrides))


def _cvt(**overrides: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(
        img_size=16, num_classes=7, hidden_size=[16, 32], num_heads=[1, 2], num_layers=[1, 1],
        patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], drop_path_rate=[0.0, 0.1],
    )  # fmt: skip
    return CvT(**(kwargs | overrides))


def _cct(**overrides: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(
        img_size=16, num_classes=7, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=1, conv_channels=8
    )
    return CCT(**(kwargs | overrides))


FAMILIES: dict[str, Callable[..., nn.Module]] = {"vit": _vit, "hybrid": _hybrid, "cvt": _cvt, "cct": _cct}

# Settings every family takes under the same name and meaning.
COMMON = [
    ({"dropout_rate": 1.0}, "dropout_rate=1.0 must be in [0, 1)"),
    ({"dropout_rate": -0.1}, "dropout_rate=-0.1 must be in [0, 1)"),
    ({"attention_dropout_rate": 1.5}, "attention_dropout_rate=1.5 must be in [0, 1)"),
    ({"img_size": 0}, "img_size=0 must be positive"),
    ({"img_size": [16, 16, 3]}, "img_size=[16, 16, 3] must be a positive integer or a [height, width] pair"),
    ({"in_channels": 0}, "in_channels=0 must be positive"),
    ({"num_classes": -1}, "num_classes=-1 must be an integer >= 0"),
    ({"norm_eps": 0.0}, "norm_eps=0.0 must be > 0"),
    ({"norm_eps": -1e-6}, "norm_eps=-1e-06 must be > 0"),
]
# The plain ViT, the hybrid and CCT share the transformer encoder's settings.
ENCODER = [
    ({"drop_path_rate": 1.5}, "drop_path_rate=1.5 must be in [0, 1)"),
    ({"hidden_size": 0}, "hidden_size=0 must be positive"),
    ({"hidden_size": "abc"}, "hidden_size='abc' must be a positive integer"),
    ({"mlp_dim": 0}, "mlp_dim=0 must be positive"),
    ({"num_heads": -2}, "num_heads=-2 must be positive"),
    ({"num_layers": 0}, "num_layers=0 must be positive"),
    ({"layer_scale_init": 0.0}, "layer_scale_init=0.0 must be > 0 or null"),
    ({"layer_scale_init": -1e-4}, "layer_scale_init=-0.0001 must be > 0 or null"),
]
PATCHES = [
    ({"patch_size": 0}, "patch_size=0 must be positive"),
    ({"classifier": "mean"}, "classifier='mean' is not one of 'token', 'gap', 'seqpool'"),
    ({"representation_size": -8}, "representation_size=-8 must be a positive integer or null"),
]
CASES = (
    [(family, *case) for family in FAMILIES for case in COMMON]
    + [(family, *case) for family in ("vit", "hybrid", "cct") for case in ENCODER]
    + [(family, *case) for family in ("vit", "hybrid") for case in PATCHES]
    + [
        ("cvt", {"drop_path_rate": [0.0, 1.5]}, "drop_path_rate[1]=1.5 must be in [0, 1)"),
        ("cvt", {"drop_path_rate": 1.0}, "drop_path_rate=1.0 must be in [0, 1)"),
        ("cvt", {"hidden_size": [16, 0]}, "hidden_size[1]=0 must be positive"),
        ("cvt", {"num_heads": [0, 2]}, "num_heads[0]=0 must be positive"),
        ("cvt", {"num_layers": [1, 0]}, "num_layers[1]=0 must be positive"),
        ("cvt", {"num_layers": 3}, "num_layers=3 must list the layers of each stage"),
        ("cvt", {"patch_size": [3, 0]}, "patch_size[1]=0 must be positive"),
        ("cvt", {"mlp_ratio": 0}, "mlp_ratio=0 must be a positive number"),
        ("cvt", {"kernel_size": 0}, "kernel_size=0 must be positive"),
        ("cct", {"conv_layers": 0}, "conv_layers=0 must be positive"),
        ("cct", {"pool_stride": 0}, "pool_stride=0 must be positive"),
        ("cct", {"position_embedding": "rope"}, "position_embedding='rope' is not one of"),
    ]
)


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    CASES,
    ids=[f"{c[0]}-{next(iter(c[1]))}={c[1][next(iter(c[1]))]}" for c in CASES],
)
def test_out_of_domain_settings_are_one_line_config_errors(
    family: str, overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        FAMILIES[family](**overrides)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_edges_of_the_domains_are_accepted(family: str) -> None:
    edges: dict[str, Any] = {"dropout_rate": 0.0, "attention_dropout_rate": 0.999, "norm_eps": 1e-12}
    if family != "cvt":
        edges |= {"drop_path_rate": 0.0, "layer_scale_init": None}
    model = FAMILIES[family](num_classes=0, **edges)  # num_classes=0: a feature extractor, no head
    assert isinstance(model.head, nn.Identity)
    assert model.eval()(torch.randn(1, 3, 16, 16)).shape[0] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=vit_s16", "model.drop_path_rate=1.5"], "drop_path_rate=1.5 must be in [0, 1)"),
        (
            ["model=vit_r50_b16", "model.layer_scale_init=0"],
            "layer_scale_init=0 must be > 0 or null (no LayerScale)",
        ),
        (["model=cvt_13", "model.drop_path_rate=[0.0,0.0,1.5]"], "drop_path_rate[2]=1.5 must be in [0, 1)"),
        (["model=cct_7_3x1", "model.norm_eps=0"], "norm_eps=0 must be > 0"),
        (["model=vit_ti16", "model.hidden_size=abc"], "hidden_size='abc' must be a positive integer"),
    ],
)
def test_config_overrides_reach_the_same_checks(overrides: list[str], message: str) -> None:
    cfg = compose_cfg([*overrides, "dataset=fake"])
    with pytest.raises(ConfigError) as error, torch.device("meta"):
        build_model(cfg.model)
    assert str(error.value) == message
