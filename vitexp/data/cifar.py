"""CIFAR-10 and CIFAR-100 from the python-version batches, unpickled with an allow-list of
numpy types so that a tampered file cannot run code."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitexp.data.datasets import ImageData, Split
from vitexp.errors import ConfigError

log = logging.getLogger(__name__)

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
