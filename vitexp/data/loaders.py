"""Batches in a replayable order: in-memory splits indexed on the device, image folders
streamed through DataLoader workers; both sharded over data-parallel ranks."""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vitexp.data.datasets import FileSplit, Split
from vitexp.data.folders import _collate_decoded, _DecodedFiles
from vitexp.data.transforms import BatchTransform
from vitexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
            # Drawn where the generator is (the CPU, in training), then moved once per epoch.
            generator_device = self.generator.device if self.generator is not None else "cpu"
            order = torch.randperm(self.num_samples, device=generator_device, generator=self.generator)
            return order.to(self.device)
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

    def close(self) -> None:  # noqa: B027 (a hook: most loaders hold nothing to release)
        """Release what the loader holds beyond its split (worker processes); nothing here."""


class DeviceLoader(_Loader):
    """Batches of a `Split` held on the training device: indexing replaces data loading."""

    def __init__(self, split: Split, **kwargs: Any) -> None:
        super().__init__(len(split), device=split.images.device, **kwargs)
        self.split = split

    def iter_from(self, order: Tensor, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in self._batch_indices(order, start):
            # index_select: the generic advanced-indexing kernel is several times slower here.
            yield self._finish(self.split.images.index_select(0, idx), self.split.labels.index_select(0, idx))


class _SetBatches(torch.utils.data.Sampler):
    """The batch sampler of a persistent DataLoader: the batches of the coming epoch are set
    before each iteration, since the order changes every epoch (and on resume)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader(_Loader):
    """Batches of a `FileSplit`: DataLoader workers decode the files with
    `vitexp.data.images.load_image` to uint8 at the split's size, pinned host memory and
    non-blocking copies move them, and augmentation runs on the device as for in-memory data.

    With `persistent_workers` (the default) and `num_workers` > 0, one DataLoader and its
    worker processes live as long as the loader and serve every epoch: each `iter_from` sets
    that epoch's batches before iterating. The workers only decode (no randomness), so which
    process decodes a file changes nothing and a resumed run sees the same batches. An
    iteration started while another is still open gets a DataLoader of its own."""

    def __init__(
        self, split: FileSplit, *, num_workers: int = 0, persistent_workers: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(len(split), **kwargs)
        if num_workers < 0:
            raise ConfigError(f"dataset.num_workers={num_workers} must be 0 or more")
        self.split = split
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self._warned: set[str] = set()
        self._sampler = _SetBatches()
        self._loader: torch.utils.data.DataLoader | None = None
        self._owner: object | None = None  # the iteration now using self._loader

    def _data_loader(self, batch_sampler: Any, persistent: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            _DecodedFiles(self.split),
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            collate_fn=_collate_decoded,
            pin_memory=self.device.type == "cuda",
            persistent_workers=persistent,
        )

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the loader is collected)."""
        self._loader = None

    def iter_from(self, order: Tensor, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        # One copy of the order to the host per epoch, not one per batch.
        batches = [idx.tolist() for idx in self._batch_indices(order.cpu(), start)]
        if not batches:
            return
        if not self.persistent_workers or self._owner is not None:
            yield from self._serve(self._data_loader(batches, persistent=False))
            return
        # An abandoned iteration releases the DataLoader when it is closed (collected), and
        # only if no later one has taken it since.
        self._owner = token = object()
        try:
            if self._loader is None:
                self._loader = self._data_loader(self._sampler, persistent=True)
            # Read by the DataLoader when the iteration starts (iter() below), not later.
            self._sampler.batches = batches
            yield from self._serve(self._loader)
        finally:
            if self._owner is token:
                self._owner = None

    def _serve(self, loader: torch.utils.data.DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, failures in loader:
            for path, error in failures:
                if self.split.on_error != "skip":
                    raise DataError(
                        f"cannot read image {path} ({error}); fix or remove it, or set dataset.on_error=skip"
                    )
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("skipping unreadable image %s (%s)", path, error)
            if len(labels) == 0:
                path, error = failures[0]
                raise DataError(
                    f"no image of a whole batch could be read (e.g. {path}: {error}); fix or remove them"
                )
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
    persistent_workers: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DeviceLoader | FolderLoader:
    """The loader that fits the split: in-memory splits move to the device once; file splits
    stream through DataLoader workers (kept alive across epochs with `persistent_workers`).
    `rank`/`world_size` select a data-parallel shard."""
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
        return FolderLoader(
            split, device=device, num_workers=num_workers, persistent_workers=persistent_workers, **common
        )
    return DeviceLoader(split.to(device), **common)
