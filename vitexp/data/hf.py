"""Hugging Face datasets, through the `datasets` library and its cache (so `HF_DATASETS_OFFLINE=1`
reads what is cached and never the network): a Hub name (`ORG/NAME`), a `save_to_disk` folder,
or a folder of parquet (or other data) files that `datasets.load_dataset` reads.

Three ways to read one, the same pixels in each (every image goes through the one decoder,
`vitexp.data.images`, from its stored bytes):

- in memory (`in_memory: true`, or by default when the decoded uint8 images fit in a quarter of
  the machine's memory): every image decoded once at `image_size` into a `Split`, the fast path
  of CIFAR (batches indexed on the device);
- by index (`in_memory: false`): an `HFSplit`, whose rows DataLoader workers read and decode
  by index from the memory-mapped Arrow files, in the same order machinery as image folders;
- as a stream (`streaming: true`): the dataset's shards (its data files) read in order, planned
  over ranks and workers like WebDataset shards (`vitexp.data.streams`). The plan needs each
  shard's row count, so each shard's label column is read through once at start-up.

The image column defaults to the first `Image` feature, the label column to the first
`ClassLabel` feature, whose names are the class names; `classes` names them otherwise. Labels
must be class indices (integers; whole floats pass) or class names that `classes` lists
(`LabelColumn`): the whole label column is read and checked at load, in the main process (for
a stream, while its shards are counted), and anything else stops there in one line naming the
dataset, the column and the setting to change. A data file `datasets` cannot read (data files
whose columns differ, say) is one line too, not its page of schemas (`_datasets_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitexp.data.datasets import FileSplit, ImageData, Split, check_labels
from vitexp.data.images import UnreadableImage, load_image_bytes
from vitexp.data.streams import RawSample, Shard, ShardReader, ShardUnavailable, StreamSplit
from vitexp.errors import ConfigError, DataError, VitexpError

log = logging.getLogger(__name__)


class LabelColumn:
    """A label column's values as class indices: integers as they are, whole floats (a column
    with gaps read as float) as integers, names through `names` (`dataset.classes`). Anything
    else is a one-line error naming the dataset, the column and the fix. Picklable, for the
    readers of a stream."""

    def __init__(self, column: str, names: Sequence[str] | None) -> None:
        self.column = column
        self.lookup = {str(n): i for i, n in enumerate(names)} if names is not None else None

    def indices(self, values: Sequence[Any], where: str, first_row: int = 0) -> list[int]:
        """The class index of each value of rows `first_row`, ... of `where` (a split or a shard)."""
        out = []
        for row, value in enumerate(values, first_row):
            if isinstance(value, str):
                out.append(self._name(value, values, where, row))
            elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                out.append(int(value))
            else:
                raise ConfigError(
                    f"{where}: the label {value!r} of row {row} in column {self.column!r} is not a class "
                    f"index (an integer) or name; set dataset.label_column to the column of class labels"
                )
        return out

    def _name(self, value: str, values: Sequence[Any], where: str, row: int) -> int:
        if self.lookup is None:
            seen = sorted({v for v in values if isinstance(v, str)})
            shown = ",".join(seen[:10]) + (",..." if len(seen) > 10 else "")
            raise ConfigError(
                f"{where}: column {self.column!r} holds class names ({value!r} in row {row}), not class "
                f"indices; set dataset.classes=[{shown}] (all of them, in class order) to map them, or "
                f"dataset.label_column to a column of integer labels"
            )
        if value not in self.lookup:
            raise DataError(
                f"{where}: the label {value!r} of row {row} in column {self.column!r} is not one of "
                f"dataset.classes ({', '.join(list(self.lookup)[:10])}); add it there or fix the row"
            )
        return self.lookup[value]


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _datasets_reason(error: BaseException, records: list[logging.LogRecord]) -> str:
    """What went wrong in a `datasets` failure, in a few words: the data file it names in its
    log and its CastError's summary, else the first line of the error and of its cause."""
    from datasets.table import CastError

    chain = [error, error.__cause__ or error.__context__]
    cast = next((e for e in chain if isinstance(e, CastError)), None)
    files = [re.match(r"Failed to read file '([^']+)'", r.getMessage()) for r in records]
    named = next((m[1] for m in files if m), None)
    if cast is not None:
        if set(cast.table_column_names) != set(cast.requested_column_names):
            detail = cast.details()
        else:
            detail = " ".join(str(cast).split("\n")[-1:])
        return (
            f"{named or 'a data file'} does not match the columns and types of the files before it "
            f"({detail}); give every data file of a split the same columns and types"
        )
    lines = [
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for e in chain if e is not None
    ]
    return (f"{named}: " if named else "") + "; ".join(dict.fromkeys(lines)) + "; check its data files"


