"""CIFAR-10 and CIFAR-100 from the python-version batches, unpickled with an allow-list of
numpy types so that a tampered file cannot run code.

A folder that is not there is a setting to change (`dataset.root`, or `dataset.download`):
ConfigError. A folder that is there but lacks a file, or holds a truncated, corrupt or
code-running one, is unusable data: DataError naming the file.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitexp.data.datasets import DatasetNotFound, ImageData, Split, check_labels
from vitexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


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
        raise _RefusedGlobal(f"{module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise DataError(
            f"{path} is not a plain CIFAR batch: it asks to load {e}, which could run code; refused "
            f"without loading it. Replace the file with the original"
        ) from e
    except OSError as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e.strerror or e})") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        # What unpickling a cut-off or overwritten file raises.
        raise DataError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]}); delete it and download "
            f"it again"
        ) from e
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (it holds a {type(batch).__name__}); replace the file")
    return batch


def _read_cifar_batches(folder: Path, files: Sequence[str], label_key: str, num_classes: int) -> Split:
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{path} is truncated or corrupt (no 'data' or '{label_key}'); replace it")
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            targets = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        except (ValueError, TypeError, OverflowError) as e:  # the file's values, not our code
            raise DataError(
                f"{path} is truncated or corrupt (bad 'data' or '{label_key}': {str(e)[:80]}); replace it"
            ) from e
        split_labels = torch.from_numpy(targets)
        check_labels(split_labels, len(data), num_classes, str(path))
        images.append(data)
        labels.append(split_labels)
    return Split(torch.from_numpy(np.concatenate(images)), torch.cat(labels))


def _class_names(meta: Path, key: str, num_classes: int) -> list[str]:
    """The class names from the meta file, or "0", "1", ... when the folder has none."""
    if not meta.is_file():
        return [str(i) for i in range(num_classes)]
    names = _unpickle(meta).get(key)
    if not isinstance(names, list | tuple) or len(names) != num_classes:
        raise DataError(f"{meta} is corrupt: '{key}' is not a list of {num_classes} class names; replace it")
    return [str(c) for c in names]


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
        raise DatasetNotFound(
            f"{variant} not found: expected {folder}/; set dataset.root to the folder that contains "
            f"{tv_cls.base_folder}/, or dataset.download=true to fetch it",
            dataset=variant,
            folder=folder,
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


def _require(folder: Path, names: Sequence[str], variant: str) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}; download {variant} again")


def load_cifar10(root: str | Path, download: bool = True) -> ImageData:
    """CIFAR-10 from the standard python-version batches under `root/cifar-10-batches-py`."""
    folder = _ensure_cifar(root, variant="cifar10", download=download)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    _require(folder, [*train, "test_batch"], "CIFAR-10")
    return ImageData(
        train=_read_cifar_batches(folder, train, "labels", 10),
        test=_read_cifar_batches(folder, ["test_batch"], "labels", 10),
        classes=_class_names(folder / "batches.meta", "label_names", 10),
    )


def load_cifar100(root: str | Path, download: bool = True) -> ImageData:
    """CIFAR-100 (fine labels) from the python-version files under `root/cifar-100-python`."""
    folder = _ensure_cifar(root, variant="cifar100", download=download)
    _require(folder, ["train", "test"], "CIFAR-100")
    return ImageData(
        train=_read_cifar_batches(folder, ["train"], "fine_labels", 100),
        test=_read_cifar_batches(folder, ["test"], "fine_labels", 100),
        classes=_class_names(folder / "meta", "fine_label_names", 100),
    )
