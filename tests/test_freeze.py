"""Freezing and partial fine-tuning (`trainer.freeze`, `trainer.train_last_blocks`): what
trains, what stays bitwise unchanged through training and resume, and the one-line refusals."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers import TINY_MODEL, compose_cfg
from vitexp.errors import ConfigError
from vitexp.models import CvT, VisionTransformer
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint
from vitexp.training.distributed import SINGLE_PROCESS
from vitexp.training.finetune import freeze
from vitexp.training.optim import param_groups
from vitexp.training.setup import build

FAST = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false",
        "trainer.sample_figures=false"]  # fmt: skip
FROZEN = ["embeddings.*", "encoder.layer.0.*"]


def vit() -> VisionTransformer:
    return VisionTransformer(img_size=8, patch_size=4, num_classes=3, hidden_size=16, mlp_dim=32, num_heads=2,
                             num_layers=3)  # fmt: skip


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_a_linear_probe_trains_the_classifier_alone_and_the_optimizer_sees_nothing_else():
    model = vit()
    freeze(model, "backbone", None)
    assert trainable(model) == {"head.weight", "head.bias"}
    groups = param_groups(model, 0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == 2


def test_patterns_freeze_the_parameters_they_match():
    model = vit()
    freeze(model, FROZEN, None)
    names = {name for name, _ in model.named_parameters()}
    assert trainable(model) == {n for n in names if not n.startswith(("embeddings.", "encoder.layer.0."))}
    one = vit()
    freeze(one, ["head.*"], None)
    assert trainable(one) == names - {"head.weight", "head.bias"}


@pytest.mark.parametrize(
    ("count", "first_trained"), [(0, None), (1, "encoder.layer.2."), (2, "encoder.layer.1.")]
)
def test_train_last_blocks_trains_those_blocks_and_everything_above(count, first_trained):
    model = vit()
    freeze(model, None, count)
    above = {"head.weight", "head.bias"} | (
        {"encoder.encoder_norm.weight", "encoder.encoder_norm.bias"} if count else set()
    )
    blocks = {n for n, _ in model.named_parameters() if n.startswith("encoder.layer.")}
    if first_trained is not None:
        layer = int(first_trained.split(".")[2])
        above |= {n for n in blocks if int(n.split(".")[2]) >= layer}
    assert trainable(model) == above


def test_train_last_blocks_counts_every_cvt_stage():
    stages = {"patch_size": [3, 3, 3], "patch_stride": [1, 2, 2], "patch_padding": [1, 1, 1]}
    sizes = {"hidden_size": [8, 16, 32], "num_heads": [1, 2, 2], "num_layers": [1, 2, 1]}
    model = CvT(img_size=16, num_classes=4, **sizes, **stages)
    freeze(model, None, 2)
    tops = {n.rsplit(".", 2)[0] if n.startswith("stages.") else n.split(".")[0] for n in trainable(model)}
    # The last two blocks: stage 1's second and stage 2's one, with stage 2's embedding and token.
    assert {t for t in tops if t.startswith("stages.")} >= {"stages.1.layer.1.ffn", "stages.2.layer.0.ffn"}
    assert not any(
        n.startswith(("stages.0.", "stages.1.layer.0.", "stages.1.embeddings.")) for n in trainable(model)
    )
    assert {
        "stages.2.cls_token",
        "stages.2.embeddings.projection.weight",
        "norm.weight",
        "head.weight",
    } <= trainable(model)


@pytest.mark.parametrize(
    ("spec", "last", "message"),
    [
        (["embeddings.*", "blocks.*"], None,
         "trainer.freeze: blocks.* matches no parameter of VisionTransformer; its parameters are "
         "embeddings.*, encoder.*, head.*"),
        (None, 4, "trainer.train_last_blocks=4 but the model has 3 blocks; give at most 3"),
        ("backbone", 1, "trainer.freeze and trainer.train_last_blocks both choose what trains"),
    ],
)  # fmt: skip
def test_what_cannot_be_frozen_is_one_line(spec, last, message):
    with pytest.raises(ConfigError) as err:
        freeze(vit(), spec, last)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_frozen_parameters_are_bitwise_unchanged_through_training_and_resume(tmp_path, caplog):
    overrides = [*FAST, f"trainer.freeze=[{','.join(FROZEN)}]", "optimizer.layer_decay=0.75"]
    cfg = compose_cfg([*overrides, "trainer.max_steps=2"])
    run = build(cfg, SINGLE_PROCESS)  # the initial weights: the seed draws them before training
    initial = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.close()
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vitexp"):
        train(cfg, run_dir=run_dir)
    assert "M trainable |" in caplog.text
    first = load_checkpoint(run_dir / "last.pt")
    # Resumed for two more steps, with the same freezing.
    more = compose_cfg(
        [*overrides, "trainer.max_steps=4", "trainer.resume=auto", "trainer.resume_allow_changes=true"]
    )
    train(more, run_dir=run_dir)
    last = load_checkpoint(run_dir / "last.pt")
    assert last["progress"]["global_step"] == 4
    frozen = {k for k in initial if k.startswith(("embeddings.", "encoder.layer.0."))}
    assert frozen and all(torch.equal(last["model"][k], initial[k]) for k in frozen)
    assert all(
        not torch.equal(first["model"][k], last["model"][k])
        for k in ("head.weight", "encoder.layer.1.ffn.fc1.weight")
    )
    # No optimizer state for the frozen ones: AdamW's moments exist for the trainable parameters only.
    trained = [k for k in initial if k not in frozen]
    assert len(last["optimizer"]["state"]) == len(trained)
    assert sum(len(g["params"]) for g in last["optimizer"]["param_groups"]) == len(trained)


def test_a_resume_that_changes_what_is_frozen_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg([*FAST, "trainer.max_steps=1", "trainer.freeze=backbone"]), run_dir=run_dir)
    cfg = compose_cfg(
        [*FAST, "trainer.max_steps=2", "trainer.resume=auto", "trainer.resume_allow_changes=true"]
    )
    refusal = r"would change trainer.freeze \('backbone' -> None\), which cannot change"
    with pytest.raises(ConfigError, match=refusal):
        train(cfg, run_dir=run_dir)