def _datasets_failures() -> tuple[type[Exception], ...]:
    """What `datasets` raises for data it cannot read."""
    import datasets
    from datasets.table import CastError

    return datasets.exceptions.DatasetBuildError, CastError


@contextlib.contextmanager
def _datasets_errors(what: str) -> Iterator[None]:
    """While `datasets` builds or reads a dataset: a failure to read its data becomes one
    DataError line naming `what` and the file, instead of the page of schemas that `datasets`
    logs (at ERROR, through its own handler and the root logger) before raising, or its
    multi-line CastError. Its log records are held meanwhile and shown as usual unless the
    failure is the one reported. Never around a `yield`: the logger is the process's."""
    root = logging.getLogger("datasets")
    held = _Held()
    saved = root.handlers[:], root.propagate
    root.handlers, root.propagate = [held], False
    reported = False
    try:
        yield
    except _datasets_failures() as e:
        reported = True
        raise DataError(f"{what} cannot be read by datasets: {_datasets_reason(e, held.records)}") from e
    finally:
        root.handlers, root.propagate = saved
        if not reported:
            for record in held.records:
                logging.getLogger(record.name).handle(record)


def _image_bytes(value: Any, where: str) -> bytes:
    """The encoded image of a cell: an undecoded `Image` feature ({bytes, path}) or raw bytes."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes()
            except OSError as e:
                raise UnreadableImage(
                    where, f"its file {value['path']} cannot be read ({e.strerror or e})"
                ) from e
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise UnreadableImage(where, f"the cell holds {type(value).__name__}, not an encoded image")


class HFSplit(FileSplit):
    """Rows of a map-style Hugging Face dataset, decoded by index while training. `rows` holds
    only the image column, undecoded; pickling it for a worker passes the Arrow files' paths
    (memory-mapped), not the data."""

    def __init__(
        self,
        rows: Any,
        image_column: str,
        labels: Tensor,
        image_size: tuple[int, int],
        in_channels: int,
        on_error: str,
        name: str,
    ) -> None:
        super().__init__([], labels, image_size, in_channels, on_error)
        self.rows, self.image_column, self.name = rows, image_column, name

    def where(self, index: int) -> str:
        return f"{self.name} row {index}"

    def read(self, index: int) -> bytes:
        return _image_bytes(self.rows[index][self.image_column], self.where(index))

    def load(self, index: int) -> Tensor:
        return load_image_bytes(self.read(index), self.in_channels, self.image_size, self.where(index))

    def check(self, num_classes: int, where: str) -> None:
        check_labels(self.labels, len(self.rows), num_classes, where)

    def subset(self, idx: Tensor) -> HFSplit:
        return HFSplit(
            self.rows.select(idx.tolist()), self.image_column, self.labels[idx], self.image_size,
            self.in_channels, self.on_error, self.name,
        )  # fmt: skip


class HFStreamReader(ShardReader):
    """The rows of one shard of a streamed (`IterableDataset`) Hugging Face dataset."""

    def __init__(self, stream: Any, image_column: str, labels: LabelColumn, name: str) -> None:
        self.stream, self.image_column, self.labels, self.name = stream, image_column, labels, name
        self.label_column = labels.column

    def shard_url(self, index: int) -> str:
        return f"{self.name} shard {index}"

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        part = self.stream.shard(num_shards=self.stream.num_shards, index=int(shard.url.rsplit(" ", 1)[1]))
        row = 0
        try:
            # `iter`, not `for row in part`: inside a DataLoader worker a datasets IterableDataset
            # would keep only the shards it assigns to that worker.
            for batch in part.iter(batch_size=64):
                for cell, label in zip(batch[self.image_column], batch[self.label_column], strict=True):
                    yield self._sample(cell, label, shard.url, row)
                    row += 1
        except OSError as e:  # the network or a file, while streaming
            raise ShardUnavailable(f"it cannot be read on ({type(e).__name__}: {e})") from e
        except _datasets_failures() as e:  # the counting at start-up read the same files
            raise ShardUnavailable(f"it cannot be read on ({_datasets_reason(e, [])})") from e

    def _sample(self, cell: Any, label: Any, url: str, row: int) -> RawSample:
        where = f"{url} row {row}"
        try:
            return RawSample(
                where, image=_image_bytes(cell, where), label=self.labels.indices([label], url, row)[0]
            )
        except UnreadableImage as e:
            return RawSample(where, error=e.reason)
        except VitexpError as e:  # a label: checked at start-up, so the data changed since
            return RawSample(where, error=str(e))


# --------------------------------------------------------------------------- opening


def _open(path: str, streaming: bool) -> Any:
    """The DatasetDict (or IterableDatasetDict) that `path` names."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            saved = datasets.load_from_disk(str(local))
            if not isinstance(saved, datasets.DatasetDict):
                raise ConfigError(
                    f"dataset.path={path} holds one saved split, not a DatasetDict; save a DatasetDict with "
                    f"the train and test splits"
                )
            return saved
        if local.is_file():
            raise ConfigError(f"dataset.path={path} is a file; give a dataset folder or a Hub name ORG/NAME")
        with _datasets_errors(f"dataset.path={path}"):
            return datasets.load_dataset(str(local) if local.is_dir() else path, streaming=streaming)
    except (datasets.exceptions.DatasetNotFoundError, ConnectionError, FileNotFoundError) as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        where = "in the Hugging Face cache (offline)" if offline else "on the Hub or in its cache"
        raise ConfigError(
            f"dataset.path={path} is neither a local dataset folder nor a dataset {where}; check the name "
            f"or the folder"
        ) from e


