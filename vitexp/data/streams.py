"""Datasets read as streams from shards: WebDataset tar files (`vitexp.data.wds`) and Hugging
Face datasets opened with `streaming=true` (`vitexp.data.hf`). A shard can only be read from
its start, so an epoch is planned over samples in shard order rather than drawn as a
permutation of indices.

The plan of an epoch (`plan_epoch`), for rank r of N processes with W loader workers and
batches of B:

- the epoch's sequence is the shards in a shuffled order (drawn from the data generator, like
  the in-memory order), their samples in stored order, one after the other (S samples);
- rank r takes one contiguous span of it: S // N samples each for training (the last S mod N
  are left for this epoch; the next epoch's shard order leaves others), and for evaluation
  S // N plus one for the first S mod N ranks, so every test sample is scored exactly once;
- the span is cut into batches of B (training drops the short last one, as the in-memory path
  does), and the batches are dealt to W reader slots in contiguous blocks: slot o reads one
  contiguous stretch of the span, so a shard is opened by at most two slots, the second
  skipping (reading, not decoding) the samples before its part;
- batch j of the rank is local batch j // W of slot j mod W, which is the order in which a
  DataLoader's workers take turns, so worker o reads slot o from start to end;
- training shuffles within each slot in windows of `shuffle_buffer` consecutive samples, each
  window permuted by a generator seeded with the epoch's seed and the window's position.

Every sample of an epoch is therefore read by exactly one (rank, worker); what cannot be split
evenly (S mod N samples, and each rank's short last batch) is left out of that epoch's
training, never read twice. A batch is a pure function of (shard order, epoch seed, N, W, B,
batch index), so resuming needs only those: the loader's `state_dict()` holds the seed and W of
the epoch in progress, the loop's checkpoint the order and the step; a resumed worker skips to
the start of its window and replays it. Unreadable samples (a missing shard, a sample without
its label, a corrupt image) follow `dataset.on_error`: `fail` stops naming the shard and the
sample, `skip` leaves them out of their batch with one warning each.

The counts are checked as the shards are read: a shard that ends before its count gives error
samples for what is missing, and a reader that reaches a shard's counted end reads on to make
sure nothing follows; a shard that holds more turns its last counted sample into an error
naming both counts (and the shard index to write again), so that no sample goes unread
silently. Every evaluation reads every test shard to its end, so a stale index of the test
shards stops the first evaluation.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitexp.data.datasets import FileSplit
from vitexp.data.images import Encoded, UnreadableImage, defer_or_load, load_image_bytes
from vitexp.errors import ConfigError, DataError


@dataclass(frozen=True)
class Shard:
    """One shard: where it is (a path or URL, or a name for a dataset's part) and how many
    samples it holds."""

    url: str
    samples: int


@dataclass
class RawSample:
    """One sample as a shard stores it, not yet decoded: `where` names it in messages."""

    where: str
    image: bytes | None = None
    label: int | None = None
    error: str | None = None  # why it cannot be used (no label, no image, shard unreadable)
    bad_label: bool = False  # the error is a label of the wrong kind


class ShardUnavailable(Exception):
    """A shard that cannot be opened or read on; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ShardReader(abc.ABC):
    """Reads one shard's samples in stored order. Picklable: every DataLoader worker gets a
    copy. Raises ShardUnavailable when the shard cannot be opened or read on."""

    @abc.abstractmethod
    def samples(self, shard: Shard) -> Iterator[RawSample]: ...


class StreamSplit(FileSplit):
    """A split read from shards in order (see the module docstring). Labels are checked as
    samples are read (against the classes `ImageData` gives it); `paths` are the shards."""

    def __init__(
        self,
        shards: Sequence[Shard],
        reader: ShardReader,
        *,
        image_size: Sequence[int],
        in_channels: int = 3,
        on_error: str = "fail",
        shuffle_buffer: int = 0,
        source: str = "the shards",
        index: str | None = None,
    ) -> None:
        size = (int(image_size[0]), int(image_size[1]))
        super().__init__(
            [s.url for s in shards], torch.empty(0, dtype=torch.long), size, in_channels, on_error
        )
        self.shards = list(shards)
        self.reader = reader
        self.shuffle_buffer = int(shuffle_buffer)
        self.source = source
        self.index = index  # the shard index the counts come from; None: counted at start-up
        self.num_classes: int | None = None  # set by `check`, when ImageData is made

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def check(self, num_classes: int, where: str) -> None:
        if not self.shards or len(self) == 0:
            raise DataError(f"{where}: {self.source} hold no samples")
        self.num_classes = num_classes

    def subset(self, idx: Tensor) -> FileSplit:
        raise ConfigError(
            "dataset.val_split: a streamed dataset cannot hold out a random part of its training samples; "
            "set dataset.val_split=0 and evaluate on its test shards"
        )

    def load(self, index: int) -> Tensor:
        raise ConfigError(
            f"{self.source} are read in order, not by index; give image=FILE instead of index=N"
        )

    def decode(
        self, raw: RawSample, defer_jpegs: bool = False
    ) -> tuple[Tensor | Encoded | None, int, str, str | None]:
        """(image, label, where, None), or (None, -1, where, why) for an unusable sample; with
        `defer_jpegs` a JPEG stays `Encoded` for the training device."""
        if raw.error is not None:
            return None, -1, raw.where, raw.error
        if raw.image is None or raw.label is None:
            missing = "image" if raw.image is None else "label"
            return None, -1, raw.where, f"it has no {missing}"
        if self.num_classes is not None and not 0 <= raw.label < self.num_classes:
            return None, -1, raw.where, f"its label {raw.label} is outside the {self.num_classes} classes"
        try:
            if defer_jpegs:
                return (
                    defer_or_load(raw.image, self.in_channels, self.image_size, raw.where),
                    raw.label,
                    raw.where,
                    None,
                )
            image = load_image_bytes(raw.image, self.in_channels, self.image_size, raw.where)
        except UnreadableImage as e:
            return None, -1, raw.where, e.reason
        return image, raw.label, raw.where, None

    def head(self, count: int) -> tuple[Tensor, Tensor]:
        """The first `count` usable samples in stored order (for a figure), decoded at the
        split's size, and their labels."""
        images: list[Tensor] = []
        labels: list[int] = []
        for index in range(len(self.shards)):
            for raw in read_segment(self, index, 0, self.shards[index].samples):
                image, label, _, _ = self.decode(raw)
                if isinstance(image, Tensor):
                    images.append(image)
                    labels.append(label)
                if len(images) == count:
                    return torch.stack(images), torch.tensor(labels)
        if not images:
            raise DataError(f"no sample of {self.source} can be read")
        return torch.stack(images), torch.tensor(labels)


# --------------------------------------------------------------------------- the plan


def rank_span(total: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """[start, stop) of the epoch's sequence that `rank` reads: equal spans for training (the
    last total mod world_size samples are left out), all samples for evaluation."""
    if train:
        share = total // world_size
        return rank * share, (rank + 1) * share
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class SlotTask:
    """One batch for a reader slot: local batch `batch` of the slot that reads `length`
    samples from position `start` of the epoch's sequence, found in `segments` (shard index,
    samples to skip in it, samples to take). `key` identifies the epoch and slot, so a worker
    can tell whether it is already positioned there. `seed` None: no shuffle."""

    key: tuple[int, int]
    batch: int
    batch_size: int
    start: int
    length: int
    segments: tuple[tuple[int, int, int], ...]
    window: int
    seed: int | None


def _segments(counts: Sequence[tuple[int, int]], start: int, stop: int) -> tuple[tuple[int, int, int], ...]:
    """The parts of shards (index, skip, take) that positions [start, stop) cover, `counts`
    being (shard index, samples) in the epoch's order."""
    out, offset = [], 0
    for index, samples in counts:
        lo, hi = max(start, offset), min(stop, offset + samples)
        if lo < hi:
            out.append((index, lo - offset, hi - lo))
        offset += samples
        if offset >= stop:
            break
    return tuple(out)


def plan_epoch(
    split: StreamSplit,
    order: Sequence[int],
    *,
    seed: int | None,
    slots: int,
    batch_size: int,
    rank: int,
    world_size: int,
    train: bool,
) -> list[SlotTask]:
    """The batches of one epoch for `rank`, in the order the loader yields them (see the
    module docstring)."""
    counts = [(i, split.shards[i].samples) for i in order]
    total = sum(samples for _, samples in counts)
    start, stop = rank_span(total, rank, world_size, train)
    span = stop - start
    batches = span // batch_size if train else math.ceil(span / batch_size)
    per_slot = [batches // slots + (o < batches % slots) for o in range(slots)]
    epoch_key = int(np.random.SeedSequence([seed or 0, *order]).generate_state(1)[0])
    slot_tasks: list[list[SlotTask]] = []
    offset = start
    for count in per_slot:
        length = min(count * batch_size, stop - offset)
        segments = _segments(counts, offset, offset + length)
        slot_tasks.append(
            [
                SlotTask(
                    (epoch_key, offset), k, batch_size, offset, length, segments, split.shuffle_buffer, seed
                )
                for k in range(count)
            ]
        )
        offset += length
    return [slot_tasks[j % slots][j // slots] for j in range(batches)]


# --------------------------------------------------------------------------- reading


def _miscount(split: StreamSplit, shard: Shard, held: int) -> str:
    """Why a shard's sample count is wrong, and what to do, for a sample's error."""
    if split.index is None:
        return f"it holds {held} samples, not the {shard.samples} counted at start-up (it changed since)"
    return (
        f"it holds {held} samples, not the {shard.samples} that its index {split.index} lists; write the "
        f"index again (python -m vitexp.shards writes shards with theirs) or correct its nsamples"
    )


def read_segment(split: StreamSplit, index: int, skip: int, take: int) -> Iterator[RawSample]:
    """`take` raw samples of shard `index` after its first `skip` (read, not decoded). A shard
    that cannot be read, or ends early, gives error samples for what is missing, so that
    positions (and so the plan) never shift. A segment that ends where the shard should reads
    on to its end: if more samples follow, its last sample becomes an error naming both counts
    (one sample is held back to make that possible)."""
    shard = split.shards[index]
    to_end = skip + take == shard.samples
    got, reason, last = 0, None, None
    samples = split.reader.samples(shard)
    try:
        for i, raw in enumerate(samples):
            if i < skip:
                continue
            if got == take:  # past the counted end: count the rest, in this rare case only
                held = skip + got + 1 + sum(1 for _ in samples)
                last = RawSample(where=shard.url, error=_miscount(split, shard, held))
                break
            if last is not None:
                yield last
            last, got = raw, got + 1
            if got == take and not to_end:
                break
        if got < take:
            reason = _miscount(split, shard, skip + got)
    except ShardUnavailable as e:
        reason = e.reason
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
    if last is not None:
        yield last
    for _ in range(take - got):
        yield RawSample(where=shard.url, error=reason)


def _raw_stream(split: StreamSplit, task: SlotTask, position: int) -> Iterator[RawSample]:
    """The slot's raw samples from slot position `position` on."""
    offset = 0
    for index, skip, take in task.segments:
        if position < offset + take:
            inner = max(0, position - offset)
            yield from read_segment(split, index, skip + inner, take - inner)
        offset += take


class _Cursor:
    """A worker's place in one slot: the raw stream, and the shuffled window being emitted."""

    def __init__(self, split: StreamSplit, task: SlotTask) -> None:
        self.split, self.task = split, task
        self.key, self.next_batch = task.key, task.batch
        shuffle = task.seed is not None and task.window > 1
        self.window = task.window if shuffle else max(1, task.batch_size)
        position = task.batch * task.batch_size
        first = position // self.window * self.window
        self.window_start = first  # slot position of the next window to read
        self.raw = _raw_stream(split, task, first)
        self.pending: list[RawSample] = []
        self._take(position - first)

    def _fill(self) -> None:
        task = self.task
        size = min(self.window, task.length - self.window_start)
        window = [next(self.raw) for _ in range(size)]
        if task.seed is not None and task.window > 1:
            rng = np.random.default_rng(np.random.SeedSequence([task.seed, task.start + self.window_start]))
            window = [window[i] for i in rng.permutation(len(window))]
        self.window_start += size
        self.pending = window[::-1]  # popped from the end

    def _take(self, count: int) -> list[RawSample]:
        out: list[RawSample] = []
        while len(out) < count:
            if not self.pending:
                if self.window_start >= self.task.length:
                    break
                self._fill()
            out.append(self.pending.pop())
        return out

    def batch(self) -> list[RawSample]:
        self.next_batch += 1
        return self._take(self.task.batch_size)


class StreamBatches(torch.utils.data.Dataset):
    """What a DataLoader worker runs: `dataset[task]` is one decoded batch (images, labels,
    failures) of a `SlotTask`, read on from where the worker's last task left off when it is
    the next batch of the same slot (the usual case), else from the start of its window."""

    def __init__(self, split: StreamSplit, defer_jpegs: bool = False) -> None:
        self.split = split
        self.defer_jpegs = defer_jpegs
        self._cursor: _Cursor | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, task: Any) -> tuple[Tensor | list, Tensor, list[tuple[str, str]]]:
        from vitexp.data.folders import _collate_decoded

        cursor = self._cursor
        if cursor is None or cursor.key != task.key or cursor.next_batch != task.batch:
            cursor = self._cursor = _Cursor(self.split, task)
        return _collate_decoded([self.split.decode(raw, self.defer_jpegs) for raw in cursor.batch()])
