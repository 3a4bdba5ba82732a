"""Final test accuracy against the wall-clock budget on the CIFAR-10 subset: vitexp's preset
(`experiment=cifar10_subset_cpu`) and a common timm ViT recipe, trained for the same budgets.

Every point is a full run of `python -m vitexp` from scratch with `trainer.max_time` set to the
budget (the schedule is fitted to end on time), scored on the subset's 500-image `test_batch`
after its last epoch; the preset's points are scored once more with test-time flip averaging
(`python -m vitexp.evaluate ... hflip=true`, outside the budget), reported beside them. The two
recipes:

- `vitexp`: the preset as it is (CCT-4/3x2, AdamW, warmup + cosine, crop + flip, label
  smoothing, bf16 autocast).
- `timm_vit`: timm's `VisionTransformer` as a ViT-Ti/4 (12 layers, width 192, 64 patches and a
  class token; `benchmarks/conf/model/timm_vit_ti4.yaml`) with the usual from-scratch recipe:
  AdamW lr 1e-3, weight decay 0.05, batch 128, 3 warmup epochs + cosine, label smoothing 0.1,
  drop path 0.1, crop + flip, and the same bf16 autocast, so that the comparison is of recipes
  on the same loop and the same numerics.

The runs go one after another, never two at once: on 2 cores a second training slows the
first several times. Each run waits (up to 5 minutes) for the 1-minute load average to fall
below 1 and records it; the figures assume a machine otherwise idle. Finished runs are kept in
--out (one run dir each) and not run again, so an interrupted curve continues where it
stopped; --fresh starts over.

    python benchmarks/budget_curve.py    # 2.5, 5, 10, 20 min; 3 seeds of the preset at 10 (~1 h 40 min)
    python benchmarks/budget_curve.py --budgets 150 300 --recipes vitexp

Writes the table (Markdown, stdout), the points as JSON (--json) and the figure (--png:
accuracy against minutes, one line per recipe through the median of its seeds, each seed a dot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch import nn

from benchmarks.common import record_load, recorded_load, run_module

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = Path(os.environ.get("VITEXP_TEST_DATA", REPO.parent / "shared" / "data"))
SEARCHPATH = f"hydra.searchpath=[file://{REPO / 'benchmarks' / 'conf'}]"

# name: (what it is, overrides of `python -m vitexp`).
RECIPES: dict[str, tuple[str, list[str]]] = {
    "vitexp": ("vitexp preset: CCT-4/3x2 (experiment=cifar10_subset_cpu)", ["experiment=cifar10_subset_cpu"]),
    "timm_vit": (
        "timm VisionTransformer ViT-Ti/4, AdamW + cosine",
        [
            "dataset=cifar10",
            SEARCHPATH,
            "model=timm_vit_ti4",
            "optimizer=adamw",
            "optimizer.lr=1e-3",
            "optimizer.weight_decay=0.05",
            "scheduler=warmup_cosine",
            "scheduler.warmup_epochs=3",
            "trainer.max_epochs=1000",
            "trainer.batch_size=128",
            "trainer.eval_batch_size=500",
            "trainer.label_smoothing=0.1",
            "trainer.precision=bf16",
            "trainer.log_every_steps=20",
        ],
    ),
}
HFLIP_RECIPES = ("vitexp",)
BUDGETS = (150.0, 300.0, 600.0, 1200.0)
MAIN_BUDGET = 600.0


def timm_vit(
    *,
    img_size: int,
    patch_size: int,
    in_channels: int,
    num_classes: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    drop_path_rate: float,
) -> nn.Module:
    """timm's VisionTransformer, given the `img_size` (height, width) attribute vitexp's loop
    reads to size the augmentation."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
    )  # fmt: skip
    model.img_size = (img_size, img_size)
    return model


@dataclass(frozen=True)
class Point:
    recipe: str
    budget: float  # seconds (trainer.max_time)
    seed: int
    test_acc1: float  # after the last epoch
    test_acc1_hflip: float | None  # the same weights with test-time flip averaging (vitexp models only)
    epochs: int
    train_seconds: float
    images_per_sec: float
    load_at_start: float | None


def plan(
    recipes: list[str],
    budgets: list[float],
    main_seeds: list[int],
    reference_seeds: tuple[int, ...] | list[int] = (0,),
) -> list[tuple[str, float, int]]:
    """The runs, in the order they run: per recipe, per budget, its seeds. At the 10-minute
    budget the preset runs `main_seeds` and the timm reference `reference_seeds`; every other
    point is seed 0."""

    def seeds(recipe: str, budget: float) -> list[int]:
        if budget != MAIN_BUDGET:
            return [0]
        return main_seeds if recipe == "vitexp" else list(reference_seeds)

    return [
        (recipe, budget, seed) for recipe in recipes for budget in budgets for seed in seeds(recipe, budget)
    ]


def wait_until_quiet(limit: float = 1.0, patience: float = 300.0) -> float:
    """Wait (at most `patience` seconds) for the 1-minute load average to fall below `limit`:
    right after a training run it still carries that run's two busy cores for about a minute.
    Returns the load the next run starts at."""
    deadline = time.monotonic() + patience
    while (load := os.getloadavg()[0]) >= limit and time.monotonic() < deadline:
        time.sleep(5)
    return load


