"""Summarise runs: `python -m vitexp.report FOLDER [FOLDER ...] [--out DIR]`.

Each folder is a sweep's (outputs/multirun/DATE/TIME: every job folder in it is a run) or a
single run's (outputs/DATE/TIME). Reads each run's overrides, `summary.json` or `error.txt`,
and `metrics.jsonl`; prints a table sorted by the objective; and writes `report.csv` and
`report.md` (one column per swept key, the monitored metric's best and final values),
`report.png` (the eval accuracy of every run per epoch) and `curves.png` (the runs' training
curves overlaid) into the folder given, or `--out DIR`; for an Optuna search,
`report_study.png`: each trial's intermediate values (pruned ones marked) and the parameter
importances.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig

from vitexp.cli import exit_on_error
from vitexp.curves import read_metrics, save_curves
from vitexp.errors import ConfigError
from vitexp.studies import plot_study

# Which Optuna trial a job reports to: not a setting of the run.
TRIAL_KEYS = ("trial.storage=", "trial.study=", "trial.number=")


@dataclass
class Job:
    name: str  # the job's folder name (Hydra's job number), or the run folder as given
    overrides: str  # the swept overrides, as one string (the terminal table's column)
    status: str  # completed | pruned | failed | running
    objective: float | None = None  # the best value of the monitored metric
    final: float | None = None  # its value at the end of the run
    monitor: str = ""
    best_epoch: int | None = None
    train_seconds: float | None = None
    error: str = ""
    swept: dict[str, str] = field(default_factory=dict)  # swept key -> this job's value
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/acc1)
    folder: Path | None = None  # the run's folder


def _overrides(job_dir: Path) -> list[tuple[str, str, str]]:
    """(key, value, override as written) of each override the job was started with."""
    path = job_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    overrides = [o for o in overrides if not o.startswith(TRIAL_KEYS)]
    return [(o.split("=", 1)[0].lstrip("+~"), o.partition("=")[2], o) for o in overrides]


def _swept_keys(job_dirs: list[Path]) -> list[str]:
    """Keys whose values differ between jobs, in the order they were given: the ones worth
    showing (all of them when no key varies, e.g. for a single run)."""
    values: dict[str, set[str]] = {}
    for job_dir in job_dirs:
        for key, value, _ in _overrides(job_dir):
            values.setdefault(key, set()).add(value)
    varying = [k for k, v in values.items() if len(v) > 1]
    return varying or list(values)


# What marks a folder as one run's: Hydra's record of the job, what training writes, or the
# error a failed job left. (A sweep folder has none of them itself, only job folders.)
RUN_FILES = (".hydra", "metrics.jsonl", "summary.json", "error.txt")


def _job_dirs(path: Path) -> list[Path]:
    """The job folders of a sweep (subfolders holding `.hydra/`, in job order), or the folder
    itself when it is one run's."""
    if not path.is_dir():
        raise ConfigError(
            f"{path} is not a folder; give a run folder (outputs/DATE/TIME) or a sweep folder "
            "(outputs/multirun/DATE/TIME)"
        )
    jobs = sorted(
        (d for d in path.iterdir() if (d / ".hydra").is_dir()),
        key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name),
    )
    if jobs:
        return jobs
    if any((path / name).exists() for name in RUN_FILES):
        return [path]
    raise ConfigError(
        f"{path} is neither a run folder (it has no {', '.join(RUN_FILES)}) nor a sweep folder (no "
        "subfolder has .hydra/); give a run folder or a multirun folder"
    )


def _read_job(name: str, job_dir: Path, keys: list[str]) -> Job:
    overrides = [(k, v, o) for k, v, o in _overrides(job_dir) if k in keys]
    job = Job(
        name=name,
        overrides=" ".join(o for _, _, o in overrides),
        status="running",
        swept={k: v if not o.startswith("~") else "~" + v for k, v, o in overrides},
        folder=job_dir,
    )
    summary, error = job_dir / "summary.json", job_dir / "error.txt"
    if summary.is_file():
        data = json.loads(summary.read_text())
        job.status = "pruned" if data.get("stopped_by") == "pruned" else "completed"
        ((job.monitor, job.objective),) = ((k, v) for k, v in data["best"].items() if k != "epoch")
        job.final = data.get("final", {}).get(job.monitor)
        job.best_epoch = data["best"]["epoch"]
        job.train_seconds = data.get("train_seconds")
    elif error.is_file():
        job.status = "failed"
        job.error = error.read_text().strip()
    job.metrics = read_metrics(job_dir)
    job.curve = [(int(row["epoch"]), float(row["val/acc1"])) for row in job.metrics if "val/acc1" in row]
    return job


def read_runs(paths: Sequence[str | Path]) -> list[Job]:
    """One `Job` per run: each path is a run folder or a sweep folder (each of its jobs a run),
    sorted by the objective (best first: highest accuracy or lowest loss); failed and
    unfinished jobs last. The jobs of a single sweep are named by their folder (Hydra's job
    number); runs from several folders by their path."""
    if not paths:
        raise ConfigError("no folders given: name a run folder or a sweep folder")
    found: dict[Path, str] = {}  # job folder -> its name
    for path in map(Path, paths):
        dirs = _job_dirs(path)
        for job_dir in dirs:
            single_sweep = len(paths) == 1 and job_dir != path
            found.setdefault(job_dir.resolve(), job_dir.name if single_sweep else str(job_dir))
    keys = _swept_keys(list(found))
    jobs = [_read_job(name, job_dir, keys) for job_dir, name in found.items()]
    scored = [(j.objective, j) for j in jobs if j.objective is not None]
    maximize = not any(j.monitor.endswith("loss") for _, j in scored)
    scored.sort(key=lambda pair: -pair[0] if maximize else pair[0])
    return [j for _, j in scored] + [j for j in jobs if j.objective is None]