def _column(
    features: Any, given: str | None, kind: str, setting: str, fallbacks: Sequence[str], where: str
) -> str:
    import datasets

    names = list(features or {})
    if given is not None:
        if given not in names:
            raise ConfigError(
                f"{setting}={given!r} is not a column of {where} (its columns: {', '.join(names)})"
            )
        return given
    wanted = datasets.Image if kind == "image" else datasets.ClassLabel
    found = [n for n in names if isinstance(features[n], wanted)] + [n for n in fallbacks if n in names]
    if not found:
        raise ConfigError(
            f"{where} has no {kind} column that vitexp recognises; set {setting} "
            f"(its columns: {', '.join(names)})"
        )
    return found[0]


def _decoded_size(rows: int, channels: int, size: tuple[int, int]) -> int:
    return rows * channels * size[0] * size[1]


def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GiB
        return 8 << 30


def _in_memory(rows: Any, image_column: str, labels: Tensor, size: tuple[int, int], channels: int,
               on_error: str, name: str) -> Split:  # fmt: skip
    """Every image decoded once, at `size`, into one uint8 tensor."""
    images, keep = [], []
    for start in range(0, len(rows), 256):
        cells = rows[start : start + 256][image_column]
        for i, cell in enumerate(cells, start):
            where = f"{name} row {i}"
            try:
                images.append(load_image_bytes(_image_bytes(cell, where), channels, size, where))
                keep.append(i)
            except UnreadableImage as e:
                if on_error != "skip":
                    raise DataError(
                        f"cannot read image {where} ({e.reason}); fix it, or set dataset.on_error=skip"
                    ) from e
                log.warning("skipping unreadable image %s (%s)", where, e.reason)
    if not images:
        raise DataError(f"no image of {name} can be read")
    return Split(torch.stack(images), labels[torch.tensor(keep, dtype=torch.long)])


