"""The convolutional families: the ViT paper's R50+ViT hybrid, CvT and CCT.

Each is checked against its reference: the hybrid against timm (parameter count of the real
`vit_base_r50_s16_224`, logits after importing a timm state dict and an `.npz` in the official
key layout), CvT against `transformers.CvtForImageClassification` at `CvtConfig()`'s shape, CCT
against the official code's published parameter counts. Then what every model of this package
must do: build from its config with every dataset, train (every parameter gets a gradient), refuse
bad image sizes in one line, and round-trip through our checkpoints.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from tests.helpers import (
    assert_final_is_last_checkpoint,
    compose_cfg,
    model_config,
    model_options,
    model_target,
)
from tests.test_convert import _npz_arrays
from vitexp.config import conf_dir
from vitexp.errors import ConfigError
from vitexp.models import CCT, CvT, HybridVisionTransformer, VisionTransformer, build_model
from vitexp.models.weights import load_pretrained
from vitexp.models.weights.conv import convert_hf_cvt, convert_timm_hybrid
from vitexp.training.optim import build_optimizer

VIT_TARGET = "vitexp.models.VisionTransformer"
TIMM_TARGET = "vitexp.models.timm_model"
# vitexp's convolutional families (model=timm builds timm's models: tests/test_timm_models.py).
CONV_MODELS = [n for n in model_options() if model_target(n) not in (VIT_TARGET, TIMM_TARGET)]


def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Random weights everywhere, and BatchNorm statistics that are not the identity (zero biases,
    unit norms and fresh running stats would hide swapped or misplaced tensors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.2 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return model.eval()


def _images(size: int | tuple[int, int], channels: int = 3, batch: int = 2, seed: int = 1) -> Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def _assert_same(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_issue_models_are_configured():
    for name in ("vit_r50_b16", "cvt_13", "cvt_21", "cvt_cifar", "cct_7_3x1", "cct_2_3x2", "cct_7_3x2"):
        assert name in CONV_MODELS


# --- R50+ViT hybrid vs timm ------------------------------------------------------------------------

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def _timm_hybrid(layers: tuple[int, ...], seed: int = 0, **overrides: Any) -> nn.Module:
    """A timm hybrid as `vit_base_r50_s16_224` builds it (timm's `_resnetv2`), at another size."""
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    backbone = ResNetV2(
        layers=layers, num_classes=0, global_pool="", preact=False, stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        img_size=32, patch_size=1, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=10,
        embed_layer=partial(HybridEmbed, backbone=backbone),
    )  # fmt: skip
    return _perturb(timm_vit.VisionTransformer(**(kwargs | overrides)), seed)


def _our_hybrid(layers: tuple[int, ...], **overrides: Any) -> HybridVisionTransformer:
    kwargs: dict[str, Any] = dict(
        img_size=32,
        num_classes=10,
        hidden_size=64,
        mlp_dim=128,
        num_heads=4,
        num_layers=2,
        resnet_layers=layers,
    )
    return HybridVisionTransformer(**(kwargs | overrides)).eval()


def test_hybrid_parameter_count_equals_timm_vit_base_r50_s16_224():
    import timm

    with torch.device("meta"):
        reference = timm.create_model("vit_base_r50_s16_224")  # the in21k variant: no head
        reference_1k = timm.create_model("vit_base_r50_s16_224", num_classes=1000)
        ours = HybridVisionTransformer(num_classes=0)
        ours_1k = build_model(
            compose_cfg(["model=vit_r50_b16", "dataset=fake", "model.num_classes=1000"]).model
        )
    assert _count(ours) == _count(reference) == 97_890_112
    assert _count(ours_1k) == _count(reference_1k) == 98_659_112
    assert ours_1k.embeddings.grid_size == (14, 14) and ours_1k.stride == 16


# Two stages (stride 8) of one and two units: every naming case of R50's three stages, fast.
SMALL_LAYERS = (1, 2)


def test_hybrid_logits_match_timm_after_importing_its_state_dict(tmp_path):
    source = _timm_hybrid(SMALL_LAYERS)
    torch.save(source.state_dict(), tmp_path / "hybrid.pth")
    ours = _our_hybrid(SMALL_LAYERS)
    assert _count(ours) == _count(source)
    load_pretrained(ours, tmp_path / "hybrid.pth")
    x = _images(32)
    with torch.no_grad():
        _assert_same(ours(x), source(x))


def _hybrid_npz_arrays(timm_model: nn.Module) -> dict[str, np.ndarray]:
    """A timm hybrid's weights under the key names and shapes of the official R50+ViT `.npz`
    files (`conv_root`, `gn_root`, `blockN/unitM/{convK,gnK,conv_proj,gn_proj}`)."""
    out = _npz_arrays(timm_model)
    backbone = timm_model.patch_embed.backbone
    arrays: dict[str, Tensor] = {
        "conv_root/kernel": backbone.stem.conv.weight.permute(2, 3, 1, 0),  # OIHW → HWIO
        "gn_root/scale": backbone.stem.norm.weight,
        "gn_root/bias": backbone.stem.norm.bias,
    }
    for i, stage in enumerate(backbone.stages):
        for j, block in enumerate(stage.blocks):
            unit = f"block{i + 1}/unit{j + 1}/"
            parts = [
                (f"conv{r}", f"gn{r}", getattr(block, f"conv{r}"), getattr(block, f"norm{r}"))
                for r in (1, 2, 3)
            ]
            if block.downsample is not None:
                parts.append(("conv_proj", "gn_proj", block.downsample.conv, block.downsample.norm))
            for conv_name, norm_name, conv, norm in parts:
                arrays[unit + conv_name + "/kernel"] = conv.weight.permute(2, 3, 1, 0)
                arrays[unit + norm_name + "/scale"] = norm.weight
                arrays[unit + norm_name + "/bias"] = norm.bias
    out.update({key: value.detach().contiguous().numpy() for key, value in arrays.items()})
    return out


def test_hybrid_npz_in_the_official_layout_round_trips(tmp_path):
    source = _timm_hybrid(SMALL_LAYERS)
    path = tmp_path / "R50+ViT-tiny.npz"
    np.savez(path, **_hybrid_npz_arrays(source))
    x = _images(32)
    with torch.no_grad():
        expected = source(x)
        # The writer is checked by timm's own reader of the official files first, so a mistake
        # in it cannot cancel one in our converter.
        timm_read = _timm_hybrid(SMALL_LAYERS, seed=5)
        timm_vit._load_weights(timm_read, str(path))
        _assert_same(timm_read(x), expected)
        ours = _our_hybrid(SMALL_LAYERS)
        load_pretrained(ours, path)  # detected as npz
        _assert_same(ours(x), expected)


@pytest.mark.slow
def test_hybrid_full_size_logits_match_timm_vit_base_r50_s16_224():
    import timm

    source = _perturb(timm.create_model("vit_base_r50_s16_224", num_classes=1000), scale=0.02)
    ours = HybridVisionTransformer(num_classes=1000).eval()
    ours.load_state_dict(convert_timm_hybrid(source.state_dict()))
    x = _images(224, batch=1)
    with torch.no_grad():
        _assert_same(ours(x), source(x))


def test_hybrid_works_at_any_multiple_of_its_stride_and_refuses_others():
    model = _our_hybrid(SMALL_LAYERS, img_size=(40, 56))
    assert model.embeddings.grid_size == (5, 7) and model.img_size == (40, 56) and model.stride == 8
    assert model(_images((40, 56))).shape == (2, 10)
    with pytest.raises(
        ConfigError, match=r"img_size=40 is not divisible by 16.*multiple of 16 \(e\.g\. 32\)"
    ) as err:
        HybridVisionTransformer(img_size=40)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"img_size=48 is not divisible by 32, .* times patch_size=2"):
        HybridVisionTransformer(img_size=48, patch_size=2)


