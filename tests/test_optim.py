"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.helpers import compose_cfg
from vitexp.errors import ConfigError
from vitexp.models import VisionTransformer
from vitexp.training.optim import (
    build_optimizer,
    constant,
    make_schedule,
    param_groups,
    set_lr,
    warmup_cosine,
    warmup_linear,
)


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


@pytest.mark.parametrize(
    ("name", "fn"),
    [("warmup_cosine", warmup_cosine), ("warmup_linear", warmup_linear), ("constant", constant)],
)
def test_schedule_configs_build_the_named_function(name, fn):
    cfg = compose_cfg([f"scheduler={name}", "scheduler.warmup_epochs=1"])
    schedule = make_schedule(dict(cfg.scheduler), steps_per_epoch=10)
    settings = {
        k: v for k, v in dict(cfg.scheduler).items() if not k.startswith("_") and k != "warmup_epochs"
    }
    settings["warmup_steps"] = 10
    assert [schedule(s, 100) for s in range(100)] == [fn(s, **settings, total_steps=100) for s in range(100)]
    assert schedule(0, 100) == pytest.approx(0.1) and schedule(9, 100) == pytest.approx(1.0)
    # The run's length is an argument: a time budget that shortens the run ends the decay sooner.
    if name != "constant":
        assert schedule(50, 50) == pytest.approx(0.0) and schedule(50, 100) > 0.4


def test_warmup_in_epochs_or_steps():
    cfg = dict(compose_cfg(["scheduler.warmup_epochs=2"]).scheduler)
    assert make_schedule(cfg, steps_per_epoch=10).warmup_steps == 20
    cfg["warmup_steps"] = 7
    assert make_schedule(cfg, steps_per_epoch=10).warmup_steps == 7
    cfg["warmup_steps"] = -1
    with pytest.raises(ConfigError, match="negative"):
        make_schedule(cfg, steps_per_epoch=10)


def test_setting_the_rate_each_step_equals_lambda_lr():
    """The loop sets every group's rate before each step (nanoGPT's way) instead of stepping a
    LambdaLR after it: the rates are the same floats."""
    schedule = make_schedule(dict(compose_cfg([]).scheduler), steps_per_epoch=10)
    ours = torch.optim.SGD(
        [{"params": [torch.zeros(1)], "lr": 0.3}, {"params": [torch.zeros(1)], "lr": 0.03}]
    )
    ref = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.3}, {"params": [torch.zeros(1)], "lr": 0.03}])
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: schedule(s, 40))
    base = [g["lr"] for g in ours.param_groups]
    for step in range(40):
        set_lr(ours, base, schedule(step, 40))
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
        ref.step()
        lambda_lr.step()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_configs_build_on_param_groups(name):
    cfg = compose_cfg([f"optimizer={name}"])
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(cfg.optimizer, model)
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optimizer.weight_decay, 0.0]
