"""Pictures and tables of runs: `curves.png` from a run's metrics.jsonl (vitexp.curves) and
`python -m vitexp.report` over run folders and sweep folders (vitexp.report), in-process.

One tiny run is trained per module (the loop's own metrics.jsonl and summary.json); the
other runs of a report are copies of it with their overrides and results rewritten, so the
tables' ordering and columns are checked against known values without training more."""

from __future__ import annotations

import csv
import json
import logging
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import TINY_MODEL, compose_cfg, rows
from vitexp.commands.report import main, read_runs, read_sweep
from vitexp.curves import read_metrics, save_curves, write_curves
from vitexp.errors import DataError
from vitexp.training import train

SMALL = ["dataset=fake", *TINY_MODEL, "model.img_size=16", "trainer.batch_size=64", "trainer.progress=false"]


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory) -> tuple[Path, set[str]]:
    """A run of 3 epochs of 2 steps, logging every step: loss, accuracy and lr curves. Returns
    its folder and the files that training left in it."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    overrides = [
        *SMALL,
        "dataset.load.num_train=128",
        "dataset.load.num_test=64",
        "trainer.max_epochs=3",
        "trainer.log_every_steps=1",
        "trainer.sample_figures=false",
    ]
    train(compose_cfg(overrides, run_dir=run_dir))
    trained = {p.name for p in run_dir.iterdir()}
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optimizer.lr=0.001", "seed=0"]))
    return run_dir, trained


@pytest.fixture
def tiny_run(tiny_training) -> Path:
    return tiny_training[0]


def picture(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def assert_drawn(path: Path) -> None:
    """A PNG with lines on it: many colours, not one flat background."""
    pixels = picture(path).reshape(-1, 3)
    assert pixels.std() > 20 and len(np.unique(pixels, axis=0)) > 50


def job_copy(source: Path, dest: Path, overrides: list[str], best: float, final: float) -> Path:
    """A copy of a finished run with other overrides and other results."""
    shutil.copytree(source, dest)
    (dest / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = json.loads((dest / "summary.json").read_text())
    summary["best"]["val/acc1"], summary["final"]["val/acc1"] = best, final
    (dest / "summary.json").write_text(json.dumps(summary))
    return dest


# --------------------------------------------------------------------------- curves.png


def test_curves_of_a_run_show_loss_accuracy_and_lr_against_steps(tiny_run, tmp_path):
    records = read_metrics(tiny_run)
    assert records == rows(tiny_run)
    assert {"train/loss", "train/lr", "val/loss", "val/acc1"} <= {k for r in records for k in r}
    path = write_curves(tiny_run)
    assert path == tiny_run / "curves.png"
    assert_drawn(path)
    # Three panels side by side: wider than tall.
    height, width, _ = picture(path).shape
    assert width > 2.5 * height
    # The picture is of these metrics: other values draw another picture.
    changed = [{k: v * 0.5 if k == "val/acc1" else v for k, v in r.items()} for r in records]
    save_curves({"run": changed}, tmp_path / "changed.png", title=str(tiny_run))
    assert not np.array_equal(picture(tmp_path / "changed.png"), picture(path))


def test_metrics_being_written_are_read_up_to_the_last_whole_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = (tiny_run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 99, "train/lo')
    assert read_metrics(run) == rows(tiny_run)
    (run / "metrics.jsonl").write_text('{"step": 1\n' + text)
    with pytest.raises(DataError, match=r"metrics.jsonl line 1 is not a JSON record"):
        read_metrics(run)


def test_a_run_without_metrics_draws_nothing_and_a_failure_only_warns(tmp_path, caplog):
    assert write_curves(tmp_path) is None and not (tmp_path / "curves.png").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "train/loss": 1.0}\n')
    with caplog.at_level(logging.WARNING, logger="vitexp.curves"):
        assert write_curves(tmp_path) is None
    assert "could not draw" in caplog.text and "line 1 is not a JSON record" in caplog.text


def test_every_run_writes_its_curves(tiny_training):
    assert "curves.png" in tiny_training[1]


# --------------------------------------------------------------------------- the report


def test_report_of_one_run_folder(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run) in out and "optimizer.lr=0.001 seed=0" in out and "report.csv" in out
    with (run / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    # A single run: every override is a column of its own.
    assert table == [
        {
            "rank": "1",
            "job": str(run),
            "optimizer.lr": "0.001",
            "seed": "0",
            "status": "completed",
            "best val/acc1": f"{summary['best']['val/acc1']:.4f}",
            "best epoch": str(summary["best"]["epoch"]),
            "final val/acc1": f"{summary['final']['val/acc1']:.4f}",
            "train seconds": f"{summary['train_seconds']:.1f}",
            "error": "",
        }
    ]
    for name in ("report.png", "curves.png"):
        assert_drawn(run / name)


def test_report_of_run_and_sweep_folders_has_a_column_per_swept_key(tiny_run, tmp_path, capsys):
    sweep = tmp_path / "multirun"
    job_copy(tiny_run, sweep / "0", ["optimizer.lr=0.001", "seed=0", "model=vit_ti4"], best=0.5, final=0.25)
    job_copy(tiny_run, sweep / "1", ["optimizer.lr=0.003", "seed=0", "model=vit_ti4"], best=0.75, final=0.5)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a failed job
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optimizer.lr=-1", "seed=0"]))
    (sweep / "2" / "error.txt").write_text("error: optimizer.lr=-1 must be positive\n")
    single = job_copy(tiny_run, tmp_path / "single", ["optimizer.lr=0.001", "seed=1"], best=0.625, final=0.6)
    out = tmp_path / "report"
    assert main([str(sweep), str(single), "--out", str(out)]) == 0
    with (out / "report.csv").open() as f:
        header, *table = list(csv.reader(f))
    # Keys that differ between the runs, in the order given; model= is the same everywhere.
    assert header == [
        "rank", "job", "optimizer.lr", "seed", "status", "best val/acc1", "best epoch", "final val/acc1",
        "train seconds", "error",
    ]  # fmt: skip
    assert [row[:5] + row[5:6] + row[7:8] for row in table] == [
        ["1", str(sweep / "1"), "0.003", "0", "completed", "0.7500", "0.5000"],
        ["2", str(single), "0.001", "1", "completed", "0.6250", "0.6000"],
        ["3", str(sweep / "0"), "0.001", "0", "completed", "0.5000", "0.2500"],
        ["4", str(sweep / "2"), "-1", "0", "failed", "", ""],
    ]
    assert table[-1][-1] == "error: optimizer.lr=-1 must be positive"
    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith("| rank | job | optimizer.lr | seed | status |") and len(md) == 2 + 4
    assert "| 0.003 | 0 | completed | 0.7500 |" in md[2]
    # The runs overlaid: one colour per run where one run had one per series.
    assert_drawn(out / "curves.png")
    assert picture(out / "curves.png").shape[0] > picture(write_curves(tiny_run)).shape[0]  # legend
    assert f"job {sweep / '2'} failed: error: optimizer.lr=-1 must be positive" in capsys.readouterr().out


def test_report_of_a_sweep_keeps_its_job_names_and_overrides(tiny_run, tmp_path):
    sweep = tmp_path / "multirun"
    job_copy(tiny_run, sweep / "0", ["optimizer.lr=0.001", "seed=0"], best=0.5, final=0.5)
    job_copy(tiny_run, sweep / "1", ["optimizer.lr=0.003", "seed=0"], best=0.75, final=0.5)
    jobs = read_sweep(sweep)
    assert [(j.name, j.overrides, j.swept) for j in jobs] == [
        ("1", "optimizer.lr=0.003", {"optimizer.lr": "0.003"}),
        ("0", "optimizer.lr=0.001", {"optimizer.lr": "0.001"}),
    ]
    assert [(j.objective, j.final) for j in jobs] == [(0.75, 0.5), (0.5, 0.5)]
    # The same folder named twice is one run.
    assert len(read_runs([sweep / "0", sweep / "0", sweep])) == 2


def test_a_loss_objective_ranks_lowest_first(tiny_run, tmp_path):
    for name, loss in (("a", 0.9), ("b", 0.4)):
        run = shutil.copytree(tiny_run, tmp_path / name)
        summary = json.loads((run / "summary.json").read_text())
        summary["best"] = {"val/loss": loss, "epoch": 2}
        summary["final"]["val/loss"] = loss + 0.1
        (run / "summary.json").write_text(json.dumps(summary))
    jobs = read_runs([tmp_path / "a", tmp_path / "b"])
    assert [(j.name, j.monitor, j.final) for j in jobs] == [
        (str(tmp_path / "b"), "val/loss", 0.5),
        (str(tmp_path / "a"), "val/loss", 1.0),
    ]


def test_report_errors_are_one_line(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tiny_run), str(tiny_run)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: 2 folders given: add --out DIR for the report files"
    ]
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'} is not a folder; give a run")


# As the README gives it.
COMPARE_COMMAND = (
    "python -m vitexp.report outputs/2026-11-27/15-54-21 outputs/2026-11-27/16-10-02 --out outputs/compare"
)


@pytest.mark.slow
def test_the_documented_comparison_of_two_runs(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_copy(tiny_run, tmp_path / "outputs/2026-11-27/15-54-21", ["optimizer.lr=0.001"], best=0.5, final=0.5)
    job_copy(tiny_run, tmp_path / "outputs/2026-11-27/16-10-02", ["optimizer.lr=0.003"], best=0.7, final=0.6)
    python, flag, module, *args = shlex.split(COMPARE_COMMAND)
    assert (python, flag, module) == ("python", "-m", "vitexp.report")
    assert main(args) == 0
    with (tmp_path / "outputs" / "compare" / "report.csv").open() as f:
        table = [(row["job"], row["optimizer.lr"], row["final val/acc1"]) for row in csv.DictReader(f)]
    assert table == [
        ("outputs/2026-11-27/16-10-02", "0.003", "0.6000"),
        ("outputs/2026-11-27/15-54-21", "0.001", "0.5000"),
    ]
    assert_drawn(tmp_path / "outputs" / "compare" / "curves.png")
