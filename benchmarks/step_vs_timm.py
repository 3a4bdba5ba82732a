"""Training-step throughput of vitexp's VisionTransformer against timm's, with identical
shapes, optimizer (AdamW) and precision, measured side by side in one process.

    python benchmarks/step_vs_timm.py                      # CIFAR shape and ViT-S/16, CPU
    python benchmarks/step_vs_timm.py --shape cifar --compile --channels-last
    python benchmarks/step_vs_timm.py --device cuda        # adds fp16 (GradScaler)
    python benchmarks/step_vs_timm.py --quick              # smoke run

First the AdamW variants (for-loop, foreach, fused) are timed on their own, optimizer.step()
over the model's parameters with gradients present; the fastest one is then used by every
candidate of the step comparison. A step is vitexp's `train_step` (forward, cross-entropy,
backward, optimizer step and zero_grad) on a fixed random batch (no data loading: that is
benchmarks/data_path.py).
Weights are randomly initialised: throughput does not depend on their values.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.common import (
    SHAPES,
    Shape,
    autocast,
    finish,
    interleaved,
    machine,
    median,
    parser,
    setup,
    shape_dict,
    spread,
    table,
    timm_model,
    vitexp_model,
)

OPTIMIZER_VARIANTS: dict[str, dict[str, bool]] = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
TARGETS = {"vitexp_fp32_vs_timm_fp32": 1.0, "vitexp_bf16_vs_timm_fp32": 1.25}


def adamw(params: Any, variant: str) -> torch.optim.AdamW:
    """AdamW as vitexp's default config (lr 1e-3, weight decay 0.05), in one implementation."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **OPTIMIZER_VARIANTS[variant])


def supported_optimizers(device: torch.device) -> list[str]:
    """The AdamW variants this torch build can run on `device` (fused needs a recent torch
    on the CPU)."""
    ok = []
    for name in OPTIMIZER_VARIANTS:
        p = nn.Parameter(torch.zeros(4, device=device))
        p.grad = torch.ones_like(p)
        try:
            adamw([p], name).step()
        except (RuntimeError, ValueError):
            continue
        ok.append(name)
    return ok


def time_optimizers(
    shape: Shape, device: torch.device, *, variants: list[str], repeats: int
) -> dict[str, list[float]]:
    """Seconds per optimizer.step() of each AdamW variant over the same parameters."""
    torch.manual_seed(0)
    model = vitexp_model(shape).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {name: adamw(model.parameters(), name) for name in variants}
    return interleaved(
        {name: opt.step for name, opt in optimizers.items()},
        repeats=repeats,
        calls=5,
        warmup=2,
        device=device,
    )


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str
) -> Any:
    """One training step as a closure: vitexp's own `train_step` (autocast forward and loss,
    scaled backward, optimizer step, zero_grad; no clipping) on a fixed batch, whichever model
    it is given, so both sides of the comparison run exactly the step vitexp trains with."""
    from vitexp.runtime import unwrap
    from vitexp.training.loop import train_step as library_step
    from vitexp.training.setup import Step

    step = Step(
        forward=model,
        model=unwrap(model),
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        autocast=autocast(x.device, precision),
        scaler=torch.amp.GradScaler(x.device.type, enabled=precision == "fp16"),
    )
    batches = itertools.repeat((x, y))
    return lambda: library_step(step, batches)