def test_hybrid_position_embeddings_are_resampled_for_another_image_size(tmp_path):
    source = _perturb(_our_hybrid(SMALL_LAYERS, img_size=32))
    torch.save({"model": source.state_dict()}, tmp_path / "last.pt")
    bigger = _our_hybrid(SMALL_LAYERS, img_size=64)
    load_pretrained(bigger, tmp_path / "last.pt")  # our own format, 4×4 → 8×8 grid
    assert bigger.embeddings.position_embeddings.shape == (1, 65, 64)
    torch.testing.assert_close(bigger.embeddings.cls_token, source.embeddings.cls_token)
    torch.testing.assert_close(
        bigger.embeddings.backbone.root.conv.weight, source.embeddings.backbone.root.conv.weight
    )


def test_hybrid_and_plain_vit_weights_are_not_confused(tmp_path):
    plain = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
    )
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(
        ConfigError, match="holds timm weights of a plain ViT, not R50\\+ViT hybrid weights"
    ) as err:
        load_pretrained(_our_hybrid(SMALL_LAYERS), tmp_path / "plain.pth")
    assert "\n" not in str(err.value)
    torch.save(_timm_hybrid(SMALL_LAYERS).state_dict(), tmp_path / "hybrid.pth")
    vit = VisionTransformer(
        img_size=32, patch_size=8, num_classes=10, hidden_size=64, mlp_dim=128, num_heads=4, num_layers=2
    )
    with pytest.raises(
        ConfigError, match=r"embeddings\.patch_embeddings\.weight is \(64, 512, 1, 1\) in the"
    ):
        load_pretrained(vit, tmp_path / "hybrid.pth")
    with pytest.raises(ConfigError, match=r"pretrained_format=npz but .* holds timm weights"):
        load_pretrained(_our_hybrid(SMALL_LAYERS), tmp_path / "hybrid.pth", fmt="npz")


