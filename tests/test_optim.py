"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.conftest import compose_cfg
from vitexp.errors import ConfigError
from vitexp.models import VisionTransformer
from vitexp.training.optim import constant, make_schedule, param_groups, warmup_cosine, warmup_linear


def test_no_decay_on_norms_biases_and_embeddings():
    model = VisionTransformer(img_size=8, patch_size=4, num_classes=3, hidden_size=16, mlp_dim=32,
                              num_heads=2, num_layers=1)  # fmt: skip
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embeddings.position_embeddings" in skipped and "embeddings.cls_token" in skipped
    assert "encoder.layer.0.attention_norm.weight" in skipped and "head.bias" in skipped
    assert decayed == {
        "embeddings.patch_embeddings.weight",
        "encoder.layer.0.attn.qkv.weight",
        "encoder.layer.0.attn.out.weight",
        "encoder.layer.0.ffn.fc1.weight",
        "encoder.layer.0.ffn.fc2.weight",
        "head.weight",
    }


def test_warmup_then_cosine_to_the_floor():
    f = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_linear_and_constant():
    assert warmup_linear(55, warmup_steps=0, total_steps=110) == pytest.approx(0.5)
    assert constant(5, warmup_steps=0) == 1.0
    assert constant(1, warmup_steps=4) == 0.5


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear", "constant"])
def test_schedule_configs_build(name):
    cfg = compose_cfg([f"scheduler={name}"])
    fn = make_schedule(dict(cfg.scheduler), steps_per_epoch=10, total_steps=100)
    values = [fn(s) for s in range(100)]
    assert all(0 <= v <= 1 + 1e-9 for v in values) and math.isfinite(sum(values))


def test_warmup_in_epochs_or_steps():
    cfg = dict(compose_cfg(["scheduler.warmup_epochs=2"]).scheduler)
    assert make_schedule(cfg, steps_per_epoch=10, total_steps=100).keywords["warmup_steps"] == 20
    cfg["warmup_steps"] = 7
    assert make_schedule(cfg, steps_per_epoch=10, total_steps=100).keywords["warmup_steps"] == 7
    cfg["warmup_steps"] = -1
    with pytest.raises(ConfigError, match="negative"):
        make_schedule(cfg, steps_per_epoch=10, total_steps=100)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_configs_build_on_param_groups(name):
    cfg = compose_cfg([f"optimizer={name}"])
    from hydra.utils import instantiate

    model = torch.nn.Linear(3, 2)
    opt = instantiate(cfg.optimizer)(param_groups(model, cfg.optimizer.weight_decay))
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
