"""What every benchmark shares: device and thread set-up, model shapes, interleaved timing,
machine description and plain-text tables.

Timing method: all candidates of one benchmark live in one process and are timed in turns
(candidate A, B, C, then again B, C, A, ...), several repeats each, and the median per
candidate is reported. Other work on the machine then slows every candidate alike instead of
whichever happened to run during a busy moment, so the *ratios* are what to read; absolute
figures move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
# The CIFAR-10 subset the tests use (5,085 training images), beside the repository.
DEFAULT_CIFAR_ROOT = Path(os.environ.get("VITEXP_TEST_DATA", REPO.parent / "shared" / "data"))
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Shape:
    """A ViT configuration, in both vitexp's and timm's vocabulary."""

    img_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    num_classes: int
    batch_size: int
    mlp_ratio: int = 4


SHAPES: dict[str, Shape] = {
    # The CIFAR shape (a 6-layer ViT-Ti/4) and ViT-S/16 at ImageNet resolution.
    "cifar": Shape(img_size=32, patch_size=4, dim=192, depth=6, heads=3, num_classes=10, batch_size=128),
    "vit_s16": Shape(
        img_size=224, patch_size=16, dim=384, depth=12, heads=6, num_classes=1000, batch_size=32
    ),
    # vit_ti4 as configured in conf/model/vit_ti4.yaml (12 layers), for the epoch benchmark.
    "vit_ti4": Shape(img_size=32, patch_size=4, dim=192, depth=12, heads=3, num_classes=10, batch_size=128),
    # For the tests: runs in milliseconds.
    "tiny": Shape(img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=10, batch_size=8),
}


def vitexp_model(shape: Shape) -> nn.Module:
    from vitexp.models import VisionTransformer

    return VisionTransformer(
        img_size=shape.img_size,
        patch_size=shape.patch_size,
        hidden_size=shape.dim,
        mlp_dim=shape.dim * shape.mlp_ratio,
        num_heads=shape.heads,
        num_layers=shape.depth,
        num_classes=shape.num_classes,
    )


def timm_model(shape: Shape) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=shape.img_size,
        patch_size=shape.patch_size,
        embed_dim=shape.dim,
        depth=shape.depth,
        num_heads=shape.heads,
        mlp_ratio=shape.mlp_ratio,
        num_classes=shape.num_classes,
    )


def setup(device: str, threads: int | None) -> torch.device:
    """The torch device to run on, with the CPU thread count fixed (the default, all cores,
    is what the issue's figures assume on a 2-core machine) and TF32 on for CUDA matmuls as in
    vitexp's training loop."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a precision name, as vitexp.runtime.autocast_context builds it."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    calls: int = 1,
    warmup: int = 1,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one entry per repeat.

    Every candidate is first called `warmup` times (allocations, lazy init, autotuning), then
    each repeat times `calls` calls of every candidate in turn; the starting candidate rotates
    between repeats so none always runs first or last.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(calls):
                candidates[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Half the interquartile range relative to the median (half the full range for fewer
    than 4 values): a rough ± for a table that one disturbed repeat does not dominate."""
    if len(values) < 2:
        return 0.0
    if len(values) < 4:
        low, high = min(values), max(values)
    else:
        low, _, high = statistics.quantiles(values, n=4)
    return (high - low) / 2 / statistics.median(values)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on, including the load average at the time."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p


def finish(results: dict[str, Any], json_path: Path | None) -> None:
    """Print the machine line and write the JSON file when asked."""
    m = results["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"load average {m['load_average']} (at start) -> {[round(x, 2) for x in os.getloadavg()]} (at end)"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {json_path}")


def shape_dict(shape: Shape) -> dict[str, int]:
    return asdict(shape)


# ------------------------------------------------------------------ full training runs
# ablation.py and budget_curve.py time whole `python -m vitexp` runs, one after another.

LOAD_FILE = "load_at_start.txt"  # the 1-minute load average a run started at, beside its records


def run_module(args: Sequence[str], what: str) -> None:
    """`python -m ARGS` from the repository root; when it fails, stop with one line naming
    `what` and the command's last line of output."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"{what} failed: {tail[0]}")


def record_load(run_dir: Path, load: float) -> None:
    (run_dir / LOAD_FILE).write_text(f"{load:.2f}\n")


def recorded_load(run_dir: Path) -> float | None:
    path = run_dir / LOAD_FILE
    return float(path.read_text()) if path.is_file() else None
