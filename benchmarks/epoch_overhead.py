"""End-to-end: the share of a training epoch on the CIFAR-10 subset spent outside the model's
forward, backward and optimizer step.

    python benchmarks/epoch_overhead.py                          # vit_ti4, fp32 and bf16, CPU
    python benchmarks/epoch_overhead.py --precision bf16 --trivialaugment --mixup
    python benchmarks/epoch_overhead.py --device cuda            # adds the A/B measurement
    python benchmarks/epoch_overhead.py --quick

Method. One epoch of vitexp's training loop, built from the loop's own pieces (in-memory
CIFAR split on the device, `DeviceLoader` + `BatchTransform` with the cifar10 config's
augmentation, `param_groups` + AdamW as in conf/optimizer/adamw.yaml, the warmup-cosine
schedule set by `set_lr`, the library's `train_step` with cross-entropy and grad clipping at
1.0, the device-side `LossWindow`), with wall-clock stamps around every phase:

  data         next(batches): index the epoch's order, augment, normalise (timed inside the
               step by wrapping the batch iterator)
  step         the rest of `vitexp.training.loop.train_step`: mixup (if on), autocast forward +
               loss, backward, clip, optimizer.step(), zero_grad()
  bookkeeping  set_lr from the schedule, the device-side loss/finite window, the loop itself

overhead = (epoch wall time - model time) / epoch wall time, where the epoch wall time runs
from drawing the epoch's order to the end of the last step. On the CPU every op is
synchronous, so the stamps are exact. On a GPU each stamp needs a synchronize, which removes
the overlap of data work with queued GPU work that a real run has, so there the A/B method is
reported as well: the uninstrumented epoch against the same number of steps on one fixed,
pre-made batch; overhead = 1 - T(fixed) / T(real).

Two warm-up steps run first (first-step allocations, autotuning), outside the epoch.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.common import (
    CIFAR_MEAN,
    CIFAR_STD,
    DEFAULT_CIFAR_ROOT,
    SHAPES,
    Shape,
    autocast,
    finish,
    machine,
    parser,
    setup,
    shape_dict,
    synchronize,
    table,
    vitexp_model,
)

TARGET = 0.10


class _TimedBatches:
    """Batches from `batches`, with the seconds spent producing them (the data phase) summed
    in `seconds`: the step pulls its batch itself, so the data time is measured inside it."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.batches, self.device = batches, device
        self.seconds: list[float] = []

    def __iter__(self) -> _TimedBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        synchronize(self.device)
        start = time.perf_counter()
        batch = next(self.batches)
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)
        return batch


