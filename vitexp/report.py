"""Summarise a sweep: `python -m vitexp.report outputs/multirun/DATE/TIME`.

Reads every job folder of the sweep (its overrides, `summary.json` or `error.txt`, and
`metrics.jsonl`), prints a table sorted by the objective, and writes it next to the jobs as
`report.csv` and `report.md`, with `report.png`: the eval accuracy curve of every job; for an
Optuna search, `report_study.png`: each trial's intermediate values (pruned ones marked) and
the parameter importances.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vitexp.cli import exit_on_error
from vitexp.errors import ConfigError
from vitexp.studies import plot_study

TRIAL_KEYS = ("trial.storage=", "trial.study=", "trial.number=")


@dataclass
class Job:
    name: str  # the job's folder name (Hydra's job number)
    overrides: str
    status: str  # completed | pruned | failed | running
    objective: float | None = None
    monitor: str = ""
    best_epoch: int | None = None
    train_seconds: float | None = None
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/acc1)


def _job_overrides(job_dir: Path, sweep_keys: set[str] | None = None) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    overrides = [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith(TRIAL_KEYS)]
    if sweep_keys:
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in sweep_keys]
    return " ".join(overrides)


def _swept_keys(job_dirs: list[Path]) -> set[str]:
    """Keys whose values differ between jobs: the ones worth showing."""
    values: dict[str, set[str]] = {}
    for job_dir in job_dirs:
        path = job_dir / ".hydra" / "overrides.yaml"
        for override in yaml.safe_load(path.read_text()) or [] if path.is_file() else []:
            if override.startswith(TRIAL_KEYS):  # which trial a job reports to: not a setting
                continue
            key, _, value = override.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1}
    return varying or set(values)


def read_sweep(sweep_dir: str | Path) -> list[Job]:
    """One `Job` per job folder (a subfolder holding `.hydra/`), sorted by the objective
    (best first: highest accuracy or lowest loss); failed and unfinished jobs last."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(
            f"{sweep_dir} is not a folder; give a sweep folder such as outputs/multirun/DATE/TIME"
        )
    job_dirs = sorted(
        (d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()),
        key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name),
    )
    if not job_dirs:
        raise ConfigError(
            f"{sweep_dir} holds no job folders (subfolders with .hydra/); is it a multirun folder?"
        )
    keys = _swept_keys(job_dirs)
    jobs = []
    for job_dir in job_dirs:
        job = Job(name=job_dir.name, overrides=_job_overrides(job_dir, keys), status="running")
        summary, error = job_dir / "summary.json", job_dir / "error.txt"
        if summary.is_file():
            data = json.loads(summary.read_text())
            job.status = "pruned" if data.get("stopped_by") == "pruned" else "completed"
            ((job.monitor, job.objective),) = ((k, v) for k, v in data["best"].items() if k != "epoch")
            job.best_epoch = data["best"]["epoch"]
            job.train_seconds = data.get("train_seconds")
        elif error.is_file():
            job.status = "failed"
            job.error = error.read_text().strip()
        metrics = job_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                row = json.loads(line)
                if "val/acc1" in row:
                    job.curve.append((int(row["epoch"]), float(row["val/acc1"])))
        jobs.append(job)
    scored = [(j.objective, j) for j in jobs if j.objective is not None]
    maximize = not any(j.monitor.endswith("loss") for _, j in scored)
    scored.sort(key=lambda pair: -pair[0] if maximize else pair[0])
    return [j for _, j in scored] + [j for j in jobs if j.objective is None]


def _rows(jobs: list[Job]) -> list[list[str]]:
    rows = []
    for rank, job in enumerate(jobs, 1):
        objective = f"{job.objective:.4f}" if job.objective is not None else ""
        seconds = f"{job.train_seconds:.1f}" if job.train_seconds is not None else ""
        epoch = str(job.best_epoch) if job.best_epoch is not None else ""
        detail = job.error if job.status == "failed" else ""
        rows.append([str(rank), job.name, job.overrides, job.status, objective, epoch, seconds, detail])
    return rows


def write_report(sweep_dir: str | Path, jobs: list[Job]) -> dict[str, Path]:
    """Write report.csv, report.md and report.png into the sweep folder; return their paths."""
    sweep_dir = Path(sweep_dir)
    monitor = next((j.monitor for j in jobs if j.monitor), "objective")
    header = ["rank", "job", "overrides", "status", f"best {monitor}", "best epoch", "train seconds", "error"]
    rows = _rows(jobs)
    paths = {"csv": sweep_dir / "report.csv", "md": sweep_dir / "report.md", "png": sweep_dir / "report.png"}
    with paths["csv"].open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot_curves(jobs, paths["png"])
    study = _study_of(sweep_dir, jobs)
    if study is not None and plot_study(*study, sweep_dir / "report_study.png"):
        paths["study"] = sweep_dir / "report_study.png"
    return paths


def _study_of(sweep_dir: Path, jobs: list[Job]) -> tuple[str, str] | None:
    """The Optuna study the jobs reported to (their trial.storage and trial.study), if any."""
    for job in jobs:
        config = sweep_dir / job.name / ".hydra" / "config.yaml"
        trial = (yaml.safe_load(config.read_text()) or {}).get("trial") if config.is_file() else None
        if trial and trial.get("storage") and trial.get("study"):
            return str(trial["storage"]), str(trial["study"])
    return None


def _plot_curves(jobs: list[Job], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for job in jobs:
        if job.curve:
            epochs, accs = zip(*job.curve, strict=True)
            ax.plot(epochs, accs, marker="o", markersize=3, label=f"#{job.name} {job.overrides}"[:60])
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy (top-1)")
    ax.grid(alpha=0.3)
    if any(job.curve for job in jobs):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(jobs: list[Job]) -> str:
    rows = [["#", "job", "overrides", "status", "best", "epoch", "seconds"]] + [r[:7] for r in _rows(jobs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = [f"job {j.name} failed: {j.error}" for j in jobs if j.status == "failed"]
    return "\n".join(lines + failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitexp.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/multirun/2026-11-27/16-00-00")
    args = parser.parse_args(argv)
    with exit_on_error():
        jobs = read_sweep(args.sweep_dir)
        paths = write_report(args.sweep_dir, jobs)
    print(format_table(jobs))
    print(f"wrote {', '.join(map(str, paths.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


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
        print(
            f"\nsweep {sweep_dir}:\n{format_table(jobs)}\nreport: {sweep_dir}/report.md, report.png"
            + (", report_study.png" if (sweep_dir / "report_study.png").is_file() else ""),
            flush=True,
        )
        failed = [job.name for job in jobs if job.status == "failed"]
        if failed:
            print(f"error: {len(failed)} of {len(jobs)} jobs failed ({', '.join(failed)})", file=sys.stderr)
            sys.exit(1)