def test_hybrid_starts_each_residual_unit_as_its_shortcut():
    model = _our_hybrid(SMALL_LAYERS)
    gn3 = [m.gn3.weight for m in model.embeddings.backbone.modules() if hasattr(m, "gn3")]
    assert len(gn3) == sum(SMALL_LAYERS) and all(torch.count_nonzero(w) == 0 for w in gn3)


# --- CvT vs Hugging Face ----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_cvt() -> nn.Module:
    """`CvtForImageClassification(CvtConfig())`: CvT-13 with the config's default 2 labels."""
    return _perturb(transformers.CvtForImageClassification(transformers.CvtConfig()))


def test_cvt_parameter_counts_equal_transformers():
    config = transformers.CvtConfig()
    with torch.device("meta"):
        reference = transformers.CvtForImageClassification(config)
        ours = CvT(num_classes=config.num_labels)
        reference_21 = transformers.CvtForImageClassification(
            transformers.CvtConfig(depth=[1, 4, 16], num_labels=1000)
        )
        ours_21 = build_model(compose_cfg(["model=cvt_21", "dataset=fake", "model.num_classes=1000"]).model)
        ours_13 = build_model(compose_cfg(["model=cvt_13", "dataset=fake", "model.num_classes=1000"]).model)
    assert _count(ours) == _count(reference) == 19_613_250
    assert _count(ours_21) == _count(reference_21) == 31_622_696
    assert _count(ours_13) == 19_997_480


@pytest.mark.slow
def test_cvt_logits_match_transformers_after_import(hf_cvt, tmp_path):
    hf_cvt.save_pretrained(tmp_path / "cvt-13")  # a save_pretrained folder, as from the Hub
    ours = CvT(num_classes=2).eval()
    load_pretrained(ours, tmp_path / "cvt-13")  # detected as hf
    x = _images(224, batch=1)
    with torch.no_grad():
        _assert_same(ours(x), hf_cvt(x).logits)
        # The arithmetic is the same, not merely close: in float64 the two agree to rounding (at
        # 32 px, since float64 convolutions are slow on the CPU; CvT runs at any size).
        small = _images(32, batch=1).double()
        try:
            torch.testing.assert_close(
                ours.double()(small), hf_cvt.double()(small).logits, rtol=0, atol=1e-10
            )
        finally:
            hf_cvt.float()


def test_cvt_without_class_token_matches_transformers_mean_pooling():
    config = transformers.CvtConfig(
        embed_dim=[16, 32, 48],
        num_heads=[1, 2, 3],
        depth=[1, 2, 3],  # transformers' CvtStage indexes its drop-path rates by stage: depth[s] > s
        cls_token=[False, False, False],
        num_labels=5,
    )
    reference = _perturb(transformers.CvtForImageClassification(config))
    ours = CvT(
        num_classes=5, hidden_size=[16, 32, 48], num_heads=[1, 2, 3], num_layers=[1, 2, 3], class_token=False
    )
    ours.load_state_dict(convert_hf_cvt(reference.state_dict()))
    x = _images(64)
    with torch.no_grad():
        # CvtForImageClassification's own branch for this case (layernorm of every token, mean,
        # classifier), spelled out: transformers 5.24 fails on `outputs[1]` before reaching it.
        tokens = reference.cvt(x).last_hidden_state.flatten(2).transpose(1, 2)
        expected = reference.classifier(reference.layernorm(tokens).mean(dim=1))
        _assert_same(ours.eval()(x), expected)


