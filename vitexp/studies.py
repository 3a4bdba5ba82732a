"""Optuna studies as vitexp keeps them (imports Optuna only when called): a storage from its
text form, and the figures of a search (intermediate values per trial, parameter importances)
for the sweep report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vitexp.errors import first_line

log = logging.getLogger(__name__)

# The study's user attribute holding its pruner's config (`_target_` and arguments), which the
# sweeper writes and each job reads to build the same pruner.
PRUNER_ATTR = "vitexp:pruner"

# Parameter importances are drawn from this many finished trials on (fewer say little).
MIN_TRIALS_FOR_IMPORTANCE = 4


def open_storage(spec: str) -> Any:
    """An Optuna storage from its text form: a database URL (`sqlite:///…`, `postgresql://…`),
    else the path of a journal file (Optuna's JournalFileBackend: safe for parallel writers,
    with a lock that works on shared filesystems)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in spec:
        return optuna.storages.get_storage(spec)
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(spec))


def plot_study(storage: str, study_name: str, path: Path) -> Path | None:
    """`path`: each trial's intermediate values against the step (the epoch; pruned trials
    dashed, ending in ×), and beside it the parameter importances once enough trials finished.
    None (and one warning) when the study cannot be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        importances = (
            optuna.importance.get_param_importances(study)
            if sum(t.state == TrialState.COMPLETE for t in trials) >= MIN_TRIALS_FOR_IMPORTANCE
            else {}
        )
    except Exception as e:  # a study moved or deleted since the sweep: the table still stands
        log.warning(
            "could not read study %s in %s (%s): no %s", study_name, storage, first_line(e), path.name
        )
        return None
    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 7, 4.5), dpi=120)
    ax = axes[0] if importances else axes
    for t in finished or trials:
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        pruned = t.state == TrialState.PRUNED
        (line,) = ax.plot(
            steps, values, "--" if pruned else "-", marker="o", markersize=3, label=f"#{t.number}"
        )
        if pruned and steps:
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.set(xlabel="step (epoch)", ylabel="intermediate value", title=f"{study_name}: dashed, × = pruned")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    if importances:
        names = list(importances)[::-1]
        axes[1].barh(names, [importances[n] for n in names])
        axes[1].set(xlabel="importance (fANOVA)", title=f"parameter importances ({len(finished)} trials)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
