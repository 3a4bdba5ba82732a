"""One end-to-end smoke test per command, as a user runs it (`python -m ...` in a subprocess),
in the fast tier. Most live beside the functions they exercise:

    python -m vitexp            tests/test_train.py::test_cli_run_writes_hydra_run_dir
    python -m vitexp.evaluate   tests/test_inspect.py::test_evaluate_cli_composes_a_dataset_from_the_group
    python -m vitexp.predict    tests/test_inspect.py::test_predict_cli_prints_top5
    python -m vitexp.attention  tests/test_inspect.py::test_attention_cli_writes_only_the_picture
    python -m vitexp.export     tests/test_inspect.py::test_export_cli

The three below are here: `report` (in-process in tests/test_report.py; the command over a
multirun is tests/test_tracking.py::test_multirun_2x1_with_its_report, a sweep), `weights`
and `shards` (their functions are tested in-process in tests/test_weights_sources.py and
tests/test_reliability_data.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import TINY_MODEL, compose_cfg, run_cli
from vitexp.training import train


def test_weights_command_lists_the_named_weights():
    result = run_cli(module="vitexp.weights", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert next(r for r in rows if r and r[0] == "ViT-B_16")[:2] == ["ViT-B_16", "vit_b16"]


def test_shards_command_writes_indexed_shards_of_a_dataset(tmp_path: Path):
    out = tmp_path / "shards"
    # A small dataset of random images: converting real ones (the CIFAR subset) is tested
    # in-process, tests/test_streams.py.
    small = ["dataset=fake", "dataset.load.num_train=100", "dataset.load.num_test=30", "shard_size=40"]
    result = run_cli(*small, f"out={out}", module="vitexp.shards", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    indexes = {split: json.loads((out / f"{split}.json").read_text()) for split in ("train", "test")}
    counts = {split: [s["nsamples"] for s in index["shardlist"]] for split, index in indexes.items()}
    assert counts == {"train": [40, 40, 20], "test": [30]}  # every image, once
    assert all((out / s["url"]).is_file() for index in indexes.values() for s in index["shardlist"])
    assert indexes["train"]["classes"] == [str(d) for d in range(10)]


def test_report_command_over_a_run_folder(tmp_path: Path):
    run_dir = tmp_path / "run"
    tiny = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "dataset.load.num_train=128",
            "dataset.load.num_test=64", "trainer.batch_size=64", "trainer.max_epochs=2",
            "trainer.progress=false", "trainer.sample_figures=false"]  # fmt: skip
    train(compose_cfg(tiny, run_dir=run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    result = run_cli(str(run_dir), module="vitexp.report", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith("1 ")]
    assert row[1:3] == [str(run_dir), "completed"] and float(row[3]) == round(summary["best"]["val/acc1"], 4)
    for name in ("report.csv", "report.md", "report.png", "curves.png"):
        assert (run_dir / name).stat().st_size > 0