@pytest.mark.slow
def test_cvt_rgb_weights_serve_grayscale_images_exactly(hf_cvt, tmp_path):
    torch.save(hf_cvt.state_dict(), tmp_path / "cvt.bin")
    ours = CvT(num_classes=2, in_channels=1).eval()
    load_pretrained(ours, tmp_path / "cvt.bin", fmt="hf")
    gray = _images(64, channels=1, batch=1)  # CvT runs at any size; small is fast
    with torch.no_grad():
        _assert_same(ours(gray), hf_cvt(gray.expand(-1, 3, -1, -1)).logits)


def _tiny_cvt(**overrides: Any) -> CvT:
    kwargs: dict[str, Any] = dict(
        img_size=16, num_classes=7, hidden_size=[16, 32], num_heads=[1, 2], num_layers=[1, 2],
        patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], drop_path_rate=[0.0, 0.1],
    )  # fmt: skip
    return CvT(**(kwargs | overrides))


def test_cvt_attention_maps_are_softmax_rows_that_reproduce_the_fused_path():
    model = _perturb(_tiny_cvt())
    x = _images(16)
    maps = model.attention_maps(x)
    # stage 1: 8×8 queries, 4×4 keys; stage 2: class token + 4×4 queries, class token + 2×2 keys
    assert [tuple(m.shape) for m in maps] == [(2, 1, 64, 16), (2, 2, 17, 5), (2, 2, 17, 5)]
    for attention in maps:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    block = model.stages[1].layer[0]
    tokens, grid, prefix = model.stages[1].tokens(model.stages[0](x)[0])
    h = block.attention_norm(tokens)
    _, _, v = block.attn._qkv(h, grid, prefix)
    manual = (maps[1] @ v).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(block.attn.out(manual), block.attn(h, grid, prefix), atol=1e-5, rtol=1e-5)


def test_cvt_needs_no_position_embeddings_so_runs_at_other_sizes():
    model = _tiny_cvt().eval()
    assert model(_images(32)).shape == (2, 7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 100}, r"img_size=100 is not divisible by 16, the total stride .*\(e\.g\. 96\)"),
        ({"hidden_size": [64, 190, 384]}, "hidden_size=190 is not divisible by num_heads=3"),
        ({"num_heads": [1, 3]}, r"num_heads=\[1, 3\] has 2 entries but the model has 3 stages"),
    ],
)
def test_cvt_bad_arguments_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        CvT(**overrides)
    assert "\n" not in str(err.value)


# --- CCT -------------------------------------------------------------------------------------------

# Parameter counts with 10 classes in SHI-Labs/Compact-Transformers' README (in millions).
CCT_OFFICIAL_PARAMS = {
    "cct_2_3x2": 0.284,
    "cct_4_3x2": 0.482,
    "cct_6_3x2": 3.327,
    "cct_7_3x2": 3.853,
    "cct_7_3x1": 3.760,
    # The README's 6/3x1 count (3.168M) is of its sine variant, whose table is not a parameter.
    "cct_6_3x1": 3.168,
}


@pytest.mark.parametrize("name", sorted(CCT_OFFICIAL_PARAMS))
def test_cct_parameter_counts_equal_the_official_models(name):
    overrides = ["model.position_embedding=sine"] if name == "cct_6_3x1" else []
    with torch.device("meta"):
        model = build_model(compose_cfg([f"model={name}", "dataset=cifar10", *overrides]).model)
    assert round(_count(model) / 1e6, 3) == CCT_OFFICIAL_PARAMS[name]


def test_cct_7_3x1_has_exactly_the_official_size_and_token_grid():
    model = CCT()
    assert _count(model) == 3_760_139
    assert model.embeddings.grid_size == (16, 16) and model.patch_size == 2


