"""The training run: library call and command line, records, precision, accumulation, errors."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO, TINY_MODEL, assert_final_is_last_checkpoint, compose_cfg, run_cli
from vitexp.data import BatchTransform, DeviceLoader, Split
from vitexp.errors import ConfigError
from vitexp.models import VisionTransformer, build_model
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint
from vitexp.training.metrics import score

FAKE_TINY = ["dataset=fake", "model=vit_ti4", "model.img_size=16", *TINY_MODEL, "trainer.progress=false"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_one_epoch_on_digits_leaves_a_complete_run_dir(cfg_factory):
    cfg = cfg_factory("experiment=digits", "trainer.max_epochs=1", "trainer.progress=false")
    best = train(cfg)
    run_dir = Path(cfg.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["val/acc1"] == best and summary["steps"] == 1437 // 32
    assert summary["eval_split"] == "test" and summary["images_per_sec"] > 0
    assert "git_commit" in summary
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in records if "train/loss" in r]
    eval_rows = [r for r in records if "val/acc1" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == 44 and eval_rows[0]["epoch"] == 1
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 44]
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["progress"]["epoch"] == 1 and ckpt["progress"]["global_step"] == 44
    assert ckpt["config"]["model"]["patch_size"] == 2
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    # The checkpoint rebuilds the model from its own config.
    model = build_model(ckpt["config"]["model"])
    model.load_state_dict(ckpt["model"])
    assert (run_dir / "best.pt").is_file() and (run_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_cifar_subset_smoke(cfg_factory, cifar_root):
    cfg = cfg_factory(
        "dataset=cifar10", f"dataset.root={cifar_root}", "model=vit_ti4", *TINY_MODEL,
        "trainer.max_epochs=1", "trainer.batch_size=128", "trainer.progress=false",
    )  # fmt: skip
    train(cfg)
    summary = assert_final_is_last_checkpoint(Path(cfg.run_dir))
    assert summary["steps"] == 5085 // 128 and summary["epochs"] == 1


@pytest.mark.slow
def test_loss_goes_down_on_digits(cfg_factory):
    cfg = cfg_factory("experiment=digits", "trainer.max_epochs=6", "trainer.progress=false")
    train(cfg)
    rows = [r for r in read_jsonl(Path(cfg.run_dir) / "metrics.jsonl") if "val/loss" in r]
    assert rows[-1]["val/loss"] < rows[0]["val/loss"] - 0.1


@pytest.mark.slow
def test_same_seed_same_run(cfg_factory, tmp_path):
    a = cfg_factory(*FAKE_TINY, "trainer.max_steps=4", "trainer.batch_size=32")
    train(a)
    b = cfg_factory(*FAKE_TINY, "trainer.max_steps=4", "trainer.batch_size=32")
    b.run_dir = str(tmp_path / "b")
    train(b)
    wa = load_checkpoint(Path(a.run_dir) / "last.pt")["model"]
    wb = load_checkpoint(Path(b.run_dir) / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_gradient_accumulation_keeps_the_global_batch(cfg_factory, tmp_path):
    """4 micro-batches of 8 make the same update as one batch of 32."""
    common = [*FAKE_TINY, "trainer.max_steps=3", "trainer.batch_size=32", "optimizer=sgd"]
    one = cfg_factory(*common)
    one.run_dir = str(tmp_path / "one")
    four = cfg_factory(*common, "trainer.grad_accum_steps=4")
    four.run_dir = str(tmp_path / "four")
    train(one)
    train(four)
    w1 = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    w4 = load_checkpoint(tmp_path / "four" / "last.pt")["model"]
    for key in w1:
        torch.testing.assert_close(w1[key], w4[key], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_bf16_autocast_on_cpu_computes_in_bf16(cfg_factory, tmp_path):
    """The same run in fp32 and bf16: the losses differ (bf16 rounds every matmul's inputs to
    8 bits of mantissa) but stay close, and the logits inside the step are bf16."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = cfg_factory(*FAKE_TINY, "trainer.max_steps=3", "trainer.batch_size=32",
                          "trainer.log_every_steps=1", f"trainer.precision={precision}")  # fmt: skip
        cfg.run_dir = str(tmp_path / precision)
        dtypes = []

        def loss(logits, target, dtypes=dtypes):
            dtypes.append(logits.dtype)
            return torch.nn.functional.cross_entropy(logits, target)

        train(cfg, loss_fn=loss)
        runs[precision] = (
            [r["train/loss"] for r in read_jsonl(Path(cfg.run_dir) / "metrics.jsonl") if "train/loss" in r],
            dtypes,
        )
    (fp32, fp32_dtypes), (bf16, bf16_dtypes) = runs["fp32"], runs["bf16"]
    assert set(fp32_dtypes) == {torch.float32} and set(bf16_dtypes) == {torch.bfloat16}
    assert fp32 != bf16
    assert all(abs(a - b) < 0.05 * a for a, b in zip(fp32, bf16, strict=True))


