"""`vitexp.config.validate`: every training setting against its domain, in one place."""

from __future__ import annotations

import pytest

from tests.helpers import compose_cfg
from vitexp.config import Range, declared, experiments_dir, validate
from vitexp.errors import ConfigError

# Each bad value and the one line it gives (the whole message, or its start when it goes on).
BAD = [
    (
        ["trainer.grad_clip=-1"],
        "trainer.grad_clip=-1.0 must be positive (the largest gradient norm), or null to turn clipping off",
    ),
    (["trainer.grad_clip=0"], "trainer.grad_clip=0.0 must be positive"),
    (["trainer.label_smoothing=1"], "trainer.label_smoothing=1.0 must be in [0, 1)"),
    (["trainer.label_smoothing=-0.1"], "trainer.label_smoothing=-0.1 must be in [0, 1)"),
    (["trainer.mixup_alpha=-0.2"], "trainer.mixup_alpha=-0.2 must not be negative (0 turns mixup off)"),
    (["trainer.cutmix_alpha=-1"], "trainer.cutmix_alpha=-1.0 must not be negative (0 turns cutmix off)"),
    (
        ["trainer.ema_decay=1.0"],
        "trainer.ema_decay=1.0 must be between 0 and 1 (e.g. 0.999), or null for no EMA",
    ),
    (["trainer.ema_decay=0"], "trainer.ema_decay=0.0 must be between 0 and 1"),
    (["trainer.max_time=0"], "trainer.max_time=0.0 must be positive (seconds), or null for no time limit"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be positive"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 must be positive"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be positive, or null to train for max_epochs"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be positive"),
    (["trainer.eval_batch_size=-8"], "trainer.eval_batch_size=-8 must be positive"),
    (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps=0 must be positive"),
    (["trainer.log_every_steps=0"], "trainer.log_every_steps=0 must be positive"),
    (
        ["trainer.batch_size=30", "trainer.grad_accum_steps=4"],
        "trainer.batch_size=30 is not divisible by trainer.grad_accum_steps=4; the global batch is split",
    ),
    (["trainer.checkpoint_every_steps=0"], "trainer.checkpoint_every_steps=0 must be positive, or null"),
    (["trainer.keep_last_k=0"], "trainer.keep_last_k=0 must be positive, or null to keep every epoch{N}.pt"),
    (["trainer.monitor=val/f1"], "trainer.monitor='val/f1' is not one of val/acc1, val/acc5, val/loss"),
    (
        ["trainer.monitor=val/acc"],
        "trainer.monitor='val/acc' is not one of val/acc1, val/acc5, val/loss; did you mean",
    ),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite='ignore' is not one of stop, skip"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not one of auto, fp32, bf16, fp16"),
    (
        ["trainer.precision=bf61"],
        "trainer.precision='bf61' is not one of auto, fp32, bf16, fp16; did you mean bf16?",
    ),
    (["trainer.device=gpu"], "trainer.device='gpu' is not a device name; use auto, cpu, cuda or cuda:N"),
    (["trainer.device=cuda:x"], "trainer.device='cuda:x' is not a device name"),
    (["trainer.resume=false"], "trainer.resume='False' is not a checkpoint: give null (a fresh run), auto"),
    (["optimizer.lr=0"], "optimizer.lr=0 must be positive"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 must be positive"),
    (["optimizer.lr=abc"], "optimizer.lr='abc' must be a number"),
    (["optimizer.lr=nan"], "optimizer.lr=nan must be a finite number"),
    (["optimizer.weight_decay=-0.01"], "optimizer.weight_decay=-0.01 must not be negative"),
    (
        ["optimizer.layer_decay=0"],
        "optimizer.layer_decay=0 must be in (0, 1] (0.65 to 0.75 is usual), or null for one rate",
    ),
    (["optimizer.layer_decay=1.5"], "optimizer.layer_decay=1.5 must be in (0, 1]"),
    (
        ["logger=wandb", "logger.wandb.init_timeout=0"],
        "logger.wandb.init_timeout=0 must be positive (seconds wandb.init may take before the run "
        "logs offline)",
    ),
    (
        ["trainer.train_last_blocks=-1"],
        "trainer.train_last_blocks=-1 must not be negative (0 trains the head alone), or null to train every",
    ),
    (["trainer.freeze=head"], "trainer.freeze='head' must be backbone, a list of glob patterns of parameter"),
    (["optimizer=sgd", "optimizer.momentum=1.0"], "optimizer.momentum=1.0 must be in [0, 1)"),
    (["scheduler.warmup_steps=-5"], "scheduler.warmup_steps=-5 must not be negative, or null"),
    (["scheduler.warmup_epochs=-1"], "scheduler.warmup_epochs=-1 must not be negative"),
    (["scheduler.min_lr_ratio=1.5"], "scheduler.min_lr_ratio=1.5 must be in [0, 1]"),
    (["dataset.val_split=1"], "dataset.val_split=1 must be in [0, 1)"),
    (
        ["dataset=imagefolder", "dataset.root=x", "dataset.num_classes=2", "dataset.num_workers=-1"],
        "dataset.num_workers=-1 must not be negative, or null for this process's share of the cores",
    ),
    (
        [
            "dataset=wds",
            "dataset.train_shards=a.json",
            "dataset.test_shards=b.json",
            "dataset.num_classes=2",
            "dataset.shuffle_buffer=2.5",
        ],
        "dataset.shuffle_buffer=2.5 must be an integer",
    ),
    (
        ["dataset=imagefolder", "dataset.root=x", "dataset.num_classes=2", "dataset.on_error=ignore"],
        "dataset.on_error='ignore' is not one of fail, skip",
    ),
    (["seed=-1"], "seed=-1 must not be negative"),
    (["seed=1.5"], "seed=1.5 must be an integer"),
    (["seed=abc"], "seed='abc' must be an integer"),
    (["+trainer.max_epoch=3"], "unknown key trainer.max_epoch: did you mean trainer.max_epochs?"),
    (["+trainer.foo=1"], "unknown key trainer.foo: there is no such setting (--cfg job lists them)"),
    (
        ["dataset=imagefolder"],
        "dataset.num_classes is required here (marked ???): add dataset.num_classes=... to",
    ),
    (["model.num_layers=???"], "model.num_layers is required here (marked ???)"),
    (
        ["model.num_classes=${dataset.nclasses}"],
        "model.num_classes=${dataset.nclasses} refers to dataset.nclasses, which does not exist "
        "(did you mean dataset.num_classes?)",
    ),
    (
        ["model.pretrained=required"],  # what a preset writes for weights it cannot name
        "this preset fine-tunes pretrained weights: add model.pretrained=NAME (e.g. ViT-B_16;",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_each_bad_value_is_one_line_naming_it_and_its_range(overrides, message):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_every_numeric_setting_has_a_bad_value_in_the_table():
    """A numeric setting declared without a case above would have only the generated ones
    (tests/test_setting_contract.py), which check the key, not the message."""
    numeric = {key for key, setting in declared().items() if isinstance(setting.domain, Range)}
    tested = {o.split("=")[0].lstrip("+") for overrides, _ in BAD for o in overrides}
    assert numeric <= tested, numeric - tested


GOOD = [
    "trainer.grad_clip=null",
    "trainer.grad_clip=0.5",
    "trainer.label_smoothing=0",
    "trainer.label_smoothing=0.3",
    "trainer.ema_decay=null",
    "trainer.ema_decay=0.9999",
    "trainer.max_time=null",
    "trainer.max_time=1",
    "trainer.max_steps=1",
    "trainer.checkpoint_every_steps=1",
    "trainer.keep_last_k=1",
    "trainer.device=cpu",
    "trainer.device=cuda",
    "trainer.device=cuda:3",  # whether it exists is for the run to find out
    "trainer.precision=fp16",  # needs a GPU: also the run's to find out
    "trainer.resume=auto",
    "trainer.resume=outputs/run/last.pt",
    "trainer.monitor=val/loss",
    "trainer.on_nonfinite=skip",
    "scheduler.warmup_steps=0",
    "scheduler.min_lr_ratio=1",
    "dataset.val_split=0",
    "optimizer.weight_decay=0",
    "seed=0",
]


@pytest.mark.parametrize("override", GOOD)
def test_values_at_the_edges_of_their_domain_pass(override):
    assert validate(compose_cfg(["trainer.save_every_epoch=true", override])) == []


def test_momentum_is_checked_only_where_the_optimizer_has_it():
    assert "momentum" not in compose_cfg().optimizer
    assert validate(compose_cfg(["optimizer=sgd", "optimizer.momentum=0"])) == []


WARNINGS = [
    (["trainer.keep_last_k=2"], "trainer.keep_last_k=2 has no effect without trainer.save_every_epoch=true"),
    (["trainer.ema_decay=0.5"], "trainer.ema_decay=0.5 averages over only the last ~2 steps"),
    (["trainer.label_smoothing=0.6"], "trainer.label_smoothing=0.6 is unusually large"),
    (["optimizer.lr=3"], "optimizer.lr=3 is unusually large"),
    (["dataset.val_split=0.8"], "dataset.val_split=0.8 holds out most of the training images"),
    (
        ["trainer.max_epochs=2", "scheduler.warmup_epochs=2"],
        "scheduler.warmup_epochs=2 >= trainer.max_epochs=2",
    ),
    (
        ["trainer.max_steps=10", "scheduler.warmup_steps=10"],
        "scheduler.warmup_steps=10 >= trainer.max_steps=10",
    ),
]


@pytest.mark.parametrize(("overrides", "warning"), WARNINGS)
def test_suspicious_but_legal_values_are_warnings(overrides, warning):
    warnings = validate(compose_cfg(overrides))
    assert len(warnings) == 1 and warnings[0].startswith(warning), warnings


def test_the_default_config_gives_no_warning():
    assert validate(compose_cfg()) == []


@pytest.mark.parametrize("name", sorted(p.stem for p in experiments_dir().glob("*.yaml")))
def test_every_preset_passes(name):
    cfg = compose_cfg([f"experiment={name}"])
    assert validate(cfg) == []