def read_sweep(sweep_dir: str | Path) -> list[Job]:
    """`read_runs` of one sweep folder (or one run folder)."""
    return read_runs([sweep_dir])


def _cell(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _scores(job: Job) -> list[str]:
    """Best value, best epoch, final value, training seconds: as table cells."""
    epoch = str(job.best_epoch) if job.best_epoch is not None else ""
    return [_cell(job.objective), epoch, _cell(job.final), _cell(job.train_seconds, 1)]


def report_table(jobs: list[Job]) -> list[list[str]]:
    """The rows of report.csv and report.md, header first: one column per swept key, and the
    monitored metric's best value (with its epoch) and final value."""
    monitor = next((j.monitor for j in jobs if j.monitor), "objective")
    keys = list(dict.fromkeys(key for job in jobs for key in job.swept))
    header = [
        "rank",
        "job",
        *keys,
        "status",
        f"best {monitor}",
        "best epoch",
        f"final {monitor}",
        "train seconds",
    ]
    rows = [
        [str(rank), job.name, *(job.swept.get(k, "") for k in keys), job.status, *_scores(job), job.error]
        for rank, job in enumerate(jobs, 1)
    ]
    return [[*header, "error"], *rows]


def write_report(out_dir: str | Path, jobs: list[Job]) -> dict[str, Path]:
    """Write report.csv, report.md, report.png (eval accuracy per epoch) and curves.png (the
    runs' training curves overlaid) into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"report.{name}" for name in ("csv", "md", "png")}
    paths["curves"] = out_dir / "curves.png"
    table = report_table(jobs)
    with paths["csv"].open("w", newline="") as f:
        csv.writer(f).writerows(table)
    lines = [" | ".join(cell.replace("|", "\\|") for cell in row) for row in table]
    lines.insert(1, " | ".join(["---"] * len(table[0])))
    paths["md"].write_text("".join(f"| {line} |\n" for line in lines))
    _plot_accuracy(jobs, paths["png"])
    save_curves({f"{j.name} {j.overrides}".strip(): j.metrics for j in jobs}, paths["curves"])
    study = _study_of(jobs)
    if study is not None and plot_study(*study, out_dir / "report_study.png"):
        paths["study"] = out_dir / "report_study.png"
    return paths


def _study_of(jobs: list[Job]) -> tuple[str, str] | None:
    """The Optuna study the jobs reported to (their trial.storage and trial.study), if any."""
    for job in jobs:
        config = job.folder / ".hydra" / "config.yaml" if job.folder else None
        trial = (
            (yaml.safe_load(config.read_text()) or {}).get("trial") if config and config.is_file() else None
        )
        if trial and trial.get("storage") and trial.get("study"):
            return str(trial["storage"]), str(trial["study"])
    return None


def _plot_accuracy(jobs: list[Job], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    for job in jobs:
        if job.curve:
            epochs, accs = zip(*job.curve, strict=True)
            ax.plot(epochs, accs, marker="o", markersize=3, label=f"#{job.name} {job.overrides}"[:60])
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy (top-1)")
    ax.grid(alpha=0.3)
    if any(job.curve for job in jobs):
        ax.legend(fontsize=7)
    fig.savefig(path)


def format_table(jobs: list[Job]) -> str:
    rows = [["#", "job", "overrides", "status", "best", "epoch", "final", "seconds"]]
    rows += [[str(rank), j.name, j.overrides, j.status, *_scores(j)] for rank, j in enumerate(jobs, 1)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = [f"job {j.name} failed: {j.error}" for j in jobs if j.status == "failed"]
    return "\n".join(lines + failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitexp.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="+", metavar="FOLDER",
        help="run folders (outputs/DATE/TIME) and/or sweep folders (outputs/multirun/DATE/TIME)",
    )  # fmt: skip
    parser.add_argument(
        "--out", metavar="DIR",
        help="where the report files go (default: the folder, when one is given; required for several)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with exit_on_error():
        if args.out is None and len(args.folders) > 1:
            raise ConfigError(f"{len(args.folders)} folders given: add --out DIR for the report files")
        jobs = read_runs(args.folders)
        paths = write_report(args.out or args.folders[0], jobs)
    print(format_table(jobs))
    print(f"wrote {', '.join(map(str, paths.values()))}")
    return 0


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print the sweep's table (as `python -m vitexp.report`
    would, writing the same files), and exit with status 1 if any job failed, so scripts
    notice even though the sweep went on past the failure."""

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        from vitexp.training.distributed import launch_world

        if not launch_world().is_main:
            return  # a sweep under torchrun: rank 0 reports
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            jobs = read_sweep(sweep_dir)
            write_report(sweep_dir, jobs)
        except ConfigError:
            return  # nothing ran (e.g. every job was refused before starting)
        files = f"{sweep_dir}/report.md, report.csv, report.png, curves.png"
        files += ", report_study.png" if (sweep_dir / "report_study.png").is_file() else ""
        print(f"\nsweep {sweep_dir}:\n{format_table(jobs)}\nreport: {files}", flush=True)
        failed = [job.name for job in jobs if job.status == "failed"]
        if failed:
            print(f"error: {len(failed)} of {len(jobs)} jobs failed ({', '.join(failed)})", file=sys.stderr)
            sys.exit(1)
