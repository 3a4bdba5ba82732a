"""Datasets held in memory as uint8 tensors, and batched augmentation on the training device.

Every dataset here fits in memory (CIFAR-10/100 are 150 MB as uint8), so a split is one
uint8 tensor `(N, C, H, W)` plus int64 labels, moved once to the training device. Batches
are cut from a shuffled index and augmented there, all samples at once, with one affine
`grid_sample` that does crop (with padding or random-resized), flip and resize to the
model's resolution in a single pass: no PIL, no worker processes, no per-image Python.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitexp.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Split:
    images: Tensor  # uint8, (N, C, H, W)
    labels: Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class ImageData:
    train: Split
    test: Split
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, which hold only builtins and numpy arrays, and refuses any
    other global, so that a tampered file cannot run code."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy", "dtype"),
            ("numpy", "ndarray"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ConfigError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and download it again"
        ) from e
    if not isinstance(batch, dict):
        raise ConfigError(
            f"{path} is not a CIFAR batch (it holds a {type(batch).__name__}); replace the file"
        )
    return batch


def _read_cifar_batches(folder: Path, files: Sequence[str], label_key: str) -> Split:
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            targets = np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"{path} is truncated or corrupt (bad 'data' or '{label_key}'); replace it"
            ) from e
        if len(data) != len(targets):
            raise ConfigError(f"{path} is corrupt: {len(data)} images but {len(targets)} labels; replace it")
        images.append(data)
        labels.append(targets)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _ensure_cifar(root: str | Path, *, variant: str, download: bool) -> Path:
    """Return the extracted python-version folder, downloading it with torchvision only
    when it is missing and `download` is on."""
    from torchvision.datasets import CIFAR10, CIFAR100

    tv_cls = CIFAR10 if variant == "cifar10" else CIFAR100
    folder = Path(root).expanduser() / tv_cls.base_folder
    if folder.is_dir():
        # An existing folder is read as it is: torchvision's checksum check would reject
        # subsets and re-packed copies that are otherwise valid.
        return folder
    if not download:
        raise ConfigError(
            f"{variant} not found: expected {folder}/; set dataset.root to the folder that contains "
            f"{tv_cls.base_folder}/, or dataset.download=true to fetch it"
        )
    log.info("downloading %s to %s", tv_cls.url, Path(root).expanduser())
    try:
        tv_cls(root=str(Path(root).expanduser()), train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise ConfigError(
            f"could not download {variant} from {tv_cls.url} ({e}); with no network, fetch "
            f"{tv_cls.filename} elsewhere, extract it into dataset.root={root}, and run again"
        ) from e
    return folder


def load_cifar10(root: str | Path, download: bool = True) -> ImageData:
    """CIFAR-10 from the standard python-version batches under `root/cifar-10-batches-py`."""
    folder = _ensure_cifar(root, variant="cifar10", download=download)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [name for name in [*train, "test_batch"] if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} is incomplete: missing {', '.join(missing)}; download CIFAR-10 again")
    meta = folder / "batches.meta"
    classes = (
        [str(c) for c in _unpickle(meta)["label_names"]] if meta.is_file() else [str(i) for i in range(10)]
    )
    return ImageData(
        train=_read_cifar_batches(folder, train, "labels"),
        test=_read_cifar_batches(folder, ["test_batch"], "labels"),
        classes=classes,
    )


def load_cifar100(root: str | Path, download: bool = True) -> ImageData:
    """CIFAR-100 (fine labels) from the python-version files under `root/cifar-100-python`."""
    folder = _ensure_cifar(root, variant="cifar100", download=download)
    missing = [name for name in ("train", "test") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} is incomplete: missing {', '.join(missing)}; download CIFAR-100 again")
    meta = folder / "meta"
    classes = (
        [str(c) for c in _unpickle(meta)["fine_label_names"]]
        if meta.is_file()
        else [str(i) for i in range(100)]
    )
    return ImageData(
        train=_read_cifar_batches(folder, ["train"], "fine_labels"),
        test=_read_cifar_batches(folder, ["test"], "fine_labels"),
        classes=classes,
    )


# --------------------------------------------------------------------------- digits, fake


def load_digits(test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, offline), split into a
    fixed stratified train/test pair so every run is scored on the same test images."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    # Pixel values are 0..16; scale to the 0..255 range every other dataset uses.
    images = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=0, stratify=digits.target
    )
    return ImageData(
        train=Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        test=Split(torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
        classes=[str(d) for d in range(10)],
    )


def load_fake(
    num_train: int = 1024,
    num_test: int = 256,
    img_size: int = 32,
    in_channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
) -> ImageData:
    """Random images and labels, for speed tests and smoke runs that need no files."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, in_channels, img_size, img_size), dtype=torch.uint8, generator=g)
        return Split(images, torch.randint(0, num_classes, (n,), generator=g))

    return ImageData(split(num_train), split(num_test), [str(i) for i in range(num_classes)])