def tiny_model_and_split() -> tuple[VisionTransformer, Split, BatchTransform]:
    """A 6-class ViT on 8×8 images and 10 random images (seeded): for checks of score."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, num_classes=6, hidden_size=16, mlp_dim=32,
                              num_heads=2, num_layers=1).eval()  # fmt: skip
    split = Split(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 6, (10,)))
    transform = BatchTransform(img_size=8, mean=[0.5] * 3, std=[0.5] * 3)
    return model, split, transform


def test_score_counts_the_true_number_of_samples():
    model, split, transform = tiny_model_and_split()
    got = score(
        model,
        DeviceLoader(split, batch_size=4, transform=transform, train=False),
        torch.autocast("cpu", enabled=False),
    )
    with torch.no_grad():
        logits = model(transform.eval(split.images))
    assert got["acc1"] == pytest.approx((logits.argmax(1) == split.labels).float().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    top5 = logits.topk(5, dim=1).indices
    assert got["acc5"] == pytest.approx((top5 == split.labels[:, None]).any(1).float().mean().item())


def test_score_with_hflip_is_the_mean_logits_of_each_image_and_its_mirror():
    model, split, transform = tiny_model_and_split()
    loader = DeviceLoader(split, batch_size=4, transform=transform, train=False)
    plain = score(model, loader, torch.autocast("cpu", enabled=False))
    got = score(model, loader, torch.autocast("cpu", enabled=False), hflip=True)
    with torch.no_grad():
        x = transform.eval(split.images)
        logits = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    assert got["acc1"] == pytest.approx((logits.argmax(1) == split.labels).float().mean().item())
    assert got["loss"] != pytest.approx(plain["loss"], rel=1e-4)  # the mirror images do count


@pytest.mark.slow
def test_eval_hflip_is_logged_beside_the_plain_metrics_which_pick_best(cfg_factory):
    cfg = cfg_factory(*FAKE_TINY, "trainer.max_epochs=2", "trainer.batch_size=64", "trainer.eval_hflip=true",
                      "trainer.sample_figures=false")  # fmt: skip
    best = train(cfg)
    run_dir = Path(cfg.run_dir)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert len(evals) == 2 and all("val_hflip/acc1" in r and "val_hflip/loss" in r for r in evals)
    assert evals[-1]["val_hflip/loss"] != evals[-1]["val/loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["val_hflip/acc1"] == evals[-1]["val_hflip/acc1"]
    assert best == max(r["val/acc1"] for r in evals)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.precision=fp16"], "trainer.precision=fp16 needs a CUDA GPU"),
        (
            ["trainer.batch_size=4096"],
            "trainer.batch_size=4096 is larger than the training set (1024 images)",
        ),
        (["optimizer.lr=0"], "optimizer.lr=0 must be positive"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be positive"),
        (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 must be positive"),
        (
            ["trainer.batch_size=30", "trainer.grad_accum_steps=4"],
            "not divisible by trainer.grad_accum_steps=4",
        ),
        (["model.img_size=30"], "model: img_size=30 is not divisible by patch_size=4"),
        (["model.num_heads=3"], "model: hidden_size=32 is not divisible by num_heads=3"),
        (["model.num_classes=5"], "model.num_classes=5 but the dataset has 10 classes"),
        (["trainer.monitor=val/f1"], "trainer.monitor='val/f1' is not one of"),
        (["trainer.ema_decay=1.0"], "trainer.ema_decay=1.0 must be between 0 and 1"),
        (
            ["+optimizer.momentum=0.9"],
            "optimizer.momentum is not an argument of AdamW (it takes lr, betas, eps, weight_decay,",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(cfg_factory, overrides, message):
    cfg = cfg_factory(*FAKE_TINY, "trainer.max_steps=1", *overrides)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_required_setting_left_unset_is_named(cfg_factory):
    cfg = cfg_factory(*FAKE_TINY, "model.pretrained=required")
    with pytest.raises(
        ConfigError, match=r"this preset fine-tunes pretrained weights: add model.pretrained=NAME"
    ):
        train(cfg)
    cfg = cfg_factory(*FAKE_TINY, "model.num_layers=???")
    with pytest.raises(ConfigError, match=r"model.num_layers is required here \(marked \?\?\?\)"):
        train(cfg)


def test_cli_run_writes_hydra_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*FAKE_TINY, "trainer.max_steps=2", "trainer.batch_size=32", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml", "metrics.jsonl", "last.pt",
                 "best.pt", "summary.json", "__main__.log"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert "epoch 1/1" in result.stdout and "done: best val/acc1" in result.stdout


@pytest.mark.slow
def test_cli_bad_setting_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = run_cli(*FAKE_TINY, "model.img_size=30", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "img_size=30 is not divisible by patch_size=4" in errors[0]


@pytest.mark.slow
def test_cli_cifar100_without_network_fails_fast_saying_how_to_provide_it(tmp_path):
    """`python -m vitexp model=vit_b16 dataset=cifar100` here: torchvision's download cannot
    reach the network, and the run stops with what to do instead."""
    try:
        result = run_cli("model=vit_b16", "dataset=cifar100", f"dataset.root={tmp_path / 'data'}",
                         f"hydra.run.dir={tmp_path / 'run'}", timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the download attempt did not fail fast")
    if (tmp_path / "data" / "cifar-100-python").is_dir():
        pytest.skip("this machine has a network: CIFAR-100 was downloaded")
    assert result.returncode == 2
    assert "could not download cifar100" in result.stdout + result.stderr
    assert "dataset.root=" in result.stdout + result.stderr


def test_the_quickstart_runs_the_preset_the_readme_describes():
    """`make quickstart` runs experiment=digits, and that preset is the run the README measures
    (a micro ViT: 4 layers, width 64, 2x2 patches, average pooling; 100 epochs of AdamW with
    warmup-cosine and label smoothing on the digits)."""
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.runtime", "quickstart"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert dry_run.stdout.strip().splitlines()[-1] == ".venv/bin/python -m vitexp experiment=digits"
    cfg = compose_cfg(["experiment=digits"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.patch_size, m.classifier, m.img_size) == (4, 64, 2, "gap", 8)
    assert cfg.trainer.max_epochs == 100 and cfg.trainer.label_smoothing == 0.1 and cfg.seed == 0
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.scheduler._target_.endswith("warmup_cosine")
    assert cfg.dataset.load._target_ == "vitexp.data.load_digits"
    readme = (REPO / "README.md").read_text()
    assert "python -m vitexp experiment=digits" in readme and "4 layers, width" in readme


@pytest.mark.slow
def test_fine_tune_from_a_previous_run_with_another_head(cfg_factory, tmp_path):
    """`model.pretrained=last.pt` of a 10-class run into a 5-class run: the encoder is
    imported, the head is new (zeros with zero_head)."""
    first = cfg_factory(*FAKE_TINY, "trainer.max_steps=2", "trainer.batch_size=32")
    train(first)
    source = load_checkpoint(Path(first.run_dir) / "last.pt")["model"]
    second = cfg_factory(
        *FAKE_TINY, "trainer.max_steps=1", "trainer.batch_size=32", "dataset.num_classes=5",
        f"model.pretrained={first.run_dir}/last.pt", "model.zero_head=true", "optimizer.lr=1e-9",
    )  # fmt: skip
    second.run_dir = str(tmp_path / "second")
    train(second)
    tuned = load_checkpoint(tmp_path / "second" / "last.pt")["model"]
    assert tuned["head.weight"].shape == (5, 32)
    assert tuned["head.weight"].abs().max() < 1e-6
    # With a vanishing learning rate the imported encoder is (almost) unchanged.
    torch.testing.assert_close(
        tuned["encoder.layer.1.attn.qkv.weight"], source["encoder.layer.1.attn.qkv.weight"]
    )


@pytest.mark.slow
def test_max_time_stops_on_time_with_a_schedule_that_ends_there(cfg_factory):
    cfg = cfg_factory(*FAKE_TINY, "trainer.max_epochs=100000", "trainer.max_time=4", "trainer.batch_size=32",
                      "trainer.log_every_steps=2", "scheduler.warmup_epochs=0")  # fmt: skip
    start = time.time()
    train(cfg)
    elapsed = time.time() - start
    run_dir = Path(cfg.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "max_time" and summary["epochs"] < 100000
    assert elapsed < 4 + 15  # set-up and the final evaluation come on top of the budget
    lrs = [r["train/lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in r]
    assert lrs[0] > 0.5e-3 and lrs[-1] < 0.2e-3  # the cosine ran (almost) to its end within the budget
    assert load_checkpoint(run_dir / "last.pt")["progress"]["epoch_complete"]


@pytest.mark.slow
def test_mixup_cutmix_and_randaugment_train(cfg_factory):
    cfg = cfg_factory(
        *FAKE_TINY, "trainer.max_steps=3", "trainer.batch_size=32", "trainer.mixup_alpha=0.8",
        "trainer.cutmix_alpha=1.0", "dataset.augment.randaugment={num_ops: 2, magnitude: 9}",
    )  # fmt: skip
    targets = []

    def loss(logits, target):
        targets.append(target)
        return torch.nn.functional.cross_entropy(logits, target)

    best = train(cfg, loss_fn=loss)
    assert best == json.loads((Path(cfg.run_dir) / "summary.json").read_text())["best"]["val/acc1"]
    # The loss sees soft targets: rows of class probabilities, most of them mixing two classes.
    assert len(targets) == 3 and all(t.shape == (32, 10) and t.dtype == torch.float32 for t in targets)
    assert all(torch.allclose(t.sum(1), torch.ones(32)) for t in targets)
    assert sum(int(((t > 0) & (t < 1)).any(1).sum()) for t in targets) > 48


def test_trivialaugment_and_randaugment_together_is_an_error(cfg_factory):
    cfg = cfg_factory(*FAKE_TINY, "trainer.max_steps=1", "dataset.augment.trivialaugment=true",
                      "dataset.augment.randaugment={num_ops: 1}")  # fmt: skip
    with pytest.raises(ConfigError, match="choose randaugment or trivialaugment, not both"):
        train(cfg)


@pytest.mark.slow
def test_ema_weights_are_evaluated_checkpointed_used_for_inference_and_resumed(cfg_factory, tmp_path):
    from vitexp.commands.evaluate import evaluate_checkpoint

    ema = [*FAKE_TINY, "trainer.max_epochs=2", "trainer.batch_size=32", "trainer.ema_decay=0.9",
           "trainer.save_every_epoch=true", "trainer.sample_figures=false"]  # fmt: skip
    cfg = cfg_factory(*ema)
    train(cfg)
    run_dir = Path(cfg.run_dir)
    last = load_checkpoint(run_dir / "last.pt")
    assert last["ema_updates"] == 64  # one update per optimizer step: 2 epochs × 1024 / 32
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    # The run reports the EMA's accuracy (val/*) and the raw weights' beside it (val_raw/*).
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert all("val_raw/loss" in r for r in evals) and evals[-1]["val/loss"] != evals[-1]["val_raw/loss"]
    report = evaluate_checkpoint(run_dir / "last.pt", device="cpu", output=tmp_path / "eval.json")
    assert report["loss"] == pytest.approx(summary["final"]["val/loss"], rel=1e-5)
    # Resuming from the epoch-1 checkpoint restores the average too: the same final EMA.
    resumed = compose_cfg([*ema, f"trainer.resume={run_dir}/epoch1.pt"], run_dir=tmp_path / "resumed")
    train(resumed)
    again = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert again["ema_updates"] == 64
    assert all(torch.equal(again["ema"][k], last["ema"][k]) for k in last["ema"])
