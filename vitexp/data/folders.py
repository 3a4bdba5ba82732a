"""ImageNet-style folder trees: files listed at start-up, decoded by DataLoader workers
through the one image decoder (`vitexp.data.images.load_image`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vitexp.data.datasets import DatasetNotFound, FileSplit, ImageData
from vitexp.data.images import Encoded, UnreadableImage, defer_or_load
from vitexp.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _scan_folder(
    folder: Path, classes: list[str] | None, setting: str
) -> tuple[list[str], list[int], list[str]]:
    if not folder.is_dir():
        raise DatasetNotFound(
            f"image folder {folder} does not exist; set dataset.root (and {setting})",
            dataset="imagefolder",
            folder=folder,
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{folder} has class folders the training set lacks: {', '.join(unknown[:5])}; "
            f"give both splits the same class folders"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                paths.append(str(path))
                labels.append(label)
    if not paths:
        raise DataError(
            f"no images found under {folder}: expected one folder per class holding "
            f"{', '.join(IMAGE_EXTENSIONS)} files"
        )
    return paths, labels, classes


def load_imagefolder(
    root: str | Path,
    train_dir: str = "train",
    test_dir: str = "val",
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    on_error: str = "fail",
) -> ImageData:
    """An ImageNet-style tree, `root/{train_dir,test_dir}/<class>/<image>`. Files are listed
    now and decoded while training (DataLoader workers) by `load_image` at `image_size`."""
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"dataset.on_error={on_error!r} must be fail or skip")
    if in_channels not in (1, 3):
        raise ConfigError(
            f"dataset.in_channels={in_channels}: image files are read as 1 (L) or 3 (RGB) channels"
        )
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size={image_size!r} must be a positive size or [height, width]")
    root = Path(root).expanduser()
    train_paths, train_labels, classes = _scan_folder(root / train_dir, None, "dataset.train_dir")
    test_paths, test_labels, _ = _scan_folder(root / test_dir, classes, "dataset.test_dir")

    def split(paths: list[str], labels: list[int]) -> FileSplit:
        return FileSplit(paths, torch.tensor(labels, dtype=torch.long), size, in_channels, on_error)

    return ImageData(split(train_paths, train_labels), split(test_paths, test_labels), classes)


class _DecodedFiles(torch.utils.data.Dataset):
    """Decodes one item (`FileSplit.load`: a file, through `load_image`) to a uint8 (C, H, W)
    tensor at the split's size. An item that cannot be read yields its error instead of
    raising, so the main process can name it in one line (or skip it)."""

    def __init__(self, split: FileSplit, defer_jpegs: bool = False) -> None:
        self.split = split
        self.defer_jpegs = defer_jpegs  # leave JPEGs encoded for the training device (Encoded)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor | Encoded | None, int, str, str | None]:
        split, label = self.split, int(self.split.labels[index])
        try:
            if self.defer_jpegs:
                data = split.read(index)
                image = defer_or_load(data, split.in_channels, split.image_size, split.where(index))
            else:
                image = split.load(index)
        except UnreadableImage as e:
            return None, label, split.where(index), e.reason
        return image, label, split.where(index), None


def _collate_decoded(items: list) -> tuple[Tensor | list, Tensor, list[tuple[str, str]]]:
    """(images, labels, failures) of a batch: the images stacked, or as a list when some are
    still `Encoded` (the training process decodes those)."""
    good = [(image, label) for image, label, _, error in items if error is None]
    failures = [(path, error) for _, _, path, error in items if error is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), failures
    images = [g[0] for g in good]
    labels = torch.tensor([g[1] for g in good])
    if any(isinstance(image, Encoded) for image in images):
        return images, labels, failures
    return torch.stack(images), labels, failures