def carve_validation(train: Split, fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """Hold out `fraction` of the training images (a fixed, seeded choice) for validation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"dataset.val_split={fraction} must be between 0 and 1 (0 turns it off)")
    n_val = max(1, round(len(train) * fraction))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Split(train.images[train_idx], train.labels[train_idx]), Split(
        train.images[val_idx], train.labels[val_idx]
    )


# --------------------------------------------------------------------------- augmentation


class BatchTransform:
    """uint8 batch → normalised float batch at the model's resolution, with optional
    per-sample random crop (padded or random-resized) and horizontal flip.

    All geometry is one affine map per sample, applied by a single `grid_sample`: a padded
    crop is a translation by whole pixels (exact at the same resolution; the padding reads
    as black, like torchvision's `RandomCrop(padding=p)`), a random-resized crop is a scale
    plus translation, a flip negates the x axis, and the resize to `img_size` is the output
    grid's size.
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
        rrc_scale: Sequence[float] | None = None,
        rrc_ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        self.out_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.rrc_scale = tuple(rrc_scale) if rrc_scale is not None else None
        self.log_ratio = (math.log(rrc_ratio[0]), math.log(rrc_ratio[1]))
        if self.rrc_scale is not None and not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ConfigError(f"rrc_scale={list(self.rrc_scale)} must satisfy 0 < low <= high <= 1")

    @property
    def random(self) -> bool:
        return self.crop_padding > 0 or self.hflip or self.rrc_scale is not None

    def _normalize(self, x: Tensor) -> Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if mean.shape[1] != x.shape[1]:
            raise ConfigError(
                f"dataset.mean/std have {mean.shape[1]} channels but the images have {x.shape[1]}; "
                f"give one value per channel"
            )
        return (x - mean) / std

    def eval(self, images: Tensor) -> Tensor:
        """Deterministic path: resize (if needed) and normalise."""
        x = images.float().div_(255)
        if tuple(x.shape[-2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", antialias=True, align_corners=False)
        return self._normalize(x)

    def train(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random path, one independent draw per sample."""
        if not self.random:
            return self.eval(images)
        x = images.float().div_(255)
        batch, _, height, width = x.shape
        dev = x.device

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(batch, device=dev, generator=generator) * (high - low) + low

        # Crop box in normalised coordinates: half-extent (w, h) and centre (cx, cy).
        if self.rrc_scale is not None:
            area = uniform(*self.rrc_scale)
            ratio = torch.exp(uniform(*self.log_ratio))
            w = torch.sqrt(area * ratio).clamp(max=1.0)
            h = torch.sqrt(area / ratio).clamp(max=1.0)
            cx = uniform(-1.0, 1.0) * (1 - w)
            cy = uniform(-1.0, 1.0) * (1 - h)
        else:
            w = h = torch.ones(batch, device=dev)
            cx = cy = torch.zeros(batch, device=dev)
        if self.crop_padding > 0:
            p = self.crop_padding
            shift = torch.randint(-p, p + 1, (2, batch), device=dev, generator=generator).float()
            cx = cx + shift[0] * 2 / width
            cy = cy + shift[1] * 2 / height
        sx = w
        if self.hflip:
            sx = torch.where(torch.rand(batch, device=dev, generator=generator) < 0.5, -w, w)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, [batch, x.shape[1], *self.out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self._normalize(x)


class DeviceLoader:
    """Batches of a `Split` that lives on the training device, optionally shuffled each
    epoch and augmented. Shuffling and augmentation draw from `generator` alone, so its
    state is all a resumed run needs to replay the same batches."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        transform: BatchTransform,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch size {batch_size} must be positive")
        if train and batch_size > len(split):
            raise ConfigError(
                f"trainer.batch_size={batch_size} is larger than the training set ({len(split)} images); "
                f"lower trainer.batch_size"
            )
        self.split = split
        self.batch_size = batch_size
        self.transform = transform
        self.train = train
        self.generator = generator

    def __len__(self) -> int:
        # Training drops the short last batch so every step sees the same batch size;
        # evaluation keeps it so every sample is scored exactly once.
        n = len(self.split)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.split.images.device
        if self.train:
            order = torch.randperm(len(self.split), device=device, generator=self.generator)
        else:
            order = torch.arange(len(self.split), device=device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images, labels = self.split.images[idx], self.split.labels[idx]
            x = self.transform.train(images, self.generator) if self.train else self.transform.eval(images)
            yield x, labels
