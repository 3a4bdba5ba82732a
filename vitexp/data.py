"""Datasets held in memory as uint8 tensors, and batched augmentation on the training device.

Every dataset here fits in memory (CIFAR-10/100 are 150 MB as uint8), so a split is one
uint8 tensor `(N, C, H, W)` plus int64 labels, moved once to the training device. Batches
are cut from a shuffled index and augmented there, all samples at once, with one affine
`grid_sample` that does crop (with padding or random-resized), flip and resize to the
model's resolution in a single pass: no PIL, no worker processes, no per-image Python.
"""

from __future__ import annotations

import abc
import logging
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitexp.augment import shift_crop_flip
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


def carve_validation(train: Split | FileSplit, fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """Hold out `fraction` of the training images (a fixed, seeded choice) for validation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"dataset.val_split={fraction} must be between 0 and 1 (0 turns it off)")
    n_val = max(1, round(len(train) * fraction))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:]), train.subset(order[:n_val])


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


# --------------------------------------------------------------------------- augmentation


class BatchTransform:
    """uint8 batch → normalised float batch at the model's resolution, with optional
    per-sample random crop (padded or random-resized) and horizontal flip.

    All geometry is one affine map per sample, applied by a single `grid_sample`: a padded
    crop is a translation by whole pixels (exact at the same resolution; the padding reads
    as black, like torchvision's `RandomCrop(padding=p)`), a random-resized crop is a scale
    plus translation, a flip negates the x axis, and the resize to `img_size` is the output
    grid's size.

    `policy`, when given, is a batched per-sample augmentation such as
    `vitexp.augment.RandAugment` or `TrivialAugment`: called as `policy(images, generator)`
    on the cropped float batch in [0, 1], just before normalisation, drawing from the same
    generator.
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
        policy: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
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
        self.policy = policy

    @property
    def random(self) -> bool:
        return self.crop_padding > 0 or self.hflip or self.rrc_scale is not None or self.policy is not None

    def _normalize(self, x: Tensor) -> Tensor:
        # Moved once per device: a host-to-device copy per batch would wait for the GPU.
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        mean, std = self.mean, self.std
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
        if self.rrc_scale is None and tuple(images.shape[-2:]) == self.out_size:
            # Whole-pixel shifts and flips only: one uint8 gather instead of an affine grid and
            # a bilinear grid_sample, with the same draws and the same pixels (4x faster on the CPU).
            x = shift_crop_flip(images, padding=self.crop_padding, hflip=self.hflip, generator=generator)
            x = x.float().div_(255)
        else:
            x = self._affine(images.float().div_(255), generator)
        if self.policy is not None:
            x = self.policy(x, generator)
        return self._normalize(x)

    def _affine(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Crop (padded or random-resized), flip and resize as one affine grid_sample."""
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
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _Loader(abc.ABC):
    """Batches of one split in a fixed order, with the order exposed so that a resumed run
    can replay an epoch from any batch: `new_order()` draws an epoch's order (shuffled for
    training, from `generator` only), `iter_from(order, start)` yields its batches from batch
    `start` on, already on the device and transformed; augmentation draws from
    `augment_generator` (by default the same generator).

    Data-parallel: with `world_size` > 1 every rank draws the same order and takes every
    `world_size`-th entry from position `rank` on. Rank r's batch i then holds the entries of the
    single-process batch i (of `world_size` × the per-rank batch size) that fall on r, so the
    ranks together see exactly the global batches a single process would. Training shards are
    cut to equal length (the same number of steps on every rank); evaluation shards keep every
    sample once, so summed metrics count each exactly once."""

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        transform: BatchTransform,
        train: bool,
        device: torch.device,
        generator: torch.Generator | None = None,
        augment_generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch size {batch_size} must be positive")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.transform = transform
        self.train = train
        self.device = torch.device(device)
        self.generator = generator
        self.augment_generator = augment_generator if augment_generator is not None else generator
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        # Training drops the short last batch so every step sees the same batch size;
        # evaluation keeps it so every sample is scored exactly once.
        if self.train:
            return self.num_samples // self.world_size // self.batch_size
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def new_order(self) -> Tensor:
        if self.train:
            return torch.randperm(self.num_samples, device=self.device, generator=self.generator)
        return torch.arange(self.num_samples, device=self.device)

    def _batch_indices(self, order: Tensor, start: int) -> list[Tensor]:
        shard = order[self.rank :: self.world_size]
        return [shard[i * self.batch_size : (i + 1) * self.batch_size] for i in range(start, len(self))]

    def _finish(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.train:
            return self.transform.train(images, self.augment_generator), labels
        return self.transform.eval(images), labels

    @abc.abstractmethod
    def iter_from(self, order: Tensor, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches `start`, `start + 1`, … of `order`."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(self.new_order())


class DeviceLoader(_Loader):
    """Batches of a `Split` held on the training device: indexing replaces data loading."""

    def __init__(self, split: Split, **kwargs: Any) -> None:
        super().__init__(len(split), device=split.images.device, **kwargs)
        self.split = split

    def iter_from(self, order: Tensor, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in self._batch_indices(order, start):
            # index_select: the generic advanced-indexing kernel is several times slower here.
            yield self._finish(self.split.images.index_select(0, idx), self.split.labels.index_select(0, idx))


class FolderLoader(_Loader):
    """Batches of a `FileSplit`: DataLoader workers decode and resize the files to uint8,
    pinned host memory and non-blocking copies move them, and augmentation runs on the
    device as for in-memory data."""

    def __init__(self, split: FileSplit, *, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(len(split), **kwargs)
        self.split = split
        self.num_workers = num_workers
        self._warned: set[str] = set()

    def iter_from(self, order: Tensor, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        batches = [idx.cpu().tolist() for idx in self._batch_indices(order, start)]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            _DecodedFiles(self.split),
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=_collate_decoded,
            pin_memory=self.device.type == "cuda",
        )
        for images, labels, failures in loader:
            for path, error in failures:
                if self.split.on_error != "skip":
                    raise ConfigError(
                        f"cannot read image {path} ({error}); fix or remove it, or set dataset.on_error=skip"
                    )
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("skipping unreadable image %s (%s)", path, error)
            if len(labels) == 0:
                raise ConfigError(f"a whole batch of images could not be read (e.g. {failures[0][0]})")
            non_blocking = self.device.type == "cuda"
            yield self._finish(
                images.to(self.device, non_blocking=non_blocking),
                labels.to(self.device, non_blocking=non_blocking),
            )


def make_loader(
    split: Split | FileSplit,
    *,
    batch_size: int,
    transform: BatchTransform,
    train: bool,
    device: torch.device,
    generator: torch.Generator | None = None,
    augment_generator: torch.Generator | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DeviceLoader | FolderLoader:
    """The loader that fits the split: in-memory splits move to the device once; file splits
    stream through DataLoader workers. `rank`/`world_size` select a data-parallel shard."""
    common = {
        "batch_size": batch_size,
        "transform": transform,
        "train": train,
        "generator": generator,
        "augment_generator": augment_generator,
        "rank": rank,
        "world_size": world_size,
    }
    if isinstance(split, FileSplit):
        return FolderLoader(split, device=device, num_workers=num_workers, **common)
    return DeviceLoader(split.to(device), **common)
