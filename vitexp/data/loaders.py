"""Batches in a replayable order: in-memory splits indexed on the device, image folders and
indexed datasets decoded by DataLoader workers, shards read as streams (`vitexp.data.streams`);
all sharded over data-parallel ranks."""

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
from vitexp.data.images import decode_deferred
from vitexp.data.streams import StreamBatches, StreamSplit, plan_epoch
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

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold, beyond the epoch's order and step, to replay the epoch
        in progress: nothing for loaders whose batches are cut from the order alone."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a hook, as state_dict)
        """Restore what `state_dict` returned."""


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
        self,
        split: FileSplit,
        *,
        num_workers: int = 0,
        persistent_workers: bool = True,
        decode_on: str = "workers",
        **kwargs: Any,
    ) -> None:
        super().__init__(len(split), **kwargs)
        if num_workers < 0:
            raise ConfigError(f"dataset.num_workers={num_workers} must be 0 or more")
        if decode_on not in DECODE_ON:
            raise ConfigError(f"decode_on={decode_on!r} is not one of {', '.join(DECODE_ON)}")
        # "device": the workers read JPEGs and the training process decodes each batch's on its
        # device (nvJPEG on a GPU); "auto" does so on CUDA devices.
        self.defer_jpegs = decode_on == "device" or (decode_on == "auto" and self.device.type == "cuda")
        self.split = split
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self._warned: set[str] = set()
        self._sampler = _SetBatches()
        self._loader: torch.utils.data.DataLoader | None = None
        self._owner: object | None = None  # the iteration now using self._loader

    def _dataset(self) -> torch.utils.data.Dataset:
        return _DecodedFiles(self.split, self.defer_jpegs)

    # The DataLoader's collate_fn: a function, not a bound method. A DataLoader holding this
    # loader's method holds the loader too: a reference cycle, which only the garbage collector
    # frees, closing the workers' queues before torch's shutdown can tell the workers to stop
    # (it then waits 5 s for each).
    _collate = staticmethod(_collate_decoded)

    def _batches(self, order: Tensor, start: int) -> list[Any]:
        """The batch sampler's entries for batches `start`, ... of `order`: index lists here."""
        # One copy of the order to the host per epoch, not one per batch.
        return [idx.tolist() for idx in self._batch_indices(order.cpu(), start)]

    def _workers_for(self, order: Tensor) -> int:
        """The workers that must serve an epoch of `order`: any number, for files."""
        return self.num_workers

    def _data_loader(
        self, batch_sampler: Any, persistent: bool, num_workers: int | None = None
    ) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self._dataset(),
            batch_sampler=batch_sampler,
            num_workers=self.num_workers if num_workers is None else num_workers,
            collate_fn=self._collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=persistent,
        )

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the loader is collected)."""
        self._loader = None

    def iter_from(self, order: Tensor, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        batches = self._batches(order, start)
        if not batches:
            return
        workers = self._workers_for(order)
        if not self.persistent_workers or self._owner is not None or workers != self.num_workers:
            yield from self._serve(self._data_loader(batches, persistent=False, num_workers=workers))
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

    _skipping = "skipping unreadable image %s (%s)"  # the warning for an item skipped

    def _failure(self, where: str, error: str) -> str:
        return f"cannot read image {where} ({error}); fix or remove it, or set dataset.on_error=skip"

    def _decode_deferred(self, images: list, labels: Tensor) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
        """A batch whose JPEGs the workers left encoded, decoded on the training device."""
        decoded, failures = decode_deferred(
            images, self.split.in_channels, self.split.image_size, self.device
        )
        keep = [i for i, image in enumerate(decoded) if image is not None]
        good = [image for image in decoded if image is not None]
        if not good:
            return torch.empty(0, dtype=torch.uint8, device=self.device), labels[:0], failures
        return torch.stack(good), labels[torch.tensor(keep, dtype=torch.long)], failures

    def _serve(self, loader: torch.utils.data.DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        batches = iter(loader)
        try:
            for images, labels, failures in batches:
                if isinstance(images, list):
                    images, labels, late = self._decode_deferred(images, labels)
                    failures = [*failures, *late]
                for path, error in failures:
                    if self.split.on_error != "skip":
                        raise DataError(self._failure(path, error))
                    if path not in self._warned:
                        self._warned.add(path)
                        log.warning(self._skipping, path, error)
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
        except Exception:
            # A failed iteration stops its workers now. Held by the error's traceback (this
            # frame's), they would be stopped by the garbage collector, which closes their queues
            # before torch's shutdown can tell them to stop: it then waits 5 s for each.
            if loader is self._loader:
                self.close()
            del batches, loader
            raise


DECODE_ON = ("workers", "device", "auto")


def _single(items: list) -> Any:
    return items[0]


class StreamLoader(FolderLoader):
    """Batches of a `StreamSplit`, planned per epoch by `vitexp.data.streams.plan_epoch`:
    `new_order()` draws the epoch's shard order and shuffle seed, and each DataLoader worker
    reads one slot of the plan from start to end (the workers are kept alive across epochs
    as for image folders). The epoch's seed and slot count are the loader's state
    (`state_dict`), so that a resumed run finishes the epoch with the same batches even when
    it was started with another `dataset.num_workers`."""

    split: StreamSplit

    def __init__(self, split: StreamSplit, **kwargs: Any) -> None:
        super().__init__(split, **kwargs)
        self.slots = max(1, self.num_workers)
        self._epoch: dict[str, Any] = {}  # the epoch drawn last: its order, seed and slots

    def new_order(self) -> Tensor:
        shards = len(self.split.shards)
        if not self.train:
            return torch.arange(shards)
        order = torch.randperm(shards, generator=self.generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self._epoch = {"order": order.clone(), "seed": seed, "slots": self.slots}
        return order

    def _plan_of(self, order: Tensor) -> tuple[list[int], int | None, int]:
        """(shard order, shuffle seed, slots) of the epoch of `order`: the drawn epoch's own
        seed and slots, else (an order given by hand) seed 0 and this loader's slots."""
        shards = order.cpu().tolist()
        if not self.train:
            return shards, None, self.slots
        epoch = self._epoch
        if epoch and epoch["order"].tolist() == shards:
            return shards, int(epoch["seed"]), int(epoch["slots"])
        return shards, 0, self.slots

    def _batches(self, order: Tensor, start: int) -> list[Any]:
        shards, seed, slots = self._plan_of(order)
        tasks = plan_epoch(
            self.split, shards, seed=seed, slots=slots, batch_size=self.batch_size, rank=self.rank,
            world_size=self.world_size, train=self.train,
        )  # fmt: skip
        # A DataLoader's workers take turns: batch start + i goes to worker i mod slots, which so
        # reads one slot, (start + worker) mod slots, from batch to batch.
        return [[task] for task in tasks[start:]]

    def _workers_for(self, order: Tensor) -> int:
        _, _, slots = self._plan_of(order)
        return self.num_workers if slots == self.slots else slots

    def _dataset(self) -> torch.utils.data.Dataset:
        return StreamBatches(self.split, self.defer_jpegs)

    _collate = staticmethod(_single)

    _skipping = "skipping %s (%s)"

    def _failure(self, where: str, error: str) -> str:
        return f"{where}: {error}; fix or replace the shard, or set dataset.on_error=skip"

    def state_dict(self) -> dict[str, Any]:
        return dict(self._epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._epoch = {"order": torch.as_tensor(state["order"]).cpu(), "seed": int(state["seed"]),
                           "slots": int(state["slots"])}  # fmt: skip


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
    decode_on: str = "workers",
) -> DeviceLoader | FolderLoader:
    """The loader that fits the split: in-memory splits move to the device once; file splits
    (and indexed datasets) are decoded by DataLoader workers (kept alive across epochs with
    `persistent_workers`); stream splits are read in planned slots by the same workers.
    `rank`/`world_size` select a data-parallel shard. `decode_on="device"` (or "auto" on a CUDA
    device) has the workers leave JPEGs encoded and decodes each batch's on the training device
    (`vitexp.data.images.decode_deferred`); "workers" (the default) decodes everything there."""
    common = {
        "batch_size": batch_size,
        "transform": transform,
        "train": train,
        "generator": generator,
        "augment_generator": augment_generator,
        "rank": rank,
        "world_size": world_size,
    }
    if isinstance(split, StreamSplit):
        return StreamLoader(
            split, device=device, num_workers=num_workers, persistent_workers=persistent_workers,
            decode_on=decode_on, **common,
        )  # fmt: skip
    if isinstance(split, FileSplit):
        return FolderLoader(
            split, device=device, num_workers=num_workers, persistent_workers=persistent_workers,
            decode_on=decode_on, **common,
        )  # fmt: skip
    return DeviceLoader(split.to(device), **common)
