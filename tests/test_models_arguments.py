"""The model families share their common arguments instead of restating them: `VisionTransformer`
and `CCT` take the encoder's as `**encoder: Unpack[EncoderArguments]`, the R50 hybrid takes the
ViT's as `**kwargs: Unpack[VisionTransformerArguments]`. The one argument reader
(`vitexp.registry.keyword_arguments`) reads those TypedDicts as it reads named parameters, so a
shared argument is checked like any other in a user's config and in a stored one."""

from __future__ import annotations

from typing import Any, TypedDict

import pytest
import torch
from typing_extensions import Unpack

from tests.helpers import compose_cfg
from vitexp.errors import ConfigError, DataError
from vitexp.models import (
    CCT,
    CvT,
    HybridVisionTransformer,
    VisionTransformer,
    build_model,
    build_stored_model,
)
from vitexp.models.cct import CCT_ENCODER
from vitexp.models.vit import EncoderArguments, VisionTransformerArguments
from vitexp.registry import check_arguments, keyword_arguments, unknown_argument


class Shared(TypedDict, total=False):
    depth: int
    width: int


def takes_shared(*, name: str = "x", **shared: Unpack[Shared]) -> dict[str, Any]:
    return {"name": name, **shared}


def takes_anything(*, name: str = "x", **kwargs: Any) -> None:
    del name, kwargs


def test_the_reader_adds_an_unpacked_typeddicts_keys_to_the_named_parameters() -> None:
    assert keyword_arguments(takes_shared) == ["name", "depth", "width"]
    assert unknown_argument(takes_shared, ["name", "width", "heigth"]) == (
        "heigth",
        ["name", "depth", "width"],
    )
    with pytest.raises(
        ConfigError, match=r"^cfg\.widht is not an argument of takes_shared; did you mean cfg\.width\?$"
    ):
        check_arguments(takes_shared, ["depth", "widht"], "cfg")
    # An untyped **kwargs takes any keyword: nothing to check, as before.
    assert keyword_arguments(takes_anything) is None
    check_arguments(takes_anything, ["whatever"], "cfg")


@pytest.mark.parametrize(
    ("family", "own", "shared"),
    [
        (VisionTransformer, {"img_size", "patch_size", "hidden_size", "classifier"}, EncoderArguments),
        (CCT, {"img_size", "hidden_size", "conv_layers", "position_embedding"}, EncoderArguments),
        (
            HybridVisionTransformer,
            {"patch_size", "resnet_layers", "resnet_width_factor"},
            VisionTransformerArguments,
        ),
    ],
)
def test_each_family_takes_its_own_arguments_and_the_shared_ones(family, own, shared) -> None:
    names = keyword_arguments(family)
    assert names is not None and len(names) == len(set(names))
    assert own <= set(names) and set(shared.__annotations__) <= set(names)
    assert "kwargs" not in names and "encoder" not in names


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"_target_": "vitexp.models.HybridVisionTransformer", "num_layer": 2},
            "model.num_layer is not an argument of HybridVisionTransformer; did you mean model.num_layers?",
        ),
        (
            {"_target_": "vitexp.models.HybridVisionTransformer", "hiden_size": 32},
            "model.hiden_size is not an argument of HybridVisionTransformer; did you mean model.hidden_size?",
        ),
        (
            {"_target_": "vitexp.models.CCT", "mlp_dm": 64},
            "model.mlp_dm is not an argument of CCT; did you mean model.mlp_dim?",
        ),
    ],
)
def test_a_misspelt_shared_argument_is_one_line_with_the_suggestion(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_model(cfg)
    assert str(error.value) == message


def test_an_added_key_on_the_command_line_reaches_the_same_check() -> None:
    cfg = compose_cfg(["model=vit_r50_b16", "+model.num_layer=2", "dataset=fake"])
    with pytest.raises(ConfigError) as error, torch.device("meta"):
        build_model(cfg.model)
    assert str(error.value) == (
        "model.num_layer is not an argument of HybridVisionTransformer; did you mean model.num_layers?"
    )


def _stored_hybrid(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "_target_": "vitexp.models.HybridVisionTransformer", "img_size": 16, "num_classes": 3,
        "hidden_size": 32, "mlp_dim": 64, "num_heads": 4, "num_layers": 1, "resnet_layers": [1, 1],
    }  # fmt: skip
    return cfg | overrides


def test_a_stored_config_is_checked_against_the_shared_arguments_too() -> None:
    model = build_stored_model(_stored_hybrid(), source="a.pt")
    assert isinstance(model, HybridVisionTransformer) and len(model.encoder.blocks) == 1
    with pytest.raises(
        DataError, match=r"^a\.pt: its stored model config has layers=3, which HybridVisionTransformer"
    ):
        build_stored_model(_stored_hybrid(layers=3), source="a.pt")


def test_the_shared_arguments_reach_the_encoder() -> None:
    settings = {k: v for k, v in _stored_hybrid().items() if k != "_target_"}
    hybrid = HybridVisionTransformer(**settings, locality_attention=True, layer_scale_init=0.1)
    assert hybrid.encoder.blocks[0].attn.locality  # the hybrid takes every encoder setting the ViT does
    # CCT's defaults for the shared settings are the official code's, not the ViT's.
    cct = CCT()
    blocks = cct.encoder.blocks
    assert len(blocks) == CCT_ENCODER["num_layers"] == 7
    assert blocks[0].attn.qkv.bias is None and blocks[0].ffn.fc1.out_features == 512
    assert (
        blocks[-1].drop_path.drop_prob == pytest.approx(0.1) and blocks[0].attn.attention_dropout_rate == 0.1
    )
    assert cct.encoder.encoder_norm.eps == 1e-5
    # ... and a call's own value wins over them.
    assert CCT(num_layers=2, qkv_bias=True).encoder.blocks[0].attn.qkv.bias is not None


def test_cvt_keeps_its_explicit_arguments() -> None:
    # CvT shares no arguments with the other families (its sizes are per stage); its
    # convolutional projections' geometry is passed on inside as one TypedDict.
    names = keyword_arguments(CvT)
    assert names is not None and {"kernel_size", "stride_q", "stride_kv", "padding_q", "padding_kv"} <= set(
        names
    )
