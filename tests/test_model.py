"""The ViT itself: every named size, gradients, attention weights, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import compose_cfg, model_config, model_options, model_target
from vitexp.errors import ConfigError
from vitexp.models import VisionTransformer, build_model
from vitexp.registry import keyword_arguments

# The plain ViTs; the convolutional families have their own tests (test_conv_models.py).
MODEL_NAMES = [n for n in model_options() if model_target(n) == "vitexp.models.VisionTransformer"]


def tiny(**overrides) -> VisionTransformer:
    kwargs = dict(img_size=16, patch_size=4, in_channels=3, num_classes=7, hidden_size=32, mlp_dim=64,
                  num_heads=4, num_layers=2)  # fmt: skip
    return VisionTransformer(**{**kwargs, **overrides})


def test_the_issue_sizes_are_all_configured():
    for name in ("vit_ti4", "vit_s4", "vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_h14"):
        assert name in MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_named_size_builds_with_the_right_output_shape(name):
    cfg = compose_cfg([f"model={name}", "dataset=fake"])
    # Shapes are checked on the meta device: ViT-H costs no memory or time there.
    with torch.device("meta"):
        model = build_model(cfg.model)
        img = cfg.model.img_size
        out = model(torch.empty(2, 3, img, img))
    assert out.shape == (2, 10)
    tokens = (img // cfg.model.patch_size) ** 2 + 1
    assert model.embeddings.position_embeddings.shape == (1, tokens, cfg.model.hidden_size)
    assert len(model.encoder.layer) == cfg.model.num_layers


@pytest.mark.parametrize(
    "options",
    [
        {"representation_size": 16},
        {"shifted_patches": True, "locality_attention": True, "classifier": "seqpool"},
    ],
)
def test_forward_backward_reaches_every_parameter(options):
    model = tiny(drop_path_rate=0.1, dropout_rate=0.1, layer_scale_init=1e-4, **options)
    x = torch.randn(3, 3, 16, 16)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("classifier", ["token", "gap", "seqpool"])
def test_classifier_pooling(classifier):
    model = tiny(classifier=classifier).eval()
    assert (model.embeddings.cls_token is not None) == (classifier == "token")
    tokens = model.forward_features(torch.randn(2, 3, 16, 16))
    assert tokens.shape == (2, 16 + (classifier == "token"), 32)
    if classifier == "token":
        pooled = tokens[:, 0]
    elif classifier == "gap":
        pooled = tokens.mean(1)
    else:  # sequence pooling: softmax over tokens of a learned score, then the weighted sum
        scores = tokens @ model.attention_pool.weight[0] + model.attention_pool.bias
        pooled = (scores.softmax(dim=1)[:, :, None] * tokens).sum(1)
    torch.testing.assert_close(model.forward_head(tokens), model.head(pooled))


def test_shifted_patch_tokenization_follows_the_paper():
    """SPT: the image and its four diagonal half-patch shifts (zero-filled), cut into patches,
    flattened, layer-normalised, linearly projected; written here with plain indexing."""
    model = tiny(shifted_patches=True, classifier="gap").eval()
    emb = model.embeddings
    x = torch.randn(2, 3, 16, 16)
    s = 2  # half of patch_size 4

    def shifted(dy: int, dx: int) -> torch.Tensor:
        out = torch.zeros_like(x)
        for i in range(16):
            for j in range(16):
                if 0 <= i + dy < 16 and 0 <= j + dx < 16:
                    out[..., i, j] = x[..., i + dy, j + dx]
        return out

    stacked = torch.cat([x] + [shifted(dy, dx) for dy in (-s, s) for dx in (-s, s)], dim=1)  # (2, 15, 16, 16)
    patches = stacked.reshape(2, 15, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 15 * 16)
    normed = F.layer_norm(patches, (240,), emb.patch_norm.weight, emb.patch_norm.bias)
    tokens = normed @ emb.patch_embeddings.weight.reshape(32, -1).T + emb.patch_embeddings.bias
    torch.testing.assert_close(emb(x), tokens + emb.position_embeddings, atol=1e-5, rtol=1e-5)
    assert emb.patch_embeddings.in_channels == 15


def test_shifted_patches_need_the_plain_patch_embedding():
    from vitexp.models.hybrid import HybridEmbeddings

    with pytest.raises(ConfigError, match="shifted_patches"):
        VisionTransformer(img_size=32, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                          shifted_patches=True, embed_layer=HybridEmbeddings)  # fmt: skip


def test_locality_self_attention_masks_the_diagonal_and_learns_a_temperature():
    model = tiny(locality_attention=True).eval()
    attn = model.encoder.layer[0].attn
    assert attn.scale.shape == (4,) and torch.allclose(attn.scale, torch.full((4,), 8**-0.5))
    with torch.no_grad():
        attn.scale.mul_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    x = torch.randn(2, 3, 16, 16)
    h = model.encoder.layer[0].attention_norm(model.embeddings(x))
    # The paper's formula: softmax(mask(q k^T · scale_h)), written out with the raw projections.
    qkv = attn.qkv(h).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale.view(1, 4, 1, 1)
    scores = scores.masked_fill(torch.eye(17, dtype=torch.bool), float("-inf"))
    expected = scores.softmax(-1)
    maps = model.attention_maps(x)
    torch.testing.assert_close(maps[0], expected, atol=1e-5, rtol=1e-5)
    assert maps[0].diagonal(dim1=-2, dim2=-1).abs().max() == 0
    manual = (expected @ qkv[2]).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(attn.out(manual), attn(h), atol=1e-5, rtol=1e-5)


def test_attention_maps_are_softmax_rows_that_reproduce_the_fused_path():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    maps = model.attention_maps(x)
    assert len(maps) == 2
    assert maps[0].shape == (2, 4, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 17))
    assert (maps[0] >= 0).all()
    # The explicit weights applied to v give exactly what scaled_dot_product_attention gave.
    block = model.encoder.layer[0]
    h = block.attention_norm(model.embeddings(x))
    _, _, v = block.attn._qkv(h)
    manual = (maps[0] @ v).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(block.attn.out(manual), block.attn(h), atol=1e-5, rtol=1e-5)
    # One pass gives the same maps and the logits of `forward`, exactly.
    pass_maps, logits = model.attention_pass(x)
    assert all(torch.equal(a, b) for a, b in zip(pass_maps, maps, strict=True))
    assert torch.equal(logits, model(x))


def test_zero_head_starts_at_uniform_logits():
    model = tiny(zero_head=True)
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16))) == 0


def test_rectangular_images():
    model = tiny(img_size=[16, 24])
    assert model(torch.randn(1, 3, 16, 24)).shape == (1, 7)
    assert model.embeddings.num_patches == 4 * 6


def test_dropout_and_drop_path_only_act_in_training():
    model = tiny(dropout_rate=0.5, drop_path_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_proj_dropout_uses_the_dropout_rate_not_the_attention_dropout_rate():
    model = tiny(dropout_rate=0.3, attention_dropout_rate=0.0)
    assert model.encoder.layer[0].attn.proj_dropout.p == 0.3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 30}, "img_size=30 is not divisible by patch_size=4"),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30 is not divisible by num_heads=4"),
        ({"classifier": "mean"}, "classifier='mean' is not one of"),
        ({"patch_size": 0}, "patch_size=0 must be positive"),
    ],
)
def test_bad_arguments_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny(**overrides)
    assert "\n" not in str(err.value)


def test_wrong_input_size_is_a_clear_error():
    # A caller's bug (the data pipeline resizes to the model's size), not a setting.
    with pytest.raises(ValueError, match=r"built for \(16, 16\)"):
        tiny()(torch.randn(1, 3, 32, 32))


def test_weight_decay_exclusions_name_real_parameters():
    model = tiny()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


def test_model_config_keys_are_constructor_arguments():
    params = set(keyword_arguments(VisionTransformer) or ())
    for name in MODEL_NAMES:
        keys = set(model_config(name)) - {
            "_target_",
            "pretrained",
            "pretrained_format",
        }
        assert keys <= params, f"{name}: unknown keys {keys - params}"
