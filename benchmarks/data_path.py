"""Data-path throughput: augmented CIFAR batches per second from vitexp's in-memory loader
against torchvision's CIFAR10 + per-image transforms + DataLoader, with the same
augmentation, measured side by side in one process.

    python benchmarks/data_path.py                     # CPU, the CIFAR-10 subset beside the repo
    python benchmarks/data_path.py --device cuda
    python benchmarks/data_path.py --root PATH --workers 0 2 4
    python benchmarks/data_path.py --quick

Both pipelines read the same python-version CIFAR-10 batches and produce normalised float
batches of 128 on the device: vitexp's `DeviceLoader` (one uint8 tensor on the device,
indexing plus `BatchTransform.train`: padded random crop and flip as one batched
`grid_sample`), and torchvision's `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`,
`ToTensor()`, `Normalize` per image in a `DataLoader` (0 and 2 workers by default; persistent
workers, so an epoch's time excludes forking them; pinned memory and non-blocking copies on
CUDA). A repeat is one full pass over the training images per pipeline (dropping the short
last batch); the median over repeats is reported. Optionally the same comparison with a
TrivialAugment policy on both sides (torchvision's `TrivialAugmentWide` on PIL images).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    CIFAR_MEAN,
    CIFAR_STD,
    DEFAULT_CIFAR_ROOT,
    finish,
    interleaved,
    machine,
    median,
    parser,
    setup,
    spread,
    synchronize,
    table,
)

TARGET = 20.0


def vitexp_epoch(
    root: Path,
    device: torch.device,
    *,
    batch_size: int,
    max_batches: int | None,
    policy: Any = None,
) -> Any:
    """A closure that runs one epoch of vitexp's training loader, and the number of batches it
    yields."""
    from vitexp.data import BatchTransform, DeviceLoader, load_cifar10

    transform_cls, loader_cls = BatchTransform, DeviceLoader
    split = load_cifar10(root, download=False).train
    transform = transform_cls(
        img_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, crop_padding=4, hflip=True, policy=policy
    )
    generator = torch.Generator(device=device).manual_seed(0)
    loader = loader_cls(
        split.to(device), batch_size=batch_size, transform=transform, train=True, generator=generator
    )

    def epoch() -> int:
        n = 0
        for _x, _y in loader:
            n += 1
            if n == max_batches:
                break
        return n

    return epoch, len(loader) if max_batches is None else min(max_batches, len(loader))


def torchvision_epoch(
    root: Path,
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    max_batches: int | None,
    trivialaugment: bool = False,
) -> Any:
    """The same epoch from torchvision's CIFAR10 dataset, per-image transforms and a DataLoader."""
    import torchvision
    from torchvision import transforms as T

    class CIFAR10Subset(torchvision.datasets.CIFAR10):
        """torchvision's reader without its checksum check, which rejects the subset's files."""

        def _check_integrity(self) -> bool:
            return True

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if trivialaugment:
        steps.append(T.TrivialAugmentWide())
    steps += [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    dataset = CIFAR10Subset(str(root), train=True, transform=T.Compose(steps), download=False)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(0),
    )

    def epoch() -> int:
        n = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
            n += 1
            if n == max_batches:
                break
        return n

    return epoch, len(loader) if max_batches is None else min(max_batches, len(loader))


