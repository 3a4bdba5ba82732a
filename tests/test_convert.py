"""Importing foreign ViT weights (vitexp.models.weights and its converters in weights.vit).

Every format is checked end to end: a reference model with random weights (timm, Hugging Face
transformers, an `.npz` in the official JAX key layout, an article-style checkpoint) is written
to disk, imported into our VisionTransformer, and must give the same logits. The writers of the
`.npz` and article layouts below are the inverse of the converters; the `.npz` writer is checked
against timm's own reader of the official checkpoints so a mistake cannot cancel out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from tests.helpers import model_config
from vitexp.errors import ConfigError, DataError
from vitexp.models import build_model
from vitexp.models.vit import VisionTransformer
from vitexp.models.weights import load_converted, load_pretrained, read_weights, resample_position_embeddings
from vitexp.models.weights.vit import CONVERTERS, FORMATS, convert_timm, detect_format

# A tiny ViT: fast, yet every dimension differs so a transposed or misplaced weight shows.
IMG, PATCH, DIM, HEADS, LAYERS, MLP, CLASSES = 32, 8, 64, 4, 2, 256, 10


def _timm_vit_class() -> type[nn.Module]:
    return pytest.importorskip("timm.models.vision_transformer").VisionTransformer


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (zero biases and unit norms would hide swapped parameters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _timm(seed: int = 0, **overrides: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=LAYERS, num_heads=HEADS,
        mlp_ratio=MLP / DIM, num_classes=CLASSES,
    )  # fmt: skip
    return _perturb(_timm_vit_class()(**(kwargs | overrides)), seed)


def _ours(**overrides: Any) -> VisionTransformer:
    kwargs: dict[str, Any] = dict(
        img_size=IMG, patch_size=PATCH, in_channels=3, num_classes=CLASSES, hidden_size=DIM,
        mlp_dim=MLP, num_heads=HEADS, num_layers=LAYERS,
    )  # fmt: skip
    return VisionTransformer(**(kwargs | overrides)).eval()


def _images(size: int | tuple[int, int] = IMG, channels: int = 3, seed: int = 1) -> Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(seed))


def _assert_same(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# --- writers of the foreign layouts (inverse of the converters) --------------------------------


def _npz_arrays(timm_model: nn.Module) -> dict[str, np.ndarray]:
    """A timm ViT's weights under the key names and shapes of the official JAX `.npz` files."""
    sd = {key: value.detach() for key, value in timm_model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = timm_model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),  # OIHW → HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    for i in range(len(timm_model.blocks)):
        block, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = b + "MultiHeadDotProductAttention_1/"
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = (
            sd[block + "norm1.weight"],
            sd[block + "norm1.bias"],
        )
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = (
            sd[block + "norm2.weight"],
            sd[block + "norm2.bias"],
        )
        weights = sd[block + "attn.qkv.weight"].chunk(3)
        biases = sd[block + "attn.qkv.bias"].chunk(3)
        for name, weight, bias in zip(("query", "key", "value"), weights, biases, strict=True):
            out[mha + name + "/kernel"] = weight.T.reshape(dim, heads, dim // heads)
            out[mha + name + "/bias"] = bias.reshape(heads, dim // heads)
        out[mha + "out/kernel"] = sd[block + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        out[mha + "out/bias"] = sd[block + "attn.proj.bias"]
        for j in (0, 1):
            out[b + f"MlpBlock_3/Dense_{j}/kernel"] = sd[block + f"mlp.fc{j + 1}.weight"].T
            out[b + f"MlpBlock_3/Dense_{j}/bias"] = sd[block + f"mlp.fc{j + 1}.bias"]
    return {key: value.contiguous().numpy() for key, value in out.items()}


def _article_state_dict(timm_model: nn.Module, cls_name: str = "cls_token") -> dict[str, Tensor]:
    """A timm ViT's weights under the names of the article's `VisionTransformer` checkpoints."""
    sd = timm_model.state_dict()
    out = {
        f"transformer.embeddings.{cls_name}": sd["cls_token"],
        "transformer.embeddings.position_embeddings": sd["pos_embed"],
        "transformer.embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "transformer.embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "transformer.encoder.encoder_norm.weight": sd["norm.weight"],
        "transformer.encoder.encoder_norm.bias": sd["norm.bias"],
        "head.weight": sd["head.weight"],
        "head.bias": sd["head.bias"],
    }
    for i in range(len(timm_model.blocks)):
        block, layer = f"blocks.{i}.", f"transformer.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[layer + f"attention_norm.{kind}"] = sd[block + f"norm1.{kind}"]
            out[layer + f"ffn_norm.{kind}"] = sd[block + f"norm2.{kind}"]
            for name, part in zip(
                ("query", "key", "value"), sd[block + f"attn.qkv.{kind}"].chunk(3), strict=True
            ):
                out[layer + f"attn.{name}.{kind}"] = part.clone()
            out[layer + f"attn.out.{kind}"] = sd[block + f"attn.proj.{kind}"]
            out[layer + f"ffn.fc1.{kind}"] = sd[block + f"mlp.fc1.{kind}"]
            out[layer + f"ffn.fc2.{kind}"] = sd[block + f"mlp.fc2.{kind}"]
    return out


def _hf_config(**overrides: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    kwargs: dict[str, Any] = dict(
        image_size=IMG, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=MLP, num_labels=CLASSES, hidden_act="gelu",
        layer_norm_eps=1e-6,
    )  # fmt: skip
    return transformers.ViTConfig(**(kwargs | overrides))


@pytest.fixture(scope="module")
def timm_model() -> nn.Module:
    return _timm()


@pytest.fixture(scope="module")
def hf_classifier() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return _perturb(transformers.ViTForImageClassification(_hf_config()))


# --- every format gives the reference logits ---------------------------------------------------


def test_timm_checkpoint_gives_timm_logits(timm_model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "timm.pth"
    torch.save(timm_model.state_dict(), path)
    ours = _ours()
    load_pretrained(ours, path)
    x = _images()
    _assert_same(ours(x), timm_model(x))


@pytest.mark.slow  # about 5 s on 2 cores, mostly two ViT-B/16 forward passes
def test_timm_checkpoint_at_vit_b16_size() -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):  # skip both initialisations: the weights are overwritten anyway
        reference = timm.create_model("vit_base_patch16_224", pretrained=False)
        ours = VisionTransformer(**_paper_config("vit_b16"))
    reference, ours = reference.to_empty(device="cpu").eval(), ours.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.05, generator=generator)
        load_converted(ours, convert_timm(reference.state_dict()))
        x = _images(224, seed=2)[:1]
        _assert_same(ours(x), reference(x))


def test_hf_save_pretrained_directory_gives_hf_logits(hf_classifier: nn.Module, tmp_path: Path) -> None:
    # save_pretrained writes the Hub layout (vit.encoder.layer.N.attention.attention.query...).
    hf_classifier.save_pretrained(tmp_path)
    assert any(".attention.attention.query." in key for key in read_weights(tmp_path / "model.safetensors"))
    ours = _ours()
    load_pretrained(ours, tmp_path)
    x = _images()
    _assert_same(ours(x), hf_classifier(pixel_values=x).logits)


def test_hf_in_memory_state_dict_gives_hf_logits(hf_classifier: nn.Module, tmp_path: Path) -> None:
    # transformers 5 names the modules vit.layers.N.attention.q_proj...; older versions as the Hub.
    torch.save(hf_classifier.state_dict(), tmp_path / "hf.bin")
    ours = _ours()
    load_pretrained(ours, tmp_path / "hf.bin", fmt="hf")
    x = _images()
    _assert_same(ours(x), hf_classifier(pixel_values=x).logits)


def test_hf_vitmodel_pooler_becomes_pre_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = _perturb(transformers.ViTModel(_hf_config(), add_pooling_layer=True))
    torch.save(reference.state_dict(), tmp_path / "vitmodel.pth")
    # ViTModel's pooler is tanh(dense(class token)): our pre-logits layer, with no head after it.
    ours = _ours(representation_size=DIM, num_classes=0)
    load_pretrained(ours, tmp_path / "vitmodel.pth")
    x = _images()
    _assert_same(ours(x), reference(pixel_values=x).pooler_output)


def test_npz_writer_matches_timm_reader(timm_model: nn.Module, tmp_path: Path) -> None:
    """Guard for the test's own `.npz` writer: timm's reader of official checkpoints must
    recover the model from it."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **_npz_arrays(timm_model))
    fresh = _timm(seed=5)
    with torch.no_grad():
        timm_vit._load_weights(fresh, str(path))
    x = _images()
    _assert_same(fresh(x), timm_model(x))


def test_npz_checkpoint_gives_reference_logits(timm_model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **_npz_arrays(timm_model))
    ours = _ours()
    load_pretrained(ours, path)
    x = _images()
    _assert_same(ours(x), timm_model(x))


def test_npz_from_flax_optimizer_state(timm_model: nn.Module, tmp_path: Path) -> None:
    arrays = {f"opt/target/{key}": value for key, value in _npz_arrays(timm_model).items()}
    arrays["opt/state/step"] = np.array(3)
    np.savez(tmp_path / "opt.npz", **arrays)
    ours = _ours()
    load_pretrained(ours, tmp_path / "opt.npz", fmt="npz")
    x = _images()
    _assert_same(ours(x), timm_model(x))


def test_npz_pre_logits_layer(timm_model: nn.Module, tmp_path: Path) -> None:
    """The 21k checkpoints carry the paper's tanh pre-logits layer in front of the head."""
    generator = torch.Generator().manual_seed(3)
    arrays = _npz_arrays(timm_model)
    pre_kernel = torch.randn(DIM, DIM, generator=generator) * 0.2
    pre_bias = torch.randn(DIM, generator=generator) * 0.2
    head_kernel = torch.randn(DIM, 21, generator=generator) * 0.2
    head_bias = torch.randn(21, generator=generator) * 0.2
    arrays |= {
        "pre_logits/kernel": pre_kernel.numpy(),
        "pre_logits/bias": pre_bias.numpy(),
        "head/kernel": head_kernel.numpy(),
        "head/bias": head_bias.numpy(),
    }
    np.savez(tmp_path / "21k.npz", **arrays)
    ours = _ours(representation_size=DIM, num_classes=21)
    load_pretrained(ours, tmp_path / "21k.npz")
    x = _images()
    with torch.no_grad():
        token = timm_model.forward_features(x)[:, 0]
        expected = torch.tanh(token @ pre_kernel + pre_bias) @ head_kernel + head_bias
    _assert_same(ours(x), expected)


@pytest.mark.parametrize("cls_name", ["cls_token", "classifer_token"])
def test_article_checkpoint_gives_reference_logits(
    timm_model: nn.Module, tmp_path: Path, cls_name: str
) -> None:
    path = tmp_path / "epoch3_checkpoint.bin"
    torch.save(_article_state_dict(timm_model, cls_name), path)
    ours = _ours()
    load_pretrained(ours, path)
    x = _images()
    _assert_same(ours(x), timm_model(x))


def test_own_training_checkpoint_with_wrapper_prefixes(tmp_path: Path) -> None:
    source = _perturb(_ours())
    wrapped = {f"module._orig_mod.{key}": value for key, value in source.state_dict().items()}
    checkpoint = {"model": wrapped, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    torch.save(checkpoint, tmp_path / "last.pt")
    weights = read_weights(tmp_path / "last.pt")
    assert set(weights) == set(source.state_dict())
    assert detect_format(checkpoint) == "vitexp"
    ours = _ours()
    load_pretrained(ours, tmp_path / "last.pt")
    x = _images()
    _assert_same(ours(x), source(x))


def test_compiled_submodule_prefix_is_stripped(tmp_path: Path) -> None:
    source = _perturb(_ours())
    renamed = {
        key.replace("encoder.", "encoder._orig_mod.", 1): value for key, value in source.state_dict().items()
    }
    torch.save(renamed, tmp_path / "compiled.pth")
    assert set(read_weights(tmp_path / "compiled.pth")) == set(source.state_dict())


def test_build_model_imports_pretrained_weights(timm_model: nn.Module, tmp_path: Path) -> None:
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    cfg = {
        "_target_": "vitexp.models.VisionTransformer",
        "img_size": IMG, "patch_size": PATCH, "in_channels": 3, "num_classes": CLASSES, "hidden_size": DIM,
        "mlp_dim": MLP, "num_heads": HEADS, "num_layers": LAYERS,
        "pretrained": str(tmp_path / "timm.pth"), "pretrained_format": "timm",
    }  # fmt: skip
    model = build_model(cfg).eval()
    x = _images()
    _assert_same(model(x), timm_model(x))


# --- format detection --------------------------------------------------------------------------


def test_detect_format_of_each_layout(
    timm_model: nn.Module, hf_classifier: nn.Module, tmp_path: Path
) -> None:
    hf_classifier.save_pretrained(tmp_path)
    npz = {key: torch.from_numpy(value) for key, value in _npz_arrays(timm_model).items()}
    cases = {
        "vitexp": {"model": {f"module.{k}": v for k, v in _ours().state_dict().items()}, "epoch": 1},
        "timm": timm_model.state_dict(),
        "hf": read_weights(tmp_path),
        "npz": npz,
        "article": _article_state_dict(timm_model),
    }
    for fmt, state_dict in cases.items():
        assert detect_format(state_dict) == fmt
    assert detect_format(hf_classifier.state_dict()) == "hf"
    assert detect_format({f"opt/target/{key}": value for key, value in npz.items()}) == "npz"
    assert sorted(CONVERTERS) == sorted(FORMATS)


def test_detect_format_rejects_unknown_layouts() -> None:
    with pytest.raises(ConfigError, match="pretrained_format"):
        detect_format({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})


def test_explicit_format_contradicted_by_file(timm_model: nn.Module, tmp_path: Path) -> None:
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(ConfigError, match=r"pretrained_format=hf but .* holds timm weights"):
        load_pretrained(_ours(), tmp_path / "timm.pth", fmt="hf")
    with pytest.raises(ConfigError, match="is not one of"):
        load_pretrained(_ours(), tmp_path / "timm.pth", fmt="onnx")


# --- position embeddings -----------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8), (8, 4), (3, 3)])
def test_position_embeddings_resampled_like_timm(grid: tuple[int, int]) -> None:
    layers = pytest.importorskip("timm.layers")
    pos = torch.randn(1, 1 + 16, DIM, generator=torch.Generator().manual_seed(0))
    expected = layers.resample_abs_pos_embed(
        pos, new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )
    resampled = resample_position_embeddings(pos, grid, num_prefix_tokens=1)
    assert resampled.shape == (1, 1 + grid[0] * grid[1], DIM)
    assert torch.equal(resampled[:, :1], pos[:, :1])
    _assert_same(resampled, expected)


def test_equal_grid_leaves_position_embeddings_unchanged(timm_model: nn.Module) -> None:
    pos = timm_model.pos_embed.detach()
    assert resample_position_embeddings(pos, (4, 4)) is pos
    ours = _ours()
    load_converted(ours, convert_timm(timm_model.state_dict()))
    assert torch.equal(ours.embeddings.position_embeddings.detach(), pos)


def test_224_checkpoint_fine_tuned_at_384(tmp_path: Path) -> None:
    layers = pytest.importorskip("timm.layers")
    small = dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    source = _timm(**small)
    torch.save(source.state_dict(), tmp_path / "224.pth")
    ours = _ours(img_size=384, patch_size=16, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1)
    load_pretrained(ours, tmp_path / "224.pth")
    pos = ours.embeddings.position_embeddings.detach()
    assert pos.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(pos[:, 0], source.pos_embed.detach()[:, 0])
    assert torch.equal(ours.embeddings.cls_token.detach(), source.cls_token.detach())
    # timm at 384 with timm's own resampling of the same weights is the reference.
    reference = _timm(**(small | {"img_size": 384}))
    state_dict = source.state_dict()
    state_dict["pos_embed"] = layers.resample_abs_pos_embed(
        state_dict["pos_embed"],
        new_size=[24, 24],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )
    reference.load_state_dict(state_dict)
    x = _images(384)
    _assert_same(ours(x), reference(x))


def test_class_token_dropped_for_gap_model(timm_model: nn.Module, tmp_path: Path) -> None:
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    ours = _ours(classifier="gap")
    load_pretrained(ours, tmp_path / "timm.pth")
    assert "embeddings.cls_token" not in ours.state_dict()
    assert torch.equal(ours.embeddings.position_embeddings.detach(), timm_model.pos_embed.detach()[:, 1:])


@pytest.mark.slow
def test_gap_checkpoint_gives_gap_logits(tmp_path: Path) -> None:
    # fc_norm=False: timm then normalises the tokens before pooling, as our 'gap' model does.
    source = _timm(class_token=False, global_pool="avg", fc_norm=False)
    torch.save(source.state_dict(), tmp_path / "gap.pth")
    ours = _ours(classifier="gap")
    load_pretrained(ours, tmp_path / "gap.pth")
    x = _images()
    _assert_same(ours(x), source(x))


def test_gap_checkpoint_into_token_model_keeps_fresh_class_token(tmp_path: Path) -> None:
    source = _timm(class_token=False, global_pool="avg", fc_norm=False)
    torch.save(source.state_dict(), tmp_path / "gap.pth")
    ours = _ours()
    fresh_cls = ours.embeddings.cls_token.detach().clone()
    fresh_cls_position = ours.embeddings.position_embeddings.detach()[:, :1].clone()
    load_pretrained(ours, tmp_path / "gap.pth")
    pos = ours.embeddings.position_embeddings.detach()
    assert torch.equal(ours.embeddings.cls_token.detach(), fresh_cls)
    assert torch.equal(pos[:, :1], fresh_cls_position)
    assert torch.equal(pos[:, 1:], source.pos_embed.detach())


@pytest.mark.slow
def test_class_token_without_position_gives_timm_logits(tmp_path: Path) -> None:
    source = _timm(no_embed_class=True)  # timm adds no position to the class token
    assert source.pos_embed.shape[1] == (IMG // PATCH) ** 2
    torch.save(source.state_dict(), tmp_path / "no_embed_class.pth")
    ours = _ours()
    load_pretrained(ours, tmp_path / "no_embed_class.pth")
    x = _images()
    _assert_same(ours(x), source(x))


# --- classifier ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_head_for_other_classes_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _timm(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "in1k.pth")
    ours = _ours(num_classes=CLASSES)
    fresh_head = {key: value.clone() for key, value in ours.head.state_dict().items()}
    caplog.set_level(logging.INFO, logger="vitexp.models.weights")
    load_pretrained(ours, tmp_path / "in1k.pth")
    for key, value in ours.head.state_dict().items():
        assert torch.equal(value, fresh_head[key])
    notes = [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    assert len(notes) == 1 and "1000 classes" in notes[0] and f"{CLASSES} classes" in notes[0]
    x = _images()
    with torch.no_grad():
        features = source.forward_head(source.forward_features(x), pre_logits=True)
        _assert_same(ours.forward_head(ours.forward_features(x), pre_logits=True), features)


def test_pre_logits_and_head_dropped_when_model_has_no_pre_logits(
    timm_model: nn.Module, tmp_path: Path
) -> None:
    arrays = _npz_arrays(timm_model)
    rng = np.random.default_rng(0)
    # Same head shape as the model's: it is still dropped, having been trained on tanh features.
    arrays |= {
        "pre_logits/kernel": rng.normal(size=(DIM, DIM)).astype(np.float32),
        "pre_logits/bias": rng.normal(size=DIM).astype(np.float32),
        "head/kernel": rng.normal(size=(DIM, CLASSES)).astype(np.float32),
    }
    np.savez(tmp_path / "21k.npz", **arrays)
    ours = _ours()
    fresh_head = ours.head.weight.detach().clone()
    load_pretrained(ours, tmp_path / "21k.npz")
    assert not any(key.startswith("pre_logits") for key in ours.state_dict())
    assert torch.equal(ours.head.weight.detach(), fresh_head)


@pytest.mark.slow
def test_head_dropped_for_feature_extractor(timm_model: nn.Module) -> None:
    ours = _ours(num_classes=0)
    load_converted(ours, convert_timm(timm_model.state_dict()))
    x = _images()
    with torch.no_grad():
        _assert_same(ours(x), timm_model.forward_head(timm_model.forward_features(x), pre_logits=True))


@pytest.mark.slow
def test_rgb_weights_for_grayscale_model(timm_model: nn.Module) -> None:
    ours = _ours(in_channels=1)
    load_converted(ours, convert_timm(timm_model.state_dict()))
    gray = _images(channels=1)
    _assert_same(ours(gray), timm_model(gray.expand(-1, 3, -1, -1)))


# --- mismatches are one-line errors ------------------------------------------------------------


def _one_line(error: pytest.ExceptionInfo[ConfigError] | pytest.ExceptionInfo[DataError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_other_width_names_key_and_both_shapes(timm_model: nn.Module, tmp_path: Path) -> None:
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(ConfigError) as error:
        load_pretrained(_ours(hidden_size=32, mlp_dim=128), tmp_path / "timm.pth")
    message = _one_line(error)
    assert (
        "embeddings.patch_embeddings.weight is (64, 3, 8, 8) in the file but (32, 3, 8, 8) in the model"
        in message
    )
    assert "hidden_size=64" in message


def test_other_mlp_width_names_key(timm_model: nn.Module) -> None:
    with pytest.raises(ConfigError) as error:
        load_converted(_ours(mlp_dim=128), convert_timm(timm_model.state_dict()), source="x.pth")
    assert "encoder.layer.0.ffn.fc1.weight is (256, 64) in the file but (128, 64) in the model" in _one_line(
        error
    )


def test_other_depth_names_extra_layers(timm_model: nn.Module) -> None:
    with pytest.raises(ConfigError) as error:
        load_converted(_ours(num_layers=1), convert_timm(timm_model.state_dict()), source="x.pth")
    assert "not in the model: encoder.layer.1." in _one_line(error)
    with pytest.raises(ConfigError) as error:
        load_converted(_ours(num_layers=3), convert_timm(timm_model.state_dict()), source="x.pth")
    assert "missing from the file: encoder.layer.2." in _one_line(error)


def test_unknown_timm_parts_are_reported() -> None:
    source = _timm(qk_norm=True)
    with pytest.raises(ConfigError) as error:
        load_converted(_ours(), convert_timm(source.state_dict()), source="x.pth")
    assert "blocks.0.attn.q_norm.weight" in _one_line(error)


def test_vit_b16_weights_into_vit_ti16_suggest_the_config() -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        source = timm.create_model("vit_base_patch16_224", pretrained=False)
        ours = VisionTransformer(**_paper_config("vit_ti16"))
    with pytest.raises(ConfigError) as error:
        load_converted(ours, convert_timm(source.state_dict()), source="B_16.pth")
    message = _one_line(error)
    assert "(768, 3, 16, 16) in the file but (192, 3, 16, 16) in the model" in message
    assert "model=vit_b16" in message


def test_npz_with_other_head_count_is_refused(timm_model: nn.Module, tmp_path: Path) -> None:
    # Fused weights would load into 2 heads without complaint and compute something else.
    np.savez(tmp_path / "four_heads.npz", **_npz_arrays(timm_model))
    with pytest.raises(ConfigError, match=r"set model\.num_heads=4"):
        load_pretrained(_ours(num_heads=2), tmp_path / "four_heads.npz")


# --- unsafe and damaged files ------------------------------------------------------------------


class _TouchWhenUnpickled:
    """A pickle payload: unpickling it creates `marker` (stands in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_unexecuted(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save(
        {"embeddings.patch_embeddings.weight": torch.zeros(1), "x": _TouchWhenUnpickled(tmp_path / "pwned")},
        path,
    )
    with pytest.raises(DataError, match="refused") as error:
        load_pretrained(_ours(), path)
    assert str(path) in _one_line(error)
    assert not (tmp_path / "pwned").exists()
    # The payload is live: an unrestricted load would have run it.
    torch.save(_TouchWhenUnpickled(tmp_path / "control"), tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert (tmp_path / "control").exists()


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "objects.npz", embedding=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="refused"):
        read_weights(tmp_path / "objects.npz")


@pytest.mark.parametrize("suffix", [".pth", ".npz", ".safetensors"])
def test_truncated_file_is_a_data_error(timm_model: nn.Module, tmp_path: Path, suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    state_dict = {key: value.contiguous() for key, value in timm_model.state_dict().items()}
    if suffix == ".npz":
        np.savez(full, **{key: value.numpy() for key, value in state_dict.items()})
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, full)
    else:
        torch.save(state_dict, full)
    assert set(read_weights(full)) == set(state_dict)
    data = full.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        load_pretrained(_ours(), truncated)
    assert str(truncated) in _one_line(error)


def test_missing_garbage_and_non_state_dict_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as error:
        read_weights(tmp_path / "nope.npz")
    assert str(tmp_path / "nope.npz") in _one_line(error)
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(DataError, match="damaged or truncated") as error:
        read_weights(tmp_path / "garbage.bin")
    assert str(tmp_path / "garbage.bin") in _one_line(error)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(DataError, match="holds no state dict") as error:
        read_weights(tmp_path / "list.pth")
    assert str(tmp_path / "list.pth") in _one_line(error)
    with pytest.raises(DataError, match="holds neither"):
        read_weights(tmp_path)


# --- parameter counts of the paper's sizes equal timm's ----------------------------------------


def _paper_config(name: str) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(model_config(name), resolve=True)
    assert isinstance(kwargs, dict)
    kwargs |= {"in_channels": 3, "num_classes": 1000}
    for key in ("pretrained", "pretrained_format", "_target_"):
        kwargs.pop(key, None)
    return {str(key): value for key, value in kwargs.items()}


def _count(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


@pytest.mark.parametrize(
    ("config", "timm_name"),
    [
        ("vit_ti16", "vit_tiny_patch16_224"),
        ("vit_s16", "vit_small_patch16_224"),
        ("vit_b16", "vit_base_patch16_224"),
        ("vit_b32", "vit_base_patch32_224"),
        ("vit_l16", "vit_large_patch16_224"),
        ("vit_h14", "vit_huge_patch14_224"),
    ],
)
def test_parameter_count_equals_timm(config: str, timm_name: str) -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):  # shapes only: ViT-H costs nothing
        ours = VisionTransformer(**_paper_config(config))
        reference = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert _count(ours) == _count(reference)
    if config == "vit_b16":
        assert _count(ours) == 86_567_656
    # Same parameters under the converted names, so weights can move between them.
    converted = convert_timm(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
