"""WebDataset shards: tar files of samples, each an image (`jpg`, `jpeg`, `png` or `webp`) and a
`cls` label (the class index as text, or a name of the class list), read in order by the
`webdataset` library (local paths, or any URL its `gopen` opens: `pipe:`, `http(s)://`, ...) and
planned over ranks and workers by `vitexp.data.streams`.

A split is given as a brace pattern (`/data/train-{000000..000146}.tar`), a list of them, or a
shard index: a `.json` file in WebDataset's `wids` format (`{"shardlist": [{"url": ...,
"nsamples": ...}], ...}`, shard URLs relative to the index), which `python -m vitexp.shards`
writes beside the shards. The plan needs each shard's sample count: an index gives them (and
they are checked as the shards are read: a shard that holds more or fewer samples stops the run
naming both counts); without one, every shard is read through once at start-up to count them.

Class names come from `classes` (the config), else `classes_file` (one name a line, or a JSON
list), else the index's `classes`, else a `classes.txt` beside the first training shard, else
"0", "1", ... up to `num_classes`. The first training sample's label is checked at load, so
that labels of the wrong kind (names the class list lacks, fractions) stop before training, in
one line.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vitexp.data.datasets import ImageData
from vitexp.data.streams import RawSample, Shard, ShardReader, ShardUnavailable, StreamSplit
from vitexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


def _reason(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:120] if text else ''}".rstrip(": ")


def _open(url: str) -> Any:
    import webdataset

    if _is_local(url):
        return _local_path(url).open("rb")
    return webdataset.gopen.gopen(url, "rb")


def _label(value: bytes, classes: dict[str, int] | None) -> int | None:
    """The class index a `cls` holds: an integer, or a name of the class list; None otherwise."""
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return None if classes is None else classes.get(text)


class TarShardReader(ShardReader):
    """Samples of one WebDataset tar shard, through `webdataset`'s tar iterator; `classes` maps
    class names to indices, for shards whose `cls` holds names."""

    def __init__(self, classes: Sequence[str] | None = None) -> None:
        self.classes = {str(c): i for i, c in enumerate(classes)} if classes is not None else None

    def samples(self, shard: Shard) -> Iterator[RawSample]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        try:
            stream = _open(shard.url)
        except OSError as e:
            raise ShardUnavailable(f"the shard cannot be opened ({_reason(e)})") from e
        try:
            files = tar_file_expander([{"url": shard.url, "stream": stream}], eof_value=None)
            for sample in group_by_keys(files):
                yield _raw(shard.url, sample, self.classes)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardUnavailable(f"the shard cannot be read on ({_reason(e)})") from e
        finally:
            stream.close()


def _raw(url: str, sample: dict[str, Any], classes: dict[str, int] | None) -> RawSample:
    where = f"{url}: sample {sample.get('__key__')}"
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        return RawSample(where, error=f"it has no image ({', '.join(IMAGE_KEYS)})")
    if LABEL_KEY not in sample:
        return RawSample(where, error=f"it has no {LABEL_KEY} label")
    label = _label(sample[LABEL_KEY], classes)
    if label is None:
        text = bytes(sample[LABEL_KEY][:20]).decode("utf-8", "replace").strip()
        return RawSample(
            where,
            error=f"its {LABEL_KEY} label {text!r} is neither a class index nor a class name",
            bad_label=True,
        )
    return RawSample(where, image=image, label=label)


def _check_first_label(shards: list[Shard], reader: TarShardReader, names: list[str], on_error: str) -> None:
    """The first training sample's label, read now: labels of the wrong kind (names the class
    list lacks, fractions) are one line before training rather than an error per sample."""
    if not shards:
        return
    samples = reader.samples(shards[0])
    try:
        first = next(iter(samples), None)
    except ShardUnavailable:
        return  # reported when it is read, by on_error
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
    if first is None or not first.bad_label:
        return
    shown = ",".join(names[:10]) + (",..." if len(names) > 10 else "")
    message = (
        f"{first.where}: {first.error}; each sample's {LABEL_KEY} must be a class index 0..{len(names) - 1} "
        f"or one of the class names [{shown}]: give the names the shards use with dataset.classes=[...] "
        f"or dataset.classes_file=FILE"
    )
    if on_error != "skip":
        raise ConfigError(message)
    log.warning("%s (samples like it are skipped)", message)


# --------------------------------------------------------------------------- shard lists


def _read_text(url: str, setting: str) -> str:
    try:
        with _open(url) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{setting}={url} does not exist; check the path") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{url} cannot be read ({_reason(e)})") from e


def _read_index(url: str, setting: str) -> tuple[list[Shard], list[str] | None]:
    """The shards (with counts) and class names of a wids-format shard index."""
    try:
        index = json.loads(_read_text(url, setting))
        entries = index["shardlist"]
        base = url.rsplit("/", 1)[0] + "/" if "/" in url else ""
        shards = [
            Shard(
                e["url"] if ("://" in e["url"] or e["url"].startswith("/")) else base + e["url"],
                int(e["nsamples"]),
            )
            for e in entries
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{url} is not a shard index (a JSON object with shardlist: [{{url, nsamples}}, ...]): "
            f"{_reason(e)}"
        ) from e
    classes = index.get("classes")
    return shards, [str(c) for c in classes] if isinstance(classes, list) else None


def shard_urls(spec: str | Sequence[str]) -> list[str]:
    """A brace pattern (`a-{000..009}.tar`, several joined by `::`) or a list of them, expanded."""
    from webdataset.shardlists import expand_urls

    specs = [spec] if isinstance(spec, str) else list(spec)
    return [url for one in specs for url in expand_urls(str(one))]


def _count(url: str) -> int | str:
    """The samples in a shard, or why it cannot be read."""
    try:
        return sum(1 for _ in TarShardReader().samples(Shard(url, 0)))
    except ShardUnavailable as e:
        return e.reason


def _shards(spec: str | Sequence[str], setting: str, on_error: str) -> tuple[list[Shard], list[str] | None]:
    """The shards a setting names, with their counts; missing local shards follow on_error."""
    if isinstance(spec, str) and spec.endswith(".json"):
        shards, classes = _read_index(spec, setting)
    else:
        urls, classes = shard_urls(spec), None
        if not urls:
            raise ConfigError(
                f"{setting} names no shards; give a brace pattern, a list or a .json shard index"
            )
        log.info("counting the samples of %d shards (%s); a .json shard index skips this", len(urls), setting)
        shards = []
        for url in urls:
            counted = _count(url)
            if isinstance(counted, str):
                _unusable(url, counted, setting, on_error)
            else:
                shards.append(Shard(url, counted))
    missing = [s for s in shards if _is_local(s.url) and not _local_path(s.url).is_file()]
    for shard in missing:
        _unusable(shard.url, "the shard does not exist", setting, on_error)
    return [s for s in shards if s not in missing], classes


def _unusable(url: str, reason: str, setting: str, on_error: str) -> None:
    if on_error != "skip":
        raise DataError(f"{url} ({setting}): {reason}; fix the shard list, or set dataset.on_error=skip")
    log.warning("skipping shard %s (%s)", url, reason)


def _classes(
    classes: Sequence[str] | None,
    classes_file: str | None,
    from_index: list[str] | None,
    first_shard: str | None,
    num_classes: int | None,
) -> list[str]:
    if classes is not None:
        return [str(c) for c in classes]
    if classes_file is not None:
        text = _read_text(classes_file, "dataset.classes_file")
        if classes_file.endswith(".json"):
            loaded = json.loads(text)
            names = loaded.get("classes") if isinstance(loaded, dict) else loaded
            if not isinstance(names, list):
                raise DataError(f"{classes_file} holds no list of class names")
            return [str(c) for c in names]
        return [line.strip() for line in text.splitlines() if line.strip()]
    if from_index is not None:
        return from_index
    if first_shard is not None and _is_local(first_shard):
        beside = _local_path(first_shard).parent / "classes.txt"
        if beside.is_file():
            return [line.strip() for line in beside.read_text().splitlines() if line.strip()]
    if num_classes is None:
        raise ConfigError(
            "the shards name no classes: set dataset.classes_file, dataset.classes or dataset.num_classes"
        )
    return [str(i) for i in range(num_classes)]


def load_wds(
    train_shards: str | Sequence[str],
    test_shards: str | Sequence[str],
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    on_error: str = "fail",
    classes: Sequence[str] | None = None,
    classes_file: str | None = None,
    num_classes: int | None = None,
    shuffle_buffer: int = 1000,
) -> ImageData:
    """WebDataset shards for training and testing (see the module docstring), decoded by the
    one image decoder at `image_size` while training; training samples are shuffled in
    windows of `shuffle_buffer` within each reader's part of the epoch."""
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"dataset.on_error={on_error!r} must be fail or skip")
    if in_channels not in (1, 3):
        raise ConfigError(f"dataset.in_channels={in_channels}: images are read as 1 (L) or 3 (RGB) channels")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ConfigError(f"dataset.shuffle_buffer={shuffle_buffer!r} must be 0 (no shuffle) or more")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size={image_size!r} must be a positive size or [height, width]")
    train, train_classes = _shards(train_shards, "dataset.train_shards", on_error)
    test, _ = _shards(test_shards, "dataset.test_shards", on_error)
    names = _classes(classes, classes_file, train_classes, train[0].url if train else None, num_classes)
    if num_classes is not None and len(names) != num_classes:
        raise ConfigError(
            f"the shards' class list has {len(names)} names but dataset.num_classes={num_classes}; "
            f"set dataset.num_classes={len(names)}"
        )
    reader = TarShardReader(names)
    _check_first_label(train, reader, names, on_error)

    def split(shards: list[Shard], spec: str | Sequence[str], name: str, buffer: int) -> StreamSplit:
        index = spec if isinstance(spec, str) and spec.endswith(".json") else None
        return StreamSplit(
            shards, reader, image_size=size, in_channels=in_channels, on_error=on_error,
            shuffle_buffer=buffer, source=f"the {name} shards", index=index,
        )  # fmt: skip

    training = split(train, train_shards, "training", shuffle_buffer)
    return ImageData(training, split(test, test_shards, "test", 0), names)
