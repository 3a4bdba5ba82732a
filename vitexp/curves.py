"""Training curves of one run or several overlaid, from their `metrics.jsonl`: the `curves.png`
every run writes at its end, and the figure `python -m vitexp.report` draws for the runs it
reads. Matplotlib only, no torch, so the report command starts fast; figures are drawn on a
`Figure` of their own (the Agg renderer, no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vitexp.errors import DataError

log = logging.getLogger(__name__)

DPI = 100
# The panels of curves.png: (title, [(metrics.jsonl key, line style)]). The loop logs train/*
# every trainer.log_every_steps and val/* (the eval split, whichever it is) once per epoch.
CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("train/loss", "-"), ("val/loss", "--o"))),
    ("accuracy (top-1)", (("val/acc1", "--o"),)),
    ("learning rate", (("train/lr", "-"),)),
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl` (none when it has no such file). A run that is still
    writing (or was killed mid-line) can end in a partial line: that last line is left out; any
    other line that is not JSON is a DataError naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise DataError(f"{path} line {number} is not a JSON record ({e}); remove or fix it") from e
    return rows


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(row["step"]), float(row[key])) for row in rows if key in row and "step" in row]
    return [s for s, _ in points], [v for _, v in points]


def save_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Training curves against the optimizer step: train and eval loss, eval accuracy, learning
    rate, one panel each. `runs` maps a label to a run's metrics rows (`read_metrics`). A single
    run gets a colour per series; several runs are overlaid, one colour per run (solid lines
    for train, dashed with dots for eval) with one legend entry per run below the panels."""
    path = Path(path)
    many = len(runs) > 1
    height = 4.2 + (0.2 * min(len(runs), 30) / 3 if many else 0)  # room for the legend of runs
    fig = Figure(figsize=(13, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(CURVE_PANELS), squeeze=False)[0]
    for ax, (panel, series) in zip(axes, CURVE_PANELS, strict=True):
        for n, rows in enumerate(runs.values()):
            for i, (key, style) in enumerate(series):
                steps, values = _series(rows, key)
                if steps:
                    colour = f"C{n % 10}" if many else f"C{i}"
                    ax.plot(steps, values, style, color=colour, markersize=3, linewidth=1.2, label=key)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not many and ax.has_data():
            ax.legend(fontsize=8)
    axes[-1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if many:
        handles = [Line2D([], [], color=f"C{n % 10}", label=label) for n, label in enumerate(runs)]
        fig.legend(
            handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=7,
            title="runs (solid: train, dashed: eval)", title_fontsize=7,
        )  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def write_curves(run_dir: str | Path) -> Path | None:
    """`curves.png` in a run dir, from its `metrics.jsonl`: what every run draws at its end.
    Returns its path, or None when the run logged nothing. A picture never costs the run: a
    failure to draw is logged as a warning (with its traceback) and returns None."""
    run_dir = Path(run_dir)
    try:
        rows = read_metrics(run_dir)
        if not rows:
            return None
        return save_curves({run_dir.name: rows}, run_dir / "curves.png", title=str(run_dir))
    except Exception as e:  # the run's results are written; a figure is not worth an error
        log.warning("could not draw %s (%s: %s)", run_dir / "curves.png", type(e).__name__, e, exc_info=True)
        return None