def run_point(
    recipe: str, budget: float, seed: int, root: Path, out: Path, extra: list[str], patience: float = 300.0
) -> Point:
    """Train one point (unless its run dir already holds a finished run) and read its summary.
    `patience`: at most this many seconds of waiting for a quiet machine first."""
    run_dir = out / f"{recipe}_{budget:g}s_seed{seed}"
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        load = wait_until_quiet(patience=patience)
        args = [
            *RECIPES[recipe][1], f"dataset.root={root}", f"trainer.max_time={budget:g}", f"seed={seed}",
            "trainer.progress=false", "trainer.sample_figures=false", "logger=none", *extra,
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        note = "" if load < 1 else " -- the machine is busy: this point will be slower than it should"
        print(
            f"[{time.strftime('%H:%M:%S')}] {recipe} {budget:g}s seed {seed} (load {load:.2f}){note}",
            flush=True,
        )
        run_module(["vitexp", *args], f"{recipe} {budget:g}s seed {seed}")
        record_load(run_dir, load)
    hflip_path = run_dir / "last_eval_test_hflip.json"
    # Outside the budget: an evaluation option, not part of the run. vitexp.evaluate rebuilds
    # only vitexp's own model classes from a checkpoint (the safety allow-list), not timm's.
    if recipe in HFLIP_RECIPES and not hflip_path.is_file():
        evaluate = [
            "vitexp.evaluate", f"checkpoint={run_dir / 'last.pt'}", "hflip=true", "precision=bf16",
            "device=cpu", f"output={hflip_path}",
        ]  # fmt: skip
        run_module(evaluate, f"evaluating {run_dir / 'last.pt'} with hflip")
    summary = json.loads(summary_path.read_text())
    return Point(
        recipe=recipe,
        budget=budget,
        seed=seed,
        test_acc1=float(summary["final"]["val/acc1"]),
        test_acc1_hflip=float(json.loads(hflip_path.read_text())["acc1"]) if hflip_path.is_file() else None,
        epochs=int(summary["epochs"]),
        train_seconds=float(summary["train_seconds"]),
        images_per_sec=float(summary["images_per_sec"]),
        load_at_start=recorded_load(run_dir),
    )


def medians(points: list[Point]) -> dict[str, list[tuple[float, float]]]:
    """Per recipe, (budget, median test acc@1 over its seeds), by budget."""
    by: dict[tuple[str, float], list[float]] = {}
    for p in points:
        by.setdefault((p.recipe, p.budget), []).append(p.test_acc1)
    curves: dict[str, list[tuple[float, float]]] = {}
    for (recipe, budget), accs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        curves.setdefault(recipe, []).append((budget, statistics.median(accs)))
    return curves


def table(points: list[Point]) -> str:
    lines = [
        "| recipe | budget | seeds | test acc@1 (median) | per seed | with hflip (median) | epochs | img/s "
        "| load at start |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[Point]] = {}
    for p in points:
        groups.setdefault((p.recipe, p.budget), []).append(p)
    for (recipe, budget), group in groups.items():
        accs = [p.test_acc1 for p in group]
        lines.append(
            f"| `{recipe}` | {budget / 60:g} min | {len(group)} | {100 * statistics.median(accs):.1f}% | "
            f"{' / '.join(f'{100 * a:.1f}' for a in accs)} | "
            f"{_median_pct([p.test_acc1_hflip for p in group])} | "
            f"{'/'.join(str(p.epochs) for p in group)} | "
            f"{statistics.median(p.images_per_sec for p in group):.0f} | "
            f"{max((p.load_at_start or 0.0) for p in group):.2f} |"
        )
    return "\n".join(lines)


def _median_pct(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{100 * statistics.median(known):.1f}%" if known else "—"


def draw(points: list[Point], path: Path) -> None:
    """Accuracy against minutes: a line per recipe through its medians, every seed a dot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for recipe, curve in medians(points).items():
        label = RECIPES[recipe][0] if recipe in RECIPES else recipe
        (line,) = ax.plot([b / 60 for b, _ in curve], [100 * a for _, a in curve], marker="o", label=label)
        seeds = [p for p in points if p.recipe == recipe]
        ax.scatter([p.budget / 60 for p in seeds], [100 * p.test_acc1 for p in seeds], s=12,
                   color=line.get_color(), alpha=0.5)  # fmt: skip
    ax.set_xscale("log", base=2)
    budgets = sorted({p.budget for p in points})
    ax.set_xticks([b / 60 for b in budgets], [f"{b / 60:g}" for b in budgets])
    ax.set_xlabel("training budget (minutes, trainer.max_time, 2 CPU cores)")
    ax.set_ylabel("final test acc@1 (%), CIFAR-10 subset")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS), help="seconds")
    parser.add_argument(
        "--main-seeds", nargs="*", type=int, default=[0, 1, 2], help="the preset's seeds at 600 s"
    )
    parser.add_argument("--reference-seeds", nargs="*", type=int, default=[0], help="timm's seeds at 600 s")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder holding cifar-10-batches-py")
    parser.add_argument(
        "--out", type=Path, default=REPO / "outputs" / "budget_curve", help="where the runs go"
    )
    parser.add_argument("--fresh", action="store_true", help="run every point again")
    parser.add_argument("--json", type=Path, help="also write the points as JSON")
    parser.add_argument("--png", type=Path, help="draw the curve to this PNG")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run (key=value)")
    args = parser.parse_args()
    if not (args.root / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"no cifar-10-batches-py in {args.root}: pass --root (the folder that holds it)")
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    points = [
        run_point(recipe, budget, seed, args.root.resolve(), args.out, args.overrides)
        for recipe, budget, seed in plan(args.recipes, args.budgets, args.main_seeds, args.reference_seeds)
    ]
    print(table(points))
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in points], indent=2) + "\n")
    if args.png:
        draw(points, args.png)


if __name__ == "__main__":
    main()
