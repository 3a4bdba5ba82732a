"""Layer-wise learning-rate decay (`optimizer.layer_decay`): each parameter's rate and weight
decay against timm's `param_groups_layer_decay`, on timm's models and on ours."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import compose_cfg
from vitexp.errors import ConfigError
from vitexp.models import CCT, CvT, VisionTransformer
from vitexp.models.weights.vit import convert_timm
from vitexp.training.optim import build_optimizer, param_groups, set_lr

timm = pytest.importorskip("timm")
from timm.optim import param_groups_layer_decay  # noqa: E402

DECAY, WEIGHT_DECAY = 0.65, 0.05


def per_parameter(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    """Each parameter's (lr_scale, weight_decay) in `groups`, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def timms(model: nn.Module) -> dict[str, tuple[float, float]]:
    # As timm's create_optimizer_v2 calls it: the model's no_weight_decay() names, if it has them.
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(
        model, weight_decay=WEIGHT_DECAY, no_weight_decay_list=skip, layer_decay=DECAY
    )
    return per_parameter(model, groups)


def ours(model: nn.Module) -> dict[str, tuple[float, float]]:
    return per_parameter(model, param_groups(model, WEIGHT_DECAY, layer_decay=DECAY))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 3, "embed_dim": 48, "num_heads": 2}),
        ("vit_base_patch16_siglip_224", {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}),
        ("convnext_atto", {}),
    ],
)
def test_timm_models_get_the_rates_and_weight_decay_timm_gives_them(name, kwargs):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    expected = timms(model)
    assert len(set(scale for scale, _ in expected.values())) > 3  # several layers, not one group
    assert ours(model) == expected


def test_our_vit_gets_what_timm_gives_the_same_vit_parameter_by_parameter():
    """Correspondence by our timm importer (`convert_timm`, a renaming): each of our parameters
    has the rate and weight decay that timm gives the timm parameter it is imported from."""
    size = {"img_size": 32, "patch_size": 4, "num_classes": 10, "num_heads": 2}
    reference = timm.models.VisionTransformer(embed_dim=32, depth=3, mlp_ratio=2.0, **size)
    model = VisionTransformer(hidden_size=32, num_layers=3, mlp_dim=64, **size)
    timm_names = [name for name, _ in reference.named_parameters()]
    renamed = convert_timm({name: torch.tensor(float(i)) for i, name in enumerate(timm_names)})
    correspondence = {ours_: timm_names[int(index)] for ours_, index in renamed.items()}
    assert correspondence.keys() == {name for name, _ in model.named_parameters()}
    expected = timms(reference)
    got = ours(model)
    assert {name: expected[correspondence[name]] for name in got} == got
    # The bottom and the top: the embeddings at decay^(depth + 1), the head at the full rate.
    assert got["embeddings.patch_embeddings.weight"] == (DECAY**4, WEIGHT_DECAY)
    assert got["embeddings.cls_token"] == (DECAY**4, 0.0) and got["head.weight"] == (1.0, WEIGHT_DECAY)


def scales(model: nn.Module) -> dict[str, float]:
    return {name: lr_scale for name, (lr_scale, _) in ours(model).items()}


def test_cct_rates_grow_from_the_tokenizer_to_the_head():
    cct = CCT(
        img_size=16, hidden_size=32, mlp_dim=32, num_heads=2, num_layers=3, conv_layers=1, num_classes=4
    )
    scale = scales(cct)
    # The tokenizer at 0, one layer per block (the final norm in the last), the head at 4.
    assert scale["embeddings.tokenizer.0.conv.weight"] == DECAY**4
    assert [scale[f"encoder.layer.{i}.ffn.fc1.weight"] for i in range(3)] == [DECAY**3, DECAY**2, DECAY]
    assert scale["encoder.encoder_norm.weight"] == DECAY
    assert scale["attention_pool.weight"] == scale["head.weight"] == 1.0


def test_cvt_counts_the_blocks_of_every_stage():
    stages = {"patch_size": [3, 3, 3], "patch_stride": [1, 2, 2], "patch_padding": [1, 1, 1]}
    cvt = CvT(
        img_size=16,
        hidden_size=[8, 16, 32],
        num_heads=[1, 2, 2],
        num_layers=[1, 2, 1],
        num_classes=4,
        **stages,
    )
    scale = scales(cvt)
    blocks = ["stages.0.layer.0", "stages.1.layer.0", "stages.1.layer.1", "stages.2.layer.0"]
    assert scale["stages.0.embeddings.projection.weight"] == DECAY**5 and scale["head.weight"] == 1.0
    assert [scale[f"{b}.ffn.fc1.weight"] for b in blocks] == [DECAY**4, DECAY**3, DECAY**2, DECAY]
    # A later stage's embedding and class token learn with its first block.
    assert scale["stages.1.embeddings.projection.weight"] == scale["stages.1.layer.0.ffn.fc1.weight"]
    assert scale["stages.2.cls_token"] == scale["stages.2.layer.0.ffn.fc1.weight"]


def test_the_schedule_multiplies_each_layers_rate():
    cfg = compose_cfg(["optimizer=adamw", f"optimizer.layer_decay={DECAY}"])
    model = VisionTransformer(img_size=8, patch_size=4, num_classes=3, hidden_size=16, mlp_dim=32,
                              num_heads=2, num_layers=2)  # fmt: skip
    optimizer = build_optimizer(cfg.optimizer, model)
    lr = cfg.optimizer.lr
    # The first group is the head's, at the configured rate: the one the loop logs.
    assert optimizer.param_groups[0]["lr"] == lr and optimizer.param_groups[0]["lr_scale"] == 1.0
    assert [g["lr"] for g in optimizer.param_groups] == [lr * g["lr_scale"] for g in optimizer.param_groups]
    base = [g["lr"] for g in optimizer.param_groups]  # what setup.build keeps as Run.base_lrs
    set_lr(optimizer, base, 0.5)
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.5 * lr * g["lr_scale"] for g in groups]
    # Without layer decay: the two groups of before, no lr_scale.
    plain = build_optimizer(compose_cfg(["optimizer=adamw"]).optimizer, model)
    assert [g["lr"] for g in plain.param_groups] == [lr, lr] and "lr_scale" not in plain.param_groups[0]


def test_a_model_that_does_not_say_its_layers_is_one_line():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"^optimizer.layer_decay: Sequential does not say") as err:
        param_groups(model, WEIGHT_DECAY, layer_decay=DECAY)
    assert "\n" not in str(err.value)