def _stream_split(
    stream: Any, image_column: str, labels: LabelColumn, name: str, **kwargs: Any
) -> StreamSplit:
    """The stream as a StreamSplit, its shards' rows counted (and their labels checked) now."""
    import datasets

    if isinstance(stream.features.get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    stream = stream.select_columns([image_column, labels.column])
    reader = HFStreamReader(stream, image_column, labels, name)
    log.info("counting the rows of the %d shards of %s", stream.num_shards, name)
    shards = []
    for i in range(stream.num_shards):
        part = stream.shard(num_shards=stream.num_shards, index=i).select_columns([labels.column])
        url, rows = reader.shard_url(i), 0
        with _datasets_errors(url):
            for batch in part.iter(batch_size=1024):
                rows += len(labels.indices(batch[labels.column], url, rows))
        shards.append(Shard(url, rows))
    return StreamSplit(shards, reader, source=name, **kwargs)


def load_hf(
    path: str,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    on_error: str = "fail",
    streaming: bool = False,
    in_memory: bool | None = None,
    classes: Sequence[str] | None = None,
    shuffle_buffer: int = 1000,
) -> ImageData:
    """A Hugging Face image-classification dataset (see the module docstring)."""
    import datasets

    if on_error not in ("fail", "skip"):
        raise ConfigError(f"dataset.on_error={on_error!r} must be fail or skip")
    if in_channels not in (1, 3):
        raise ConfigError(f"dataset.in_channels={in_channels}: images are read as 1 (L) or 3 (RGB) channels")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size={image_size!r} must be a positive size or [height, width]")
    opened = _open(path, streaming)
    parts = {}
    for setting, split in (("dataset.train_split", train_split), ("dataset.test_split", test_split)):
        if split not in opened:
            raise ConfigError(f"{setting}={split!r} is not a split of {path} (it has: {', '.join(opened)})")
        parts[split] = opened[split]
    first = parts[train_split]
    where = f"{path}[{train_split}]"
    image_column = _column(
        first.features, image_column, "image", "dataset.image_column", ("image", "img"), where
    )
    label_column = _column(first.features, label_column, "label", "dataset.label_column", ("label",), where)
    feature = first.features[label_column]
    names = list(classes) if classes is not None else None
    if names is None and isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    common = {"image_size": size, "in_channels": in_channels, "on_error": on_error}
    column = LabelColumn(label_column, names)

    if streaming:
        if names is None:
            head: dict[str, Any]
            with _datasets_errors(where):  # names in the column: say so, and how to map them
                head = next(
                    iter(first.select_columns([label_column]).iter(batch_size=16)), {label_column: []}
                )
            column.indices(head[label_column], where)
            raise ConfigError(f"{where}: its {label_column} column has no class names; set dataset.classes")
        out = {}
        for split, part in parts.items():
            if isinstance(part, datasets.Dataset):  # a save_to_disk folder: stream its rows in 16 parts
                part = part.to_iterable_dataset(num_shards=min(16, max(1, len(part))))
            buffer = shuffle_buffer if split == train_split else 0
            out[split] = _stream_split(part, image_column, column, f"{path}[{split}]",
                                       shuffle_buffer=buffer, **common)  # fmt: skip
        return ImageData(out[train_split], out[test_split], [str(n) for n in names])

    splits: dict[str, Split | FileSplit] = {}
    labels = {
        s: torch.tensor(column.indices(list(p[label_column]), f"{path}[{s}]"), dtype=torch.long)
        for s, p in parts.items()
    }
    if names is None:
        names = [str(i) for i in range(int(max(int(t.max()) for t in labels.values() if len(t))) + 1)]
    decoded = sum(_decoded_size(len(p), in_channels, size) for p in parts.values())
    fits = decoded <= _memory() // 4 if in_memory is None else bool(in_memory)
    for split, part in parts.items():
        rows = part.select_columns([image_column])
        if isinstance(rows.features[image_column], datasets.Image):
            rows = rows.cast_column(image_column, datasets.Image(decode=False))
        name = f"{path}[{split}]"
        if fits:
            splits[split] = _in_memory(rows, image_column, labels[split], size, in_channels, on_error, name)
        else:
            splits[split] = HFSplit(rows, image_column, labels[split], size, in_channels, on_error, name)
    return ImageData(splits[train_split], splits[test_split], [str(n) for n in names])
