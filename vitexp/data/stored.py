"""Rebuilding a dataset from the `dataset.load` config stored in a checkpoint.

That config comes from a file, possibly someone else's: handing it to Hydra's `instantiate`
would call whatever its `_target_` names (`pathlib.Path.touch`, `builtins.open` with
`mode: w`). It is built through `vitexp.registry.build_registered` instead, with only the
dataset loaders allowed (under their public and their module paths), plain-data arguments that
the loader takes, and no download: an inspection command must not write into a folder a
stored config names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from vitexp.data.cifar import load_cifar10, load_cifar100
from vitexp.data.datasets import DatasetNotFound, ImageData, load_digits, load_fake
from vitexp.data.folders import load_imagefolder
from vitexp.data.hf import load_hf
from vitexp.data.wds import load_wds
from vitexp.errors import ConfigError, DataError
from vitexp.registry import build_registered


def _registry() -> dict[str, Callable[..., Any]]:
    loaders: dict[str, tuple[str, Callable[..., Any]]] = {
        # A stored `download` is dropped (see `build_stored_dataset`) and this one used.
        "load_cifar10": ("cifar", functools.partial(load_cifar10, download=False)),
        "load_cifar100": ("cifar", functools.partial(load_cifar100, download=False)),
        "load_digits": ("datasets", load_digits),
        "load_fake": ("datasets", load_fake),
        "load_imagefolder": ("folders", load_imagefolder),
        "load_hf": ("hf", load_hf),
        "load_wds": ("wds", load_wds),
    }
    registry = {}
    for name, (module, fn) in loaders.items():
        registry[f"vitexp.data.{name}"] = fn
        registry[f"vitexp.data.{module}.{name}"] = fn
    return registry


STORED_DATASETS: Mapping[str, Callable[..., Any]] = _registry()


def build_stored_dataset(load_cfg: Mapping[str, Any], *, source: str) -> ImageData:
    """The dataset a stored `dataset.load` config describes, built without `instantiate`.

    `source` names where the config came from (e.g. "the dataset of runs/a/last.pt"). A target
    that is not one of vitexp's dataset loaders, an argument the loader does not take, or a
    value that is not plain data is refused with a one-line DataError before anything is
    called. CIFAR is never downloaded here; when a dataset's folder is not where the config
    says, the ConfigError says to name the dataset on the command line instead."""
    try:
        return build_registered(
            load_cfg, STORED_DATASETS, what="dataset.load", source=source, ignore=("download",)
        )
    except DatasetNotFound as e:
        raise ConfigError(
            f"{source}: {e.folder} is not here (its stored config names it, and an inspection command "
            f"never downloads); pass dataset={e.dataset} dataset.root=DIR to name where the data is"
        ) from e
    except (ConfigError, DataError) as e:
        # The registry names the key of a refused value but not always the file it came from,
        # and a loader's message names the setting, not the checkpoint that stored it.
        if source in str(e):
            raise
        kind = ConfigError if isinstance(e, ConfigError) else DataError
        raise kind(f"{source}: {e}") from e
