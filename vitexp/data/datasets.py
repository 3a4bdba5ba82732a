"""What a dataset is in vitexp: uint8 splits held in memory (`Split`), lists of image files
decoded while training (`FileSplit`), and the two together with class names (`ImageData`);
plus the small offline datasets (scikit-learn's digits, random images) and the held-out
validation split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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

    def subset(self, idx: Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])


@dataclass
class FileSplit:
    """Image files too many to hold in memory: decoded batch by batch to `image_size`."""

    paths: list[str]
    labels: Tensor  # int64, (N,)
    image_size: tuple[int, int]
    in_channels: int = 3
    on_error: str = "fail"  # what an unreadable file does: "fail" the run or "skip" the file

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Tensor) -> FileSplit:
        keep = idx.tolist()
        return FileSplit(
            [self.paths[i] for i in keep], self.labels[idx], self.image_size, self.in_channels, self.on_error
        )


@dataclass
class ImageData:
    train: Split | FileSplit
    test: Split | FileSplit
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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


def carve_validation(train: Split | FileSplit, fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """Hold out `fraction` of the training images (a fixed, seeded choice) for validation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"dataset.val_split={fraction} must be between 0 and 1 (0 turns it off)")
    n_val = max(1, round(len(train) * fraction))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:]), train.subset(order[:n_val])
