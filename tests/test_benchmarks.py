"""The benchmarks in benchmarks/ run and report, in tiny configurations (no timing thresholds:
the figures depend on the machine; the full runs are commands in benchmarks/README.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from benchmarks import ablation, budget_curve, common, data_path, epoch_overhead, flops, step_vs_timm


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_interleaved_times_every_candidate_and_rotates_the_order():
    calls: list[str] = []
    candidates = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = common.interleaved(candidates, repeats=3, calls=2, warmup=1, device=torch.device("cpu"))
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    assert [timed[0], timed[6], timed[12]] == ["a", "b", "c"]  # each repeat starts elsewhere
    assert all(t >= 0 for v in times.values() for t in v)


def test_table_is_markdown():
    out = common.table(["a", "bb"], [[1, 2.5], ["long", "x"]])
    lines = out.splitlines()
    assert lines[0].startswith("| a ") and set(lines[1]) <= {"|", "-"} and len(lines) == 4


@pytest.mark.slow
def test_step_vs_timm_reports_ratios_for_every_precision():
    results = step_vs_timm.run(shape="tiny", repeats=1, steps=1, optimizer_repeats=1, channels_last=True)
    assert {"for-loop", "foreach"} <= set(results["optimizer_step_ms"])
    assert results["optimizer"] in results["optimizer_step_ms"]
    eager = {f"{model} {precision}" for model in ("vitexp", "timm") for precision in ("fp32", "bf16")}
    assert set(results["candidates"]) == eager | {"vitexp fp32 channels_last", "vitexp bf16 channels_last"}
    for c in results["candidates"].values():
        assert _positive(c["ms_per_step"]) and _positive(c["images_per_s"])
    for key in ("vitexp_fp32_vs_timm_fp32", "vitexp_bf16_vs_timm_fp32", "vitexp_bf16_channels_last_vs_eager"):
        assert _positive(results["ratios"][key])
    assert results["targets"] == {"vitexp_fp32_vs_timm_fp32": 1.0, "vitexp_bf16_vs_timm_fp32": 1.25}
    text = step_vs_timm.report(results)
    assert "vitexp_bf16_vs_timm_fp32" in text and "target >= 1.25x" in text


def test_step_vs_timm_refuses_fp16_on_the_cpu():
    with pytest.raises(ValueError, match="fp16"):
        step_vs_timm.run(shape="tiny", precisions=["fp16"], repeats=1, steps=1, optimizer_repeats=1)


def test_data_path_compares_with_torchvision(cifar_root):
    results = data_path.run(
        root=cifar_root, batch_size=16, workers=(0,), repeats=1, max_batches=2, trivialaugment=True
    )
    pipelines = results["pipelines"]
    assert set(pipelines) == {
        "vitexp",
        "torchvision, 0 workers",
        "vitexp + TrivialAugment",
        "torchvision + TrivialAugmentWide, 0 workers",
    }
    assert all(p["batches_per_epoch"] == 2 and _positive(p["batches_per_s"]) for p in pipelines.values())
    assert _positive(results["ratios"]["vitexp_vs_torchvision_0_workers"])
    assert results["ratio_vs_fastest_baseline"] == results["ratios"]["vitexp_vs_torchvision_0_workers"]
    assert _positive(results["policy_ratios"]["vitexp_ta_vs_torchvision_ta_0_workers"])
    assert "target >= 20x" in data_path.report(results)


def test_data_path_baseline_yields_the_same_batches_as_torchvision_would(cifar_root):
    epoch, n = data_path.torchvision_epoch(
        cifar_root, torch.device("cpu"), batch_size=32, workers=0, max_batches=3
    )
    assert n == 3 and epoch() == 3


@pytest.mark.slow
def test_epoch_overhead_splits_the_epoch_into_phases(cifar_root):
    results = epoch_overhead.run(
        root=cifar_root, shape="tiny", max_steps=3, ab=True, trivialaugment=True, mixup=True
    )
    sec = results["seconds"]
    assert results["steps"] == 3
    assert all(_positive(sec[k]) for k in ("data", "step", "bookkeeping", "epoch"))
    assert sec["data"] + sec["step"] + sec["bookkeeping"] <= sec["epoch"]
    assert 0 < results["overhead"] < 1
    assert math.isclose(sum(results["shares"].values()), 1.0)
    assert _positive(results["ab_seconds"]["real"]) and _positive(results["ab_seconds"]["fixed"])
    assert "target < 10%" in epoch_overhead.report(results)


def test_flop_counts_include_attention_and_match_the_closed_form():
    # The CIFAR shape at batch 1: FlopCounterMode alone misses the CPU attention kernels.
    spec = common.SHAPES["cifar"]
    model = common.vitexp_model(spec)
    forward, train = flops.count_flops(model, torch.randn(1, 3, 32, 32))
    assert forward == pytest.approx(flops.closed_form_forward_flops(spec), rel=1e-9)
    assert 2.9 < train / forward < 3.1


@pytest.mark.slow
def test_flops_reports_fractions_of_the_measured_peak():
    results = flops.run(shapes=("tiny",), matmul_size=64, repeats=1, steps=1, batch_sizes={"tiny": 4})
    entry = results["shapes"]["tiny"]
    assert entry["forward_flops_per_image"] == pytest.approx(entry["closed_form_forward_flops_per_image"])
    assert set(results["peak_flops_per_s"]) == {"fp32", "bf16"}
    for step in entry["steps"].values():
        assert _positive(step["achieved_flops_per_s"]) and _positive(step["fraction_of_peak"])
    assert "fraction of peak" in flops.report(results)


@pytest.mark.slow
def test_scripts_run_from_the_command_line(tmp_path):
    # As a user runs them: `python benchmarks/NAME.py ...`, with the results also as JSON.
    out = tmp_path / "flops.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/flops.py",
            "--quick",
            "--shape",
            "tiny",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        cwd=common.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fraction of peak" in proc.stdout and "load average" in proc.stdout
    assert out.is_file()


@pytest.mark.slow
def test_mains_run_quick(cifar_root, capsys):
    step_vs_timm.main(["--quick", "--shape", "tiny", "--precision", "fp32"])
    data_path.main(["--quick", "--root", str(cifar_root), "--workers", "0", "--batch-size", "16"])
    epoch_overhead.main(["--quick", "--root", str(cifar_root), "--shape", "tiny", "--precision", "bf16"])
    printed = capsys.readouterr().out
    assert "vitexp_fp32_vs_timm_fp32" in printed
    assert "vitexp vs the fastest torchvision configuration" in printed
    assert "outside the training step" in printed


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_on_the_cpu():
    """trainer.compile=true on the CPU: torch.compile'd forward and backward of vitexp's
    ViT give the eager loss and gradients (compiling takes about 20 s)."""
    spec = common.SHAPES["tiny"]
    torch.manual_seed(0)
    eager = common.vitexp_model(spec)
    compiled_model = common.vitexp_model(spec)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    losses = []
    for model in (eager, compiled):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ablation.ROWS))
def test_every_ablation_row_composes_and_builds(row):
    """A typo in a row would only show after an hour of the other rows: compose each now."""
    from tests.helpers import compose_cfg
    from vitexp.models import build_model

    cfg = compose_cfg(["experiment=cifar10_subset_cpu", "dataset.val_split=0.1", *ablation.ROWS[row][1]])
    model = build_model(cfg.model)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_ablation_table_reports_the_difference_to_the_preset():
    common_keys = {"images_per_sec": 640.0, "params": 480000}
    rows = [
        {"row": "preset", "change": "p", "val_acc1": 0.60, "epochs": 20, **common_keys},
        {"row": "ema", "change": "e", "val_acc1": 0.625, "epochs": 19, **common_keys},
    ]
    lines = ablation.table(rows).splitlines()
    assert lines[2].startswith("| `preset` | p | 60.0% |  | 20 | 640 |")
    assert lines[3].startswith("| `ema` | e | 62.5% | +2.5 | 19 | 640 | 0.48M |")


def test_budget_curve_plans_the_presets_seeds_at_ten_minutes_and_one_elsewhere():
    runs = budget_curve.plan(["vitexp", "timm_vit"], [150.0, 600.0], [0, 1, 2])
    assert runs[:4] == [
        ("vitexp", 150.0, 0),
        ("vitexp", 600.0, 0),
        ("vitexp", 600.0, 1),
        ("vitexp", 600.0, 2),
    ]
    assert runs[4:] == [("timm_vit", 150.0, 0), ("timm_vit", 600.0, 0)]  # the reference: one seed
    more = budget_curve.plan(["timm_vit"], [600.0, 300.0], [0, 1, 2], [3, 4])
    assert more == [("timm_vit", 600.0, 3), ("timm_vit", 600.0, 4), ("timm_vit", 300.0, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(budget_curve.RECIPES))
def test_every_budget_curve_recipe_builds_the_model_it_names(recipe):
    from hydra import compose, initialize_config_dir

    from vitexp.config import conf_dir
    from vitexp.models import build_model

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=budget_curve.RECIPES[recipe][1])
    model = build_model(cfg.model)
    assert model.img_size == (32, 32) and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    expected = "timm.models.vision_transformer" if recipe == "timm_vit" else "vitexp.models"
    assert type(model).__module__.startswith(expected)


@pytest.mark.slow
def test_budget_curve_trains_each_recipe_reads_its_summary_and_draws(tmp_path, cifar_root):
    # Two optimizer steps per point: the loop, the summary and the figure, not the accuracy.
    quick = ["trainer.max_steps=2", "trainer.batch_size=32", "trainer.eval_batch_size=100"]
    points = [
        budget_curve.run_point(recipe, 30.0, 0, cifar_root, tmp_path, quick, patience=0)
        for recipe in budget_curve.RECIPES
    ]
    for point in points:
        assert 0.0 <= point.test_acc1 <= 1.0 and point.epochs == 1 and point.images_per_sec > 0
        assert (tmp_path / f"{point.recipe}_30s_seed0" / "last.pt").is_file()
    hflip = json.loads((tmp_path / "vitexp_30s_seed0" / "last_eval_test_hflip.json").read_text())
    assert hflip["hflip"] is True and hflip["acc1"] == points[0].test_acc1_hflip
    assert points[1].test_acc1_hflip is None  # timm's model is not rebuilt from a checkpoint
    # A finished point is read back, not trained again.
    mtime = (tmp_path / "vitexp_30s_seed0" / "summary.json").stat().st_mtime
    assert budget_curve.run_point("vitexp", 30.0, 0, cifar_root, tmp_path, quick, patience=0) == points[0]
    assert (tmp_path / "vitexp_30s_seed0" / "summary.json").stat().st_mtime == mtime
    budget_curve.draw(points, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_budget_curve_table_and_medians_over_seeds():
    def point(recipe: str, budget: float, seed: int, acc: float) -> budget_curve.Point:
        return budget_curve.Point(recipe, budget, seed, acc, acc + 0.01, 10, 100.0, 500.0, 0.2)

    points = [point("vitexp", 600.0, s, a) for s, a in ((0, 0.62), (1, 0.70), (2, 0.66))]
    points.append(budget_curve.Point("timm_vit", 150.0, 0, 0.40, None, 3, 100.0, 300.0, 0.1))
    assert budget_curve.medians(points) == {"timm_vit": [(150.0, 0.40)], "vitexp": [(600.0, 0.66)]}
    lines = budget_curve.table(points).splitlines()
    assert (
        lines[2] == "| `vitexp` | 10 min | 3 | 66.0% | 62.0 / 70.0 / 66.0 | 67.0% | 10/10/10 | 500 | 0.20 |"
    )
    assert lines[3] == "| `timm_vit` | 2.5 min | 1 | 40.0% | 40.0 | — | 3 | 300 | 0.10 |"


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_writes_its_table(tmp_path):
    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {r["check"]: r for r in results["rows"]}
    for name in (
        "train fp32",
        "train bf16",
        "SIGTERM + resume, fp32, deterministic",
        "1-process gloo DDP = plain",
    ):
        assert checks[name]["ok"] is True, checks[name]
    assert checks["no host sync inside a step"] == {
        "group": "correctness", "check": "no host sync inside a step", "ok": None, "result": "CUDA only"
    }  # fmt: skip
    assert "weights bitwise equal" in checks["SIGTERM + resume, fp32, deterministic"]["result"]
    assert any(r["group"] == "speed" and "images/s, MFU" in r["result"] for r in results["rows"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check on ") and "| correctness | train fp32" in table