class _Loop:
    """The training loop's pieces for one model and data set: the library's own `Step`."""

    def __init__(
        self,
        *,
        root: Path,
        device: torch.device,
        spec: Shape,
        precision: str,
        policy: Any,
        mixup: bool,
    ) -> None:
        from vitexp.data import BatchTransform, DeviceLoader, load_cifar10
        from vitexp.data.augment import mixup_cutmix
        from vitexp.training.metrics import LossWindow
        from vitexp.training.optim import make_schedule, param_groups
        from vitexp.training.setup import Step

        self.device = device
        split = load_cifar10(root, download=False).train.to(device)
        transform = BatchTransform(
            img_size=spec.img_size, mean=CIFAR_MEAN, std=CIFAR_STD, crop_padding=4, hflip=True, policy=policy
        )
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.loader = DeviceLoader(
            split, batch_size=spec.batch_size, transform=transform, train=True, generator=self.generator
        )
        torch.manual_seed(0)
        model = vitexp_model(spec).to(device)
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        self.schedule = make_schedule(
            {"_target_": "vitexp.training.optim.warmup_cosine", "_partial_": True, "warmup_epochs": 1.0},
            steps_per_epoch=len(self.loader),
        )
        self.total_steps = 10 * len(self.loader)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        mix = None
        if mixup:
            mix = functools.partial(
                mixup_cutmix, num_classes=spec.num_classes, mixup_alpha=0.8, cutmix_alpha=1.0,
                generator=self.generator,
            )  # fmt: skip
        self.step = Step(
            forward=model,
            model=model,
            optimizer=optimizer,
            loss_fn=nn.CrossEntropyLoss(),
            autocast=autocast(device, precision),
            scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
            grad_clip=1.0,
            mix=mix,
        )
        self.window = LossWindow(device)
        self.global_step = 0

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        from vitexp.training.loop import train_step

        return train_step(self.step, batches)

    def bookkeeping(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        from vitexp.training.optim import set_lr

        self.global_step += 1
        self.window.add(loss, finite, self.global_step)
        set_lr(self.step.optimizer, self.base_lrs, self.schedule(self.global_step, self.total_steps))

    def run_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        result = self.train_step(batches)
        self.bookkeeping(result.loss, result.finite)


def instrumented_epoch(loop: _Loop, steps: int) -> dict[str, float]:
    """Seconds per phase over one epoch of `steps` steps, the epoch's wall time, and the median
    and largest data time of a step."""
    sync = lambda: synchronize(loop.device)  # noqa: E731
    phases = {"data": 0.0, "step": 0.0, "bookkeeping": 0.0}
    sync()
    start = time.perf_counter()
    batches = _TimedBatches(loop.loader.iter_from(loop.loader.new_order()), loop.device)
    for _ in range(steps):
        t0 = time.perf_counter()
        result = loop.train_step(batches)
        sync()
        t1 = time.perf_counter()
        loop.bookkeeping(result.loss, result.finite)
        sync()
        t2 = time.perf_counter()
        phases["step"] += t1 - t0 - batches.seconds[-1]
        phases["bookkeeping"] += t2 - t1
    sync()
    phases["data"] = sum(batches.seconds)
    phases["epoch"] = time.perf_counter() - start
    phases["data_step_median"] = statistics.median(batches.seconds)
    phases["data_step_max"] = max(batches.seconds)
    return phases


def ab_epochs(loop: _Loop, steps: int) -> dict[str, float]:
    """The uninstrumented epoch, and the same number of steps on one fixed batch."""
    sync = lambda: synchronize(loop.device)  # noqa: E731
    sync()
    start = time.perf_counter()
    batches = loop.loader.iter_from(loop.loader.new_order())
    for _ in range(steps):
        loop.run_step(batches)
    sync()
    real = time.perf_counter() - start
    x, y = next(iter(loop.loader))
    fixed_batch = itertools.repeat((x, y))  # the same tensors forever, no loader work
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loop.run_step(fixed_batch)
    sync()
    fixed = time.perf_counter() - start
    return {"real": real, "fixed": fixed}


def run(
    *,
    root: str | Path = DEFAULT_CIFAR_ROOT,
    device: str | torch.device = "cpu",
    shape: str | Shape = "vit_ti4",
    precision: str = "fp32",
    batch_size: int | None = None,
    max_steps: int | None = None,
    ab: bool | None = None,
    trivialaugment: bool = False,
    mixup: bool = False,
) -> dict[str, Any]:
    """Time one instrumented epoch (and, with `ab`, default on CUDA, the A/B pair); return
    the phase times and the overhead share."""
    dev = torch.device(device)
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if batch_size is not None:
        spec = Shape(**{**shape_dict(spec), "batch_size": batch_size})
    policy = None
    if trivialaugment:
        from vitexp.data.augment import TrivialAugment

        policy = TrivialAugment()
    loop = _Loop(root=Path(root), device=dev, spec=spec, precision=precision, policy=policy, mixup=mixup)
    steps = len(loop.loader) if max_steps is None else min(max_steps, len(loop.loader))
    warm = loop.loader.iter_from(loop.loader.new_order())
    for _ in range(2):
        loop.run_step(warm)

    phases = instrumented_epoch(loop, steps)
    model_time = phases["step"]
    results: dict[str, Any] = {
        "machine": machine(dev),
        "shape": shape_dict(spec),
        "precision": precision,
        "trivialaugment": trivialaugment,
        "mixup": mixup,
        "steps": steps,
        "seconds": phases,
        "shares": {k: phases[k] / phases["epoch"] for k in ("data", "step", "bookkeeping")},
        "overhead": 1.0 - model_time / phases["epoch"],
        "target": TARGET,
    }
    results["shares"]["unaccounted"] = 1.0 - sum(results["shares"].values())
    if ab if ab is not None else dev.type == "cuda":
        pair = ab_epochs(loop, steps)
        results["ab_seconds"] = pair
        results["ab_overhead"] = 1.0 - pair["fixed"] / pair["real"]
    return results


def report(results: dict[str, Any]) -> str:
    s, sec = results["shape"], results["seconds"]
    extras = "".join(f" + {name}" for name in ("trivialaugment", "mixup") if results[name])
    met = "met" if results["overhead"] < results["target"] else "NOT met"
    lines = [
        f"## one epoch, {results['steps']} steps of {s['batch_size']}: ViT dim {s['dim']}, "
        f"depth {s['depth']}, patch {s['patch_size']}, {results['precision']}{extras}",
        "",
        table(
            ["phase", "seconds", "share of the epoch", "ms/step"],
            [
                [
                    name,
                    f"{sec[name]:.3f}",
                    f"{results['shares'][name]:.2%}",
                    f"{sec[name] / results['steps'] * 1e3:.2f}",
                ]
                for name in ("data", "step", "bookkeeping")
            ]
            + [["unaccounted (loop, stamps)", "", f"{results['shares']['unaccounted']:.2%}", ""]]
            + [["epoch", f"{sec['epoch']:.3f}", "100%", f"{sec['epoch'] / results['steps'] * 1e3:.2f}"]],
        ),
        "",
        f"outside the training step (vitexp's train_step, without its data fetch): {results['overhead']:.2%} "
        f"(target < {results['target']:.0%}: {met})",
        f"data per step: median {sec['data_step_median'] * 1e3:.2f} ms, "
        f"max {sec['data_step_max'] * 1e3:.2f} ms",
    ]
    if "ab_overhead" in results:
        ab = results["ab_seconds"]
        lines.append(
            f"A/B: real epoch {ab['real']:.3f} s, fixed batch {ab['fixed']:.3f} s "
            f"-> overhead {results['ab_overhead']:.2%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--root", type=Path, default=DEFAULT_CIFAR_ROOT, help="folder holding cifar-10-batches-py/"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="vit_ti4")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--ab", action="store_true", help="also run the A/B measurement (default on CUDA only)")
    p.add_argument(
        "--trivialaugment", action="store_true", help="add a TrivialAugment policy to the augmentation"
    )
    p.add_argument("--mixup", action="store_true", help="add mixup (0.8) / cutmix (1.0) to every batch")
    args = p.parse_args(argv)
    dev = setup(args.device, args.threads)
    if not (args.root / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"no cifar-10-batches-py/ under {args.root}: pass --root (or set VITEXP_TEST_DATA)")
    precisions = args.precision or (["fp32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16"])
    all_results: dict[str, Any] = {}
    for precision in precisions:
        results = run(
            root=args.root,
            device=dev,
            shape=args.shape,
            precision=precision,
            ab=True if args.ab else None,
            trivialaugment=args.trivialaugment,
            mixup=args.mixup,
            **({"max_steps": 4} if args.quick else {}),
        )
        print(report(results) + "\n")
        all_results[precision] = results
    all_results["machine"] = next(iter(all_results.values()))["machine"]
    finish(all_results, args.json)
    return all_results


if __name__ == "__main__":
    main()