def _tiny_cct(**overrides: Any) -> CCT:
    kwargs: dict[str, Any] = dict(
        img_size=16, num_classes=7, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, conv_layers=2,
        conv_channels=8,
    )  # fmt: skip
    return CCT(**(kwargs | overrides))


def test_cct_sequence_pooling_is_a_softmax_weighted_average_of_the_tokens():
    model = _perturb(_tiny_cct())
    x = _images(16)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 32)
    weights = model.pooling_weights(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    expected = model.head((weights[..., None] * tokens).sum(1))
    torch.testing.assert_close(model(x), expected)


def test_cct_attention_maps_cover_the_token_grid():
    model = _perturb(_tiny_cct())
    maps = model.attention_maps(_images(16))
    assert len(maps) == 2 and maps[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 16))


def test_cct_position_embedding_options():
    sine = _tiny_cct(position_embedding="sine")
    assert "embeddings.position_embeddings" not in sine.state_dict()
    assert _count(sine) == _count(_tiny_cct()) - 16 * 32
    table = sine.embeddings.position_embeddings
    assert torch.allclose(table[0, 1, :2], torch.tensor([np.sin(1.0), np.cos(1.0)], dtype=torch.float32))
    free = _tiny_cct(position_embedding="none").eval()
    assert free(_images(32)).shape == (2, 7)  # no table: any size works
    assert _tiny_cct().no_weight_decay() == {"embeddings.position_embeddings"} and not free.no_weight_decay()
    with pytest.raises(ValueError, match=r"built for \(16, 16\)"):
        _tiny_cct()(_images(32))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 30}, r"img_size=30 is not divisible by 4, the stride of the convolutional tokenizer"),
        ({"position_embedding": "rope"}, "position_embedding='rope' is not one of"),
        ({"hidden_size": 30}, "hidden_size=30 is not divisible by num_heads=4"),
    ],
)
def test_cct_bad_arguments_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        _tiny_cct(**overrides)
    assert "\n" not in str(err.value)


# --- what every model of the package must do -------------------------------------------------------


def _tiny_hybrid() -> HybridVisionTransformer:
    return HybridVisionTransformer(
        img_size=16, num_classes=7, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2,
        resnet_layers=[1, 1], dropout_rate=0.1, drop_path_rate=0.1, representation_size=16,
    )  # fmt: skip


TINY = {
    "hybrid": _tiny_hybrid,
    "cvt": partial(_tiny_cvt, dropout_rate=0.1, attention_dropout_rate=0.1),
    "cvt-gap": partial(_tiny_cvt, class_token=False),
    "cct": partial(_tiny_cct, dropout_rate=0.1),
    "cct-sine": partial(_tiny_cct, position_embedding="sine"),
}


def _zero_by_construction(family: str, model: nn.Module) -> set[str]:
    """Parameters whose exact gradient is always zero, by the maths rather than a wiring mistake.
    The reference models have them too, so they stay for the parameter counts."""
    names = set(dict(model.named_parameters()))
    if family.startswith("cct"):
        # The pooling score's bias shifts every token's score alike; softmax ignores shifts.
        return {"attention_pool.bias"}
    if family.startswith("cvt"):
        # A key bias adds q·b to a whole row of scores: the same shift. (Our ViT fuses it into qkv.bias.)
        zero = {name for name in names if name.endswith("attn.key.bias")}
        # So does the key BatchNorm's bias where every key gets it, i.e. in stages without a class token.
        zero |= {
            f"stages.{i}.layer.{j}.attn.conv_k.bn.bias"
            for i, stage in enumerate(model.stages)
            if stage.cls_token is None
            for j in range(len(stage.layer))
        }
        if model.class_token:
            # The head reads only the class token, whose query bypasses the convolutions: the last
            # block's query convolution shapes only outputs nobody reads.
            zero |= {name for name in names if name.startswith("stages.1.layer.1.attn.conv_q.")}
        return zero
    return set()


