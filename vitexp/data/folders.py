"""ImageNet-style folder trees: files listed at start-up, decoded by DataLoader workers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitexp.data.datasets import FileSplit, ImageData
from vitexp.errors import ConfigError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _scan_folder(folder: Path, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    if not folder.is_dir():
        raise ConfigError(
            f"image folder {folder} does not exist; set dataset.root (and dataset.train_dir/test_dir)"
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(f"{folder} has class folders the training set lacks: {', '.join(unknown[:5])}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                paths.append(str(path))
                labels.append(label)
    if not paths:
        raise ConfigError(
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
    now and decoded while training (DataLoader workers), resized to `image_size`."""
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"dataset.on_error={on_error!r} must be fail or skip")
    size = (
        (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    )
    root = Path(root).expanduser()
    train_paths, train_labels, classes = _scan_folder(root / train_dir, None)
    test_paths, test_labels, _ = _scan_folder(root / test_dir, classes)

    def split(paths: list[str], labels: list[int]) -> FileSplit:
        return FileSplit(paths, torch.tensor(labels, dtype=torch.long), size, in_channels, on_error)

    return ImageData(split(train_paths, train_labels), split(test_paths, test_labels), classes)


class _DecodedFiles(torch.utils.data.Dataset):
    """Decodes one file to a uint8 (C, H, W) tensor: resized so its shorter side fits, then
    centre-cropped. A file that cannot be read yields its error instead of raising, so the
    main process can name it in one line (or skip it)."""

    def __init__(self, split: FileSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str, str | None]:
        from PIL import Image, ImageOps

        path, label = self.split.paths[index], int(self.split.labels[index])
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.split.in_channels == 1 else "RGB")
                height, width = self.split.image_size
                img = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
            return None, label, path, f"{type(e).__name__}: {e}"
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return tensor, label, path, None


def _collate_decoded(items: list) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    good = [(image, label) for image, label, _, error in items if error is None]
    failures = [(path, error) for _, _, path, error in items if error is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), failures
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), failures
