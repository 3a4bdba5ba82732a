"""Checkpoints written before the training loop was restructured (format 1) still resume and
still load in the inspection commands, with the numbers that code produced
(tests/fixtures/README.md says how the fixture was made)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import compose_cfg, rows
from vitexp.commands.evaluate import evaluate_checkpoint
from vitexp.training import train

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "format1_digits_step15.pt"
RECORD = json.loads((FIXTURES / "format1_digits_step15.json").read_text())


@pytest.mark.slow
def test_resuming_a_format_1_checkpoint_continues_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*RECORD["overrides"], f"trainer.resume={CHECKPOINT}"], run_dir=run_dir)
    train(cfg)
    got = [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows(run_dir)]
    expected = RECORD["metrics_after_step_15"]
    assert [r["step"] for r in got] == [r["step"] for r in expected]  # steps 16-22, then the evaluation
    # Losses, evaluation metrics (EMA and raw weights): the same floats as the old code's.
    without_lr = [{k: v for k, v in r.items() if k != "train/lr"} for r in got]
    assert without_lr == [{k: v for k, v in r.items() if k != "train/lr"} for r in expected]
    # train/lr is now the rate the logged step used; format-1 runs logged the next step's.
    new_lr = {r["step"]: r["train/lr"] for r in got if "train/lr" in r}
    old_lr = {r["step"]: r["train/lr"] for r in expected if "train/lr" in r}
    assert [new_lr[s] for s in range(17, 23)] == [old_lr[s - 1] for s in range(17, 23)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"] == RECORD["final"] and summary["best"] == RECORD["best"]


def test_a_format_1_checkpoint_evaluates_as_it_did(tmp_path):
    report = evaluate_checkpoint(CHECKPOINT, output=tmp_path / "eval.json", device="cpu")
    assert {k: report[k] for k in RECORD["evaluate"]} == RECORD["evaluate"]
