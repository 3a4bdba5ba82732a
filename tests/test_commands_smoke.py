"""One end-to-end smoke test per command, as a user runs it (`python -m ...` in a subprocess),
in the fast tier. Most live beside the functions they exercise:

    python -m vitexp            tests/test_train.py::test_cli_run_writes_hydra_run_dir
    python -m vitexp.evaluate   tests/test_inspect.py::test_evaluate_cli_composes_a_dataset_from_the_group
    python -m vitexp.predict    tests/test_inspect.py::test_predict_cli_prints_top5_and_fails_in_one_line
    python -m vitexp.attention  tests/test_inspect.py::test_attention_cli_writes_only_the_picture
    python -m vitexp.export     tests/test_inspect.py::test_export_cli
    python -m vitexp.report     tests/test_tracking.py::test_multirun_2x1_with_its_report

The two below had no run through their command line (their functions are tested in-process
in tests/test_weights_sources.py and tests/test_streams.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli


def test_weights_command_lists_the_named_weights():
    result = run_cli(module="vitexp.weights", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert next(r for r in rows if r and r[0] == "ViT-B_16")[:2] == ["ViT-B_16", "vit_b16"]


def test_shards_command_writes_indexed_shards_of_a_dataset(tmp_path: Path):
    out = tmp_path / "shards"
    result = run_cli("dataset=digits", f"out={out}", module="vitexp.shards", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    indexes = {split: json.loads((out / f"{split}.json").read_text()) for split in ("train", "test")}
    counts = {split: sum(s["nsamples"] for s in index["shardlist"]) for split, index in indexes.items()}
    assert sum(counts.values()) == 1797 and counts["test"] > 0  # every digit, once
    assert all((out / s["url"]).is_file() for index in indexes.values() for s in index["shardlist"])
    assert indexes["train"]["classes"] == [str(d) for d in range(10)]
