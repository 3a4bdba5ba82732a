"""Model FLOPs per image (forward, and a training step's forward + backward), the FLOP/s a
training step achieves, and that as a fraction of this machine's measured matmul peak.

    python benchmarks/flops.py                    # CIFAR shape and ViT-S/16, fp32 and bf16, CPU
    python benchmarks/flops.py --shape cifar --matmul-size 2048
    python benchmarks/flops.py --device cuda
    python benchmarks/flops.py --quick

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention; a multiply-add is 2 FLOPs; elementwise ops, norms and the optimizer are not
counted, as is usual). Its table has no formula for the CPU flash-attention kernels that
`F.scaled_dot_product_attention` uses here, so they are added with torch's own attention
formulas; a closed-form count of the same model is printed as a check. The backward count
includes the attention's recomputation of the scores, as torch's formulas do.

The peak is measured, not taken from a data sheet: the median time of large square matmuls
(`--matmul-size`, default 4096) in fp32 and bf16. Achieved FLOP/s = counted training-step
FLOPs / measured step time (vitexp's model, AdamW, fixed random batch), for fp32 against the
fp32 peak and bf16 autocast against the bf16 peak. Matmuls and steps are timed interleaved in
one process, so both see the same machine load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.common import (
    SHAPES,
    Shape,
    finish,
    interleaved,
    machine,
    median,
    parser,
    setup,
    shape_dict,
    table,
    vitexp_model,
)
from benchmarks.step_vs_timm import adamw, supported_optimizers, train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode's table lacks the CPU flash-attention ops; map them to torch's formulas.
_CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(model: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """(forward FLOPs, forward + backward FLOPs) per image."""
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        logits = model(images)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    del logits
    n = images.shape[0]
    return forward / n, counter.get_total_flops() / n


def closed_form_forward_flops(shape: Shape) -> float:
    """Forward FLOPs per image of a ViT from its shape: patch projection, per block the qkv,
    attention scores and weighted sum, output projection and MLP, and the head on one token."""
    tokens = (shape.img_size // shape.patch_size) ** 2 + 1
    d, mlp = shape.dim, shape.dim * shape.mlp_ratio
    patch = 2 * (tokens - 1) * (3 * shape.patch_size**2) * d
    block = (
        2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * mlp
    )
    return patch + shape.depth * block + 2 * d * shape.num_classes


def matmul(n: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A closure multiplying two n×n matrices, and the FLOPs one call does."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def run(
    *,
    shapes: tuple[str, ...] = ("cifar", "vit_s16"),
    device: str | torch.device = "cpu",
    precisions: list[str] | None = None,
    batch_sizes: dict[str, int] | None = None,
    matmul_size: int = 4096,
    repeats: int = 5,
    steps: int = 2,
    optimizer: str = "fused",
) -> dict[str, Any]:
    """Count FLOPs of each shape, time matmul peaks and training steps interleaved, and
    return FLOPs, FLOP/s and the fractions of the peak."""
    dev = torch.device(device)
    if precisions is None:
        precisions = ["fp32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16"]
    if optimizer not in supported_optimizers(dev):
        optimizer = "foreach"
    results: dict[str, Any] = {"machine": machine(dev), "matmul_size": matmul_size, "optimizer": optimizer}
    candidates: dict[str, Any] = {}
    work: dict[str, float] = {}
    for precision in precisions:
        name = f"matmul {precision}"
        candidates[name], work[name] = matmul(matmul_size, DTYPES[precision], dev)

    results["shapes"] = {}
    for shape_name in shapes:
        spec = SHAPES[shape_name]
        if batch_sizes and shape_name in batch_sizes:
            spec = Shape(**{**shape_dict(spec), "batch_size": batch_sizes[shape_name]})
        torch.manual_seed(0)
        model = vitexp_model(spec).to(dev)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=g).to(dev)
        y = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g).to(dev)
        forward, train = count_flops(model, x[:2])
        results["shapes"][shape_name] = {
            "shape": shape_dict(spec),
            "forward_flops_per_image": forward,
            "train_flops_per_image": train,
            "train_to_forward": train / forward,
            "closed_form_forward_flops_per_image": closed_form_forward_flops(spec),
            "params": sum(p.numel() for p in model.parameters()),
        }
        for precision in precisions:
            torch.manual_seed(0)
            m = vitexp_model(spec).to(dev)
            name = f"{shape_name} step {precision}"
            candidates[name] = train_step(m, adamw(m.parameters(), optimizer), x, y, precision)
            work[name] = train * spec.batch_size

    times = interleaved(candidates, repeats=repeats, calls=steps, warmup=1, device=dev)
    flops_per_s = {name: work[name] / median(t) for name, t in times.items()}
    results["peak_flops_per_s"] = {p: flops_per_s[f"matmul {p}"] for p in precisions}
    # On a GPU with TF32 allowed (as vitexp's training allows it) an "fp32" matmul runs on the
    # tensor cores in TF32: the fp32 peak and the fp32 step are TF32 figures, and say so.
    results["fp32_is_tf32"] = dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    for shape_name, entry in results["shapes"].items():
        entry["steps"] = {
            precision: {
                "ms_per_step": median(times[f"{shape_name} step {precision}"]) * 1e3,
                "images_per_s": entry["shape"]["batch_size"]
                / median(times[f"{shape_name} step {precision}"]),
                "achieved_flops_per_s": flops_per_s[f"{shape_name} step {precision}"],
                "fraction_of_peak": flops_per_s[f"{shape_name} step {precision}"]
                / results["peak_flops_per_s"][precision],
            }
            for precision in precisions
        }
    results["repeats"] = repeats
    return results


def report(results: dict[str, Any]) -> str:
    n = results["matmul_size"]
    label = {"fp32": "fp32 (TF32 matmuls)"} if results.get("fp32_is_tf32") else {}
    lines = [
        f"## measured matmul peak ({n}x{n}): "
        + ", ".join(
            f"{label.get(p, p)} {f / 1e9:.1f} GFLOP/s" for p, f in results["peak_flops_per_s"].items()
        ),
        "",
    ]
    for shape_name, e in results["shapes"].items():
        s = e["shape"]
        lines += [
            f"## {shape_name}: {s['img_size']} px, patch {s['patch_size']}, dim {s['dim']}, "
            f"depth {s['depth']}, batch {s['batch_size']}, {e['params'] / 1e6:.2f}M params",
            "",
            f"forward {e['forward_flops_per_image'] / 1e9:.4f} GFLOP/image (closed form "
            f"{e['closed_form_forward_flops_per_image'] / 1e9:.4f}), training step "
            f"{e['train_flops_per_image'] / 1e9:.4f} GFLOP/image = {e['train_to_forward']:.2f}x forward",
            "",
            table(
                ["precision", "ms/step", "images/s", "achieved GFLOP/s", "fraction of peak"],
                [
                    [
                        p,
                        f"{r['ms_per_step']:.1f}",
                        f"{r['images_per_s']:.1f}",
                        f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                        f"{r['fraction_of_peak']:.1%}",
                    ]
                    for p, r in e["steps"].items()
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: cifar and vit_s16")
    p.add_argument("--precision", action="append", choices=list(DTYPES), help="default: all for the device")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps (and matmuls) per repeat")
    args = p.parse_args(argv)
    dev = setup(args.device, args.threads)
    shapes = tuple(args.shape or ["cifar", "vit_s16"])
    sizes: dict[str, Any] = {"matmul_size": args.matmul_size, "repeats": args.repeats, "steps": args.steps}
    if args.quick:
        sizes = {
            "matmul_size": 512,
            "repeats": 2,
            "steps": 1,
            "batch_sizes": {s: max(2, SHAPES[s].batch_size // 8) for s in shapes},
        }
    results = run(shapes=shapes, device=dev, precisions=args.precision, **sizes)
    print(report(results))
    finish(results, args.json)
    return results


if __name__ == "__main__":
    main()