def run(
    *,
    root: str | Path = DEFAULT_CIFAR_ROOT,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    workers: tuple[int, ...] = (0, 2),
    repeats: int = 5,
    max_batches: int | None = None,
    trivialaugment: bool = False,
) -> dict[str, Any]:
    """Batches per second of each pipeline, and vitexp's speed relative to each baseline.

    The headline ratio is vitexp's loader against the fastest torchvision configuration
    measured.
    """
    dev = torch.device(device)
    root = Path(root)
    results: dict[str, Any] = {"machine": machine(dev), "batch_size": batch_size, "root": str(root)}
    epochs: dict[str, Any] = {}
    batches: dict[str, int] = {}
    epochs["vitexp"], batches["vitexp"] = vitexp_epoch(
        root, dev, batch_size=batch_size, max_batches=max_batches
    )
    for w in workers:
        name = f"torchvision, {w} workers"
        epochs[name], batches[name] = torchvision_epoch(
            root, dev, batch_size=batch_size, workers=w, max_batches=max_batches
        )
    if trivialaugment:
        from vitexp.data.augment import TrivialAugment

        name = "vitexp + TrivialAugment"
        epochs[name], batches[name] = vitexp_epoch(
            root, dev, batch_size=batch_size, max_batches=max_batches, policy=TrivialAugment()
        )
        for w in workers:
            name = f"torchvision + TrivialAugmentWide, {w} workers"
            epochs[name], batches[name] = torchvision_epoch(
                root, dev, batch_size=batch_size, workers=w, max_batches=max_batches, trivialaugment=True
            )

    times = interleaved(epochs, repeats=repeats, warmup=1, device=dev)
    per_batch = {name: median(t) / batches[name] for name, t in times.items()}
    results["pipelines"] = {
        name: {
            "batches_per_s": 1.0 / per_batch[name],
            "images_per_s": batch_size / per_batch[name],
            "ms_per_batch": per_batch[name] * 1e3,
            "spread": spread(times[name]),
            "batches_per_epoch": batches[name],
        }
        for name in epochs
    }

    def ratios(ours: str, prefix: str) -> dict[str, float]:
        """How many times faster `ours` is than each baseline whose name starts with `prefix`,
        keyed by the baseline's worker count."""
        return {
            f"{name.rpartition(', ')[2].replace(' ', '_')}": per_batch[name] / per_batch[ours]
            for name in per_batch
            if name.startswith(prefix)
        }

    plain = ratios("vitexp", "torchvision, ")
    results["ratios"] = {f"vitexp_vs_torchvision_{k}": v for k, v in plain.items()}
    results["ratio_vs_fastest_baseline"] = min(plain.values())
    results["target"] = TARGET
    if trivialaugment:
        policy = ratios("vitexp + TrivialAugment", "torchvision + TrivialAugmentWide, ")
        results["policy_ratios"] = {f"vitexp_ta_vs_torchvision_ta_{k}": v for k, v in policy.items()}
    results["repeats"] = repeats
    synchronize(dev)
    return results


def report(results: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{p['ms_per_batch']:.2f}",
            f"{p['batches_per_s']:.1f}",
            f"{p['images_per_s']:.0f}",
            f"{p['spread']:.0%}",
        ]
        for name, p in results["pipelines"].items()
    ]
    lines = [
        f"## augmented batches of {results['batch_size']} (CIFAR, crop with padding 4 + flip + normalise)",
        "",
        table(["pipeline", "ms/batch", "batches/s", "images/s", "± (half IQR)"], rows),
        "",
    ]
    lines += [f"{name}: {value:.1f}x" for name, value in results["ratios"].items()]
    best = results["ratio_vs_fastest_baseline"]
    lines.append(
        f"vitexp vs the fastest torchvision configuration: {best:.1f}x "
        f"(target >= {results['target']:.0f}x: {'met' if best >= results['target'] else 'NOT met'})"
    )
    lines += [f"{name}: {value:.1f}x" for name, value in results.get("policy_ratios", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--root", type=Path, default=DEFAULT_CIFAR_ROOT, help="folder holding cifar-10-batches-py/"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trivialaugment", action="store_true", help="also compare with a TrivialAugment policy")
    args = p.parse_args(argv)
    dev = setup(args.device, args.threads)
    if not (args.root / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"no cifar-10-batches-py/ under {args.root}: pass --root (or set VITEXP_TEST_DATA)")
    sizes: dict[str, Any] = {"repeats": args.repeats}
    if args.quick:
        sizes = {"repeats": 2, "max_batches": 4}
    results = run(
        root=args.root,
        device=dev,
        batch_size=args.batch_size,
        workers=tuple(args.workers),
        trivialaugment=args.trivialaugment,
        **sizes,
    )
    print(report(results))
    finish(results, args.json)
    return results


if __name__ == "__main__":
    main()