def run(
    *,
    shape: str | Shape = "cifar",
    device: str | torch.device = "cpu",
    precisions: list[str] | None = None,
    optimizer: str = "auto",
    batch_size: int | None = None,
    repeats: int = 5,
    steps: int = 2,
    optimizer_repeats: int = 7,
    compile: bool = False,
    channels_last: bool = False,
    same_weights: bool = False,
) -> dict[str, Any]:
    """Time vitexp against timm for each precision; return the timings and ratios.

    `optimizer="auto"` picks the fastest AdamW variant measured here. `compile` and
    `channels_last` add vitexp-only candidates (torch.compile'd model; channels-last input and
    patch-embedding weight), compared with the eager vitexp model of the same precision.
    `same_weights` loads timm's initial weights into every vitexp model (through
    `vitexp.models.weights.vit.convert_timm`), so both compute on identical numbers and only the
    code differs; by default each model keeps its own initialisation.
    """
    dev = torch.device(device)
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if batch_size is not None:
        spec = Shape(**{**shape_dict(spec), "batch_size": batch_size})
    if precisions is None:
        precisions = ["fp32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16"]
    if "fp16" in precisions and dev.type != "cuda":
        raise ValueError("fp16 (with a GradScaler) needs a CUDA device; use bf16 on the CPU")
    results: dict[str, Any] = {"machine": machine(dev), "shape": shape_dict(spec)}

    variants = supported_optimizers(dev)
    opt_times = time_optimizers(spec, dev, variants=variants, repeats=optimizer_repeats)
    results["optimizer_step_ms"] = {name: median(t) * 1e3 for name, t in opt_times.items()}
    chosen = min(opt_times, key=lambda n: median(opt_times[n])) if optimizer == "auto" else optimizer
    results["optimizer"] = chosen

    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=g).to(dev)
    y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g).to(dev)
    candidates: dict[str, Any] = {}
    meta: dict[str, dict[str, str]] = {}
    compile_seconds: dict[str, float] = {}
    reference: dict[str, torch.Tensor] | None = None
    if same_weights:
        from vitexp.models.weights.vit import convert_timm

        torch.manual_seed(0)
        reference = convert_timm(timm_model(spec).state_dict())

    def vitexp_built(spec: Shape) -> nn.Module:
        model = vitexp_model(spec)
        if reference is not None:
            model.load_state_dict(reference)
        return model

    for precision in precisions:
        builders = {"vitexp": vitexp_built, "timm": timm_model}
        for name, build in builders.items():
            torch.manual_seed(0)
            model = build(spec).to(dev)
            candidates[f"{name} {precision}"] = train_step(
                model, adamw(model.parameters(), chosen), x, y, precision
            )
            meta[f"{name} {precision}"] = {"model": name, "precision": precision, "variant": "eager"}
        if compile:
            model = vitexp_built(spec).to(dev)
            step = train_step(torch.compile(model), adamw(model.parameters(), chosen), x, y, precision)
            start = time.perf_counter()
            step()  # compiles forward and backward; kept out of the timed steps
            compile_seconds[precision] = time.perf_counter() - start
            candidates[f"vitexp {precision} compiled"] = step
            meta[f"vitexp {precision} compiled"] = {
                "model": "vitexp",
                "precision": precision,
                "variant": "compiled",
            }
        if channels_last:
            model = vitexp_built(spec).to(dev, memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            name = f"vitexp {precision} channels_last"
            candidates[name] = train_step(model, adamw(model.parameters(), chosen), x_cl, y, precision)
            meta[name] = {"model": "vitexp", "precision": precision, "variant": "channels_last"}

    times = interleaved(candidates, repeats=repeats, calls=steps, warmup=2, device=dev)
    step_s = {name: median(t) for name, t in times.items()}
    results["candidates"] = {
        name: {
            **meta[name],
            "ms_per_step": step_s[name] * 1e3,
            "images_per_s": spec.batch_size / step_s[name],
            "spread": spread(times[name]),
            "vs_timm_fp32": step_s.get("timm fp32", float("nan")) / step_s[name],
        }
        for name in candidates
    }
    ratios: dict[str, float] = {}
    for precision in precisions:
        ratios[f"vitexp_{precision}_vs_timm_{precision}"] = (
            step_s[f"timm {precision}"] / step_s[f"vitexp {precision}"]
        )
        if "fp32" in precisions and precision != "fp32":
            ratios[f"vitexp_{precision}_vs_timm_fp32"] = step_s["timm fp32"] / step_s[f"vitexp {precision}"]
        for variant in ("compiled", "channels_last"):
            if f"vitexp {precision} {variant}" in step_s:
                ratios[f"vitexp_{precision}_{variant}_vs_eager"] = (
                    step_s[f"vitexp {precision}"] / step_s[f"vitexp {precision} {variant}"]
                )
    results["ratios"] = ratios
    results["targets"] = {k: v for k, v in TARGETS.items() if k in ratios}
    results["compile_seconds"] = compile_seconds
    results["same_weights"] = same_weights
    results["repeats"], results["steps_per_repeat"] = repeats, steps
    return results


def report(results: dict[str, Any]) -> str:
    s = results["shape"]
    lines = [
        f"## {s['img_size']} px, patch {s['patch_size']}, dim {s['dim']}, depth {s['depth']}, "
        f"heads {s['heads']}, batch {s['batch_size']}",
        "",
        "AdamW optimizer.step() alone: "
        + ", ".join(f"{n} {ms:.1f} ms" for n, ms in results["optimizer_step_ms"].items())
        + f" -> using {results['optimizer']}",
        "",
        table(
            ["candidate", "ms/step", "images/s", "± (half IQR)", "speed vs timm fp32"],
            [
                [
                    n,
                    f"{c['ms_per_step']:.1f}",
                    f"{c['images_per_s']:.1f}",
                    f"{c['spread']:.0%}",
                    f"{c['vs_timm_fp32']:.3f}x",
                ]
                for n, c in results["candidates"].items()
            ],
        ),
        "",
    ]
    for name, value in results["ratios"].items():
        target = results["targets"].get(name)
        verdict = (
            ""
            if target is None
            else f"  (target >= {target:.2f}x: {'met' if value >= target else 'NOT met'})"
        )
        lines.append(f"{name}: {value:.3f}x{verdict}")
    if results["compile_seconds"]:
        lines.append(
            "compile time (first step): "
            + ", ".join(f"{p} {s:.1f} s" for p, s in results["compile_seconds"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: cifar and vit_s16")
    p.add_argument(
        "--precision", action="append", choices=["fp32", "bf16", "fp16"], help="default: all for the device"
    )
    p.add_argument("--optimizer", default="auto", choices=["auto", *OPTIMIZER_VARIANTS])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd vitexp candidates")
    p.add_argument("--channels-last", action="store_true", help="add channels-last vitexp candidates")
    p.add_argument("--same-weights", action="store_true", help="start vitexp from timm's initial weights")
    args = p.parse_args(argv)
    dev = setup(args.device, args.threads)
    all_results: dict[str, Any] = {}
    for shape in args.shape or ["cifar", "vit_s16"]:
        spec = SHAPES[shape]
        sizes: dict[str, Any] = {"repeats": args.repeats, "steps": args.steps}
        if args.quick:
            sizes = {
                "batch_size": max(2, spec.batch_size // 8),
                "repeats": 2,
                "steps": 1,
                "optimizer_repeats": 2,
            }
        results = run(
            shape=shape,
            device=dev,
            precisions=args.precision,
            optimizer=args.optimizer,
            compile=args.compile,
            channels_last=args.channels_last,
            same_weights=args.same_weights,
            **sizes,
        )
        print(report(results) + "\n")
        all_results[shape] = results
    all_results["machine"] = next(iter(all_results.values()))["machine"]
    finish(all_results, args.json)
    return all_results


if __name__ == "__main__":
    main()
