"""What each ingredient of `experiment=cifar10_subset_cpu` is worth: one row per change.

Every row is a full run of the preset through `python -m vitexp`, with one change, on the
CIFAR-10 subset, under the same wall-clock budget (`trainer.max_time`, the schedule fitted to
it), and judged on a validation split carved from the training images
(`dataset.val_split`, 10% = 508 images), never on the test batch: the test batch is reserved
for the preset's final figure. The table gives the final validation top-1 of each row and its
difference to the preset's row, the epochs the budget allowed and the training throughput.

A row's accuracy is one seed on 508 images: its binomial standard error is about 2 points at
60%, so differences of a point or two are noise. Rows that change the cost of a step (tokens,
precision, batch) are judged at equal time, which is the point of a budget: a slower variant
trains fewer epochs. Every row prints the load average before it starts; the budget assumes
the machine is otherwise idle (run nothing else: 2-thread runs slow down many times when
another job shares the cores).

    python benchmarks/ablation.py                 # all rows, 180 s each (70 minutes here)
    python benchmarks/ablation.py --rows preset ema --budget 600

Finished rows are kept in --out (one run dir each) and not run again, so an interrupted
ablation continues where it stopped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import record_load, recorded_load, run_module

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = Path(os.environ.get("VITEXP_TEST_DATA", REPO.parent / "shared" / "data"))

# The preset's transformer (4 layers, width 128, 2 heads, MLP 128, attention dropout and drop
# path 0.1) behind a plain ViT patch embedding instead of CCT's convolutional tokenizer.
VIT = [
    "model=vit_ti4", "model.hidden_size=128", "model.mlp_dim=128", "model.num_heads=2",
    "model.num_layers=4", "model.attention_dropout_rate=0.1", "model.drop_path_rate=0.1",
]  # fmt: skip

SPT, LSA = "model.shifted_patches=true", "model.locality_attention=true"
RANDAUGMENT = "dataset.augment.randaugment={num_ops:2,magnitude:9}"

# name: (what changes, overrides). The first row is the preset itself.
ROWS: dict[str, tuple[str, list[str]]] = {
    "preset": ("CCT-4/3x2 as in the preset (64 tokens, sequence pooling)", []),
    # Tokens and tokenizer.
    "cct_1conv": ("one tokenizer conv block: 256 tokens", ["model.conv_layers=1"]),
    "vit_p4": ("ViT patch 4 (64 tokens), class token, same transformer", VIT),
    "vit_p2": ("ViT patch 2 (256 tokens), class token", [*VIT, "model.patch_size=2"]),
    "vit_p8": ("ViT patch 8 (16 tokens), class token", [*VIT, "model.patch_size=8"]),
    "vit_p4_seqpool": ("ViT patch 4, sequence pooling, no class token", [*VIT, "model.classifier=seqpool"]),
    "vit_p4_spt": ("ViT patch 4 + shifted patch tokenization (SPT)", [*VIT, SPT]),
    "vit_p4_lsa": ("ViT patch 4 + locality self-attention (LSA)", [*VIT, LSA]),
    "vit_p4_spt_lsa": ("ViT patch 4 + SPT + LSA", [*VIT, SPT, LSA]),
    "lsa": ("preset + LSA", [LSA]),
    # Regularisation and augmentation.
    "no_drop_path": ("drop path 0.1 → 0", ["model.drop_path_rate=0.0"]),
    "layer_scale": ("+ layer scale 1e-4", ["model.layer_scale_init=1e-4"]),
    "no_label_smoothing": ("label smoothing 0.1 → 0", ["trainer.label_smoothing=0.0"]),
    "randaugment": ("+ RandAugment (2 ops, magnitude 9)", [RANDAUGMENT]),
    "trivialaugment": ("+ TrivialAugment", ["dataset.augment.trivialaugment=true"]),
    "mixup_cutmix": ("+ mixup 0.8 / cutmix 1.0", ["trainer.mixup_alpha=0.8", "trainer.cutmix_alpha=1.0"]),
    "ema": ("+ EMA of the weights, decay 0.999", ["trainer.ema_decay=0.999"]),
    # Optimisation and numerics.
    "lr_5e-4": ("lr 1e-3 → 5e-4", ["optimizer.lr=5e-4"]),
    "lr_2e-3": ("lr 1e-3 → 2e-3", ["optimizer.lr=2e-3"]),
    "batch_128": ("batch 64 → 128 (same lr)", ["trainer.batch_size=128"]),
    "warmup_0": ("warmup 3 epochs → 0", ["scheduler.warmup_epochs=0"]),
    "warmup_10": ("warmup 3 epochs → 10", ["scheduler.warmup_epochs=10"]),
    "fp32": ("bf16 autocast → fp32", ["trainer.precision=fp32"]),
}


def run_row(name: str, root: Path, budget: float, seed: int, out: Path) -> dict:
    """Train one row (unless its run dir already holds a finished run) and read its summary."""
    run_dir = out / name
    summary_path = run_dir / "summary.json"
    load = os.getloadavg()[0]
    if not summary_path.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        args = [
            "experiment=cifar10_subset_cpu", f"dataset.root={root}", "dataset.val_split=0.1",
            f"trainer.max_time={budget}", f"seed={seed}", "trainer.progress=false",
            "trainer.sample_figures=false", *ROWS[name][1], f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        started = time.strftime("%H:%M:%S")
        print(f"[{started}] {name} (load {load:.2f}): python -m vitexp {' '.join(args)}", flush=True)
        run_module(["vitexp", *args], f"row {name}")
        record_load(run_dir, load)
    summary = json.loads(summary_path.read_text())
    return {
        "row": name,
        "change": ROWS[name][0],
        "val_acc1": summary["final"]["val/acc1"],
        "best_val_acc1": summary["best"]["val/acc1"],
        "epochs": summary["epochs"],
        "images_per_sec": summary["images_per_sec"],
        "params": summary["params"],
        "load_at_start": recorded_load(run_dir),
    }


def table(results: list[dict]) -> str:
    base = next((r["val_acc1"] for r in results if r["row"] == "preset"), None)
    lines = [
        "| row | change | val acc@1 | Δ vs preset | epochs | img/s | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        delta = "" if base is None or r["row"] == "preset" else f"{100 * (r['val_acc1'] - base):+.1f}"
        lines.append(
            f"| `{r['row']}` | {r['change']} | {100 * r['val_acc1']:.1f}% | {delta} | {r['epochs']} | "
            f"{r['images_per_sec']:.0f} | {r['params'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--budget", type=float, default=180.0, help="trainer.max_time of each row (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder holding cifar-10-batches-py")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "ablation", help="where the rows run")
    parser.add_argument("--fresh", action="store_true", help="run every row again")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if not (args.root / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"no cifar-10-batches-py in {args.root}: pass --root (the folder that holds it)")
    out = args.out / f"budget{args.budget:g}_seed{args.seed}"
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    names = args.rows or list(ROWS)
    results = [run_row(name, args.root.resolve(), args.budget, args.seed, out) for name in names]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