@pytest.mark.parametrize("family", sorted(TINY))
def test_forward_backward_reaches_every_parameter(family):
    # Random weights: at initialisation some paths are closed on purpose (the hybrid's last
    # GroupNorm of each unit starts at zero, so the unit starts as its shortcut).
    model = _perturb(TINY[family]()).train()
    loss = F.cross_entropy(model(_images(16, batch=3)), torch.tensor([0, 1, 2]))
    loss.backward()
    # Rounding leaves ~1e-9 where the exact gradient is zero; the real ones here are far larger.
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().max() > 1e-6}
    assert no_grad == _zero_by_construction(family, model), f"parameters without gradient: {no_grad}"
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", CONV_MODELS)
def test_every_config_builds_with_the_right_output_shape(name):
    cfg = compose_cfg([f"model={name}", "dataset=fake"])
    with torch.device("meta"):  # full size, no memory or time
        model = build_model(cfg.model)
        out = model(torch.empty(2, 3, *model.img_size))
    assert out.shape == (2, 10)
    assert model.img_size == (cfg.model.img_size, cfg.model.img_size)
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert model_config(name)["_target_"].startswith("vitexp.models.")


DATASETS = sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (conf_dir() / "optimizer").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_r50_b16", "cvt_cifar", "cct_7_3x1"])
def test_each_family_composes_with_every_dataset_and_optimizer(name):
    for index, dataset in enumerate(DATASETS):
        overrides = [
            f"model={name}",
            f"dataset={dataset}",
            f"optimizer={OPTIMIZERS[index % len(OPTIMIZERS)]}",
        ]
        cfg = compose_cfg(overrides)
        if OmegaConf.is_missing(cfg.dataset, "num_classes"):  # e.g. imagefolder: the user says how many
            cfg = compose_cfg([*overrides, "dataset.num_classes=7"])
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        assert model_cfg["in_channels"] == cfg.dataset.in_channels
        with torch.device("meta"):
            model = build_model(model_cfg)
            out = model(torch.empty(1, cfg.dataset.in_channels, *model.img_size))
            build_optimizer(cfg.optimizer, model)
        assert out.shape == (1, cfg.dataset.num_classes)


# Small versions of each family's configs, for training-loop and checkpoint tests.
SMALL_HYBRID = ["model.img_size=32", "model.resnet_layers=[1]", "model.hidden_size=32", "model.mlp_dim=64",
                "model.num_heads=2", "model.num_layers=1"]  # fmt: skip
SMALL_CVT = ["model.hidden_size=[16,32,64]", "model.num_heads=[1,2,4]", "model.num_layers=[1,1,1]"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides"), [("vit_r50_b16", SMALL_HYBRID), ("cvt_cifar", SMALL_CVT), ("cct_2_3x2", [])]
)
def test_own_checkpoints_round_trip_through_build_model(name, overrides, tmp_path):
    cfg = compose_cfg([f"model={name}", "dataset=digits", *overrides])
    source = _perturb(build_model(cfg.model))
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "last.pt")
    loaded = build_model(
        {**OmegaConf.to_container(cfg.model, resolve=True), "pretrained": str(tmp_path / "last.pt")}
    )
    x = _images(source.img_size, channels=1)
    with torch.no_grad():
        _assert_same(loaded.eval()(x), source(x))


@pytest.mark.slow
def test_weights_of_another_family_or_format_are_refused_in_one_line(hf_cvt, tmp_path):
    torch.save(hf_cvt.state_dict(), tmp_path / "cvt.bin")
    with pytest.raises(ConfigError, match=r"cvt\.bin holds CvT weights, not CCT weights") as err:
        load_pretrained(_tiny_cct(), tmp_path / "cvt.bin")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="pretrained_format='timm' cannot be imported into a CvT"):
        load_pretrained(_tiny_cvt(), tmp_path / "cvt.bin", fmt="timm")
    with pytest.raises(
        ConfigError, match=r"do not fit the model: stages\.0\.embeddings\.projection\.weight is"
    ):
        load_pretrained(_tiny_cvt(), tmp_path / "cvt.bin")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("cct_2_3x2", []), ("cvt_cifar", SMALL_CVT)],
)
def test_two_training_steps_on_the_cifar_subset(name, overrides, cfg_factory, cifar_root):
    from vitexp.training import train

    cfg = cfg_factory(
        f"model={name}", *overrides, "dataset=cifar10", f"dataset.root={cifar_root}", "trainer.max_steps=2",
        "trainer.batch_size=16", "trainer.progress=false",
    )  # fmt: skip
    train(cfg)
    assert assert_final_is_last_checkpoint(Path(cfg.run_dir))["steps"] == 2
