"""What a dataset is in vitexp: uint8 splits held in memory (`Split`), lists of image files
decoded while training (`FileSplit`, and its kinds for other sources: rows of a Hugging Face
dataset, `vitexp.data.hf.HFSplit`; shards read in order, `vitexp.data.streams.StreamSplit`),
and the two together with class names (`ImageData`);
plus the small offline datasets (scikit-learn's digits, random images) and the held-out
validation split.

`ImageData` checks its splits when it is made, so a dataset with labels outside its classes
(or images that are not uint8 (N, C, H, W)) stops when it is loaded, naming the split and
the first bad label, instead of mid-epoch inside the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitexp.data.images import UnreadableImage, load_image
from vitexp.errors import ConfigError, DataError


class DatasetNotFound(ConfigError):
    """A dataset's folder is not where the settings say; `dataset` is the name that
    `dataset=NAME` selects, `folder` the path that was looked for."""

    def __init__(self, message: str, *, dataset: str, folder: Path) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.folder = folder


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
    """Image files too many to hold in memory: decoded batch by batch to `image_size`.

    Subclasses read other sources by index (`where`, `load`) and check themselves (`check`);
    DataLoader workers call `load(index)` in any order."""

    paths: list[str]
    labels: Tensor  # int64, (N,)
    image_size: tuple[int, int]
    in_channels: int = 3
    on_error: str = "fail"  # what an unreadable file does: "fail" the run or "skip" the file

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, index: int) -> str:
        """Names item `index` in messages: its path."""
        return self.paths[index]

    def load(self, index: int) -> Tensor:
        """Item `index` as the model is fed it (uint8, in_channels × image_size), by the one
        image decoder; UnreadableImage when it cannot be read."""
        path = self.paths[index]
        if not Path(path).is_file():  # listed at start-up, gone since
            raise UnreadableImage(path, "the file no longer exists")
        return load_image(path, self.in_channels, self.image_size)

    def read(self, index: int) -> bytes:
        """Item `index` still encoded: the file's bytes; UnreadableImage when it cannot be read."""
        path = Path(self.paths[index])
        try:
            return path.read_bytes()
        except FileNotFoundError as e:  # listed at start-up, gone since
            raise UnreadableImage(path, "the file no longer exists") from e
        except OSError as e:
            raise UnreadableImage(path, f"{type(e).__name__}: {e.strerror or e}") from e

    def load_many(self, indices: list[int]) -> Tensor:
        """`load` of each index, as one uint8 batch."""
        return torch.stack([self.load(i) for i in indices])

    def check(self, num_classes: int, where: str) -> None:
        """Raise DataError (naming `where`) unless the split is usable with `num_classes`."""
        if not isinstance(self.paths, list) or not all(isinstance(p, str) for p in self.paths):
            raise DataError(f"{where}: the file list must be a list of paths (str)")
        check_labels(self.labels, len(self.paths), num_classes, where)

    def subset(self, idx: Tensor) -> FileSplit:
        keep = idx.tolist()
        return FileSplit(
            [self.paths[i] for i in keep], self.labels[idx], self.image_size, self.in_channels, self.on_error
        )


def check_labels(labels: Any, count: int, num_classes: int, where: str) -> None:
    """Labels fit for the loss: an int64 tensor (N,) with `count` entries, each in
    [0, num_classes). Raises DataError naming `where` (a split, or the file it came from)
    and the first bad label."""
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        kind = (
            f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        )
        raise DataError(f"{where}: the labels are {kind}; vitexp needs one int64 label per image")
    if len(labels) != count:
        raise DataError(f"{where}: {count} images but {len(labels)} labels; each image needs one label")
    if count == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise DataError(
            f"{where}: label {int(labels[first])} (image {first}) is outside the {num_classes} classes "
            f"0..{num_classes - 1}; fix the labels or the class list"
        )


def check_split(split: Split | FileSplit, num_classes: int, where: str) -> None:
    """A split vitexp can train on: uint8 images (N, C, H, W) or a list of files, with
    labels that `check_labels` accepts. Raises DataError naming `where`."""
    if isinstance(split, FileSplit):
        split.check(num_classes, where)
        return
    if isinstance(split, Split):
        images = split.images
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            kind = (
                f"{images.dtype} {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else type(images).__name__
            )
            raise DataError(f"{where}: the images are {kind}; vitexp needs uint8 (N, C, H, W)")
        count = len(images)
    else:
        raise DataError(f"{where} is a {type(split).__name__}, not a vitexp.data.Split or FileSplit")
    check_labels(split.labels, count, num_classes, where)


@dataclass
class ImageData:
    train: Split | FileSplit
    test: Split | FileSplit
    classes: list[str]

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            check_split(getattr(self, name), self.num_classes, f"the {name} split")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- digits, fake


def load_digits(test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, offline), split into a
    fixed stratified train/test pair so every run is scored on the same test images."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"dataset.load.test_fraction={test_fraction} must be between 0 and 1")
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
    for name, value, low in (
        ("num_train", num_train, 0),
        ("num_test", num_test, 0),
        ("img_size", img_size, 1),
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"dataset.load.{name}={value!r} must be an integer >= {low}")
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
    if n_val >= len(train):
        raise ConfigError(
            f"dataset.val_split={fraction} holds out all {len(train)} training images; use a smaller fraction"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:]), train.subset(order[:n_val])
