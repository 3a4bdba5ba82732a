"""Write any dataset vitexp reads as WebDataset shards, for `dataset=wds`:

    python -m vitexp.shards dataset=imagefolder dataset.root=DIR dataset.num_classes=K out=SHARDS
    python -m vitexp.shards dataset=cifar10 dataset.root=../shared/data out=SHARDS

Each split becomes `out/{train,test}-NNNNNN.tar` of `shard_size` samples (`KEY.jpg|png|webp`
and `KEY.cls`, the class index), a shard index `out/{train,test}.json` in webdataset's `wids`
format (each shard's URL, relative to the index, and sample count; and the class names), and
`out/classes.txt`. Image files and dataset rows are written as stored (their own bytes, so the
shards decode to the same pixels as the source), once the one image decoder has read them:
an unreadable one follows the dataset's `on_error` (fail naming it, or skip it with a warning
and count it); images held in memory are encoded as PNG (lossless) or JPEG (`format=jpg`).
Training samples are written in a seeded random order, so that every shard mixes the classes
(a stream shuffles only within windows); test samples keep their order.

`out` must be a new or empty folder: nothing there is overwritten unless `overwrite=true`, which
replaces what an earlier conversion wrote (its shards, indexes and classes.txt) and nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vitexp.cli import require_settings, run_command, run_job
from vitexp.config import conf_dir
from vitexp.data import FileSplit, ImageData, Split, StreamSplit, UnreadableImage, decode_image
from vitexp.data.images import is_jpeg
from vitexp.errors import ConfigError, DataError

log = logging.getLogger("vitexp.shards")

# What a conversion writes into `out` (and so what overwrite=true may replace).
_WRITTEN = re.compile(r"(train|test)(-\d{6}\.tar|\.json)|classes\.txt")


def _kind(data: bytes) -> str | None:
    """The WebDataset extension of encoded image bytes vitexp can store as they are."""
    if is_jpeg(data):
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _encode(pixels: torch.Tensor, fmt: str, quality: int) -> tuple[str, bytes]:
    arr = pixels.cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    out = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(np.ascontiguousarray(arr)).save(out, "JPEG", quality=quality)
    else:
        Image.fromarray(np.ascontiguousarray(arr)).save(out, "PNG")
    return fmt, out.getvalue()


def _samples(split: Split | FileSplit, index: int, fmt: str, quality: int) -> tuple[str, bytes, int]:
    """(extension, bytes, label) of item `index` of a split. Encoded images (files, dataset
    rows) are decoded by the one decoder first, so that a shard never holds an image training
    cannot read (UnreadableImage); JPEG, PNG and WebP keep their bytes, other formats (BMP,
    TIFF, ...) are stored as PNG, losslessly."""
    label = int(split.labels[index])
    if isinstance(split, Split):
        return (*_encode(split.images[index], fmt, quality), label)
    data = split.read(index)
    pixels = decode_image(data, split.in_channels, split.where(index))
    kind = _kind(data)
    if kind is None:
        return (*_encode(pixels, "png", quality), label)
    return kind, data, label


def _write_split(
    split: Split | FileSplit, name: str, out: Path, classes: list[str], *, shard_size: int,
    order: list[int], fmt: str, quality: int,
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Write one split's shards and index; returns the shards and the unreadable images skipped."""
    from webdataset import TarWriter

    on_error = getattr(split, "on_error", "fail")
    shards: list[dict[str, Any]] = []
    skipped = 0
    with contextlib.ExitStack() as open_shard:
        for index in order:
            try:
                kind, data, label = _samples(split, index, fmt, quality)
            except UnreadableImage as e:
                if on_error != "skip":
                    fix = "fix or remove it, or set dataset.on_error=skip"
                    raise DataError(f"cannot read image {e.path} ({e.reason}); {fix}") from e
                log.warning("skipping unreadable image %s (%s)", e.path, e.reason)
                skipped += 1
                continue
            if not shards or shards[-1]["nsamples"] == shard_size:
                open_shard.close()
                url = f"{name}-{len(shards):06d}.tar"
                writer = open_shard.enter_context(TarWriter(str(out / url)))
                shards.append({"url": url, "nsamples": 0})
            writer.write({"__key__": f"{name}{index:08d}", kind: data, "cls": label})
            shards[-1]["nsamples"] += 1
    if skipped and not shards:
        raise DataError(f"no image of the {name} split can be read ({skipped} skipped); nothing to write")
    index_file = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shards,
                  "classes": classes}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(index_file, indent=1) + "\n")
    return shards, skipped


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """`out` as a folder the conversion may write: new, empty, or (with `overwrite`) holding
    files. Else a one-line ConfigError saying what to do; nothing is written here."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a new or empty folder for the shards")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"out={out}: {above} is a file, not a folder; give a new or empty folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(
            f"out={out} is not empty (it holds {shown}); give a new or empty folder, or add overwrite=true "
            f"to replace the shards, indexes and classes.txt written there (other files stay)"
        )
    return out


def write_shards(
    data: ImageData,
    out: str | Path,
    *,
    shard_size: int = 1000,
    fmt: str = "png",
    quality: int = 95,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `data` as WebDataset shards in `out`, a new or empty folder unless `overwrite`
    (see the module docstring); returns a summary (per split: shards, samples written and
    unreadable images skipped)."""
    if shard_size <= 0:
        raise ConfigError(f"shard_size={shard_size} must be positive")
    if fmt not in ("png", "jpg"):
        raise ConfigError(f"format={fmt!r} must be png or jpg")
    for split in (data.train, data.test):
        if isinstance(split, StreamSplit):
            raise ConfigError("the dataset is already read from shards; give the dataset to convert")
    out = check_out(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={out} cannot be made ({e.strerror or e}); give a folder you can write") from e
    _remove_written(out)  # only with overwrite: what an earlier conversion wrote
    try:
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in data.classes))
        summary: dict[str, Any] = {"out": str(out), "classes": len(data.classes)}
        for name, split in (("train", data.train), ("test", data.test)):
            order = list(range(len(split)))
            if shuffle and name == "train":
                order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
            shards, skipped = _write_split(split, name, out, list(data.classes), shard_size=shard_size,
                                           order=order, fmt=fmt, quality=quality)  # fmt: skip
            summary[name] = {"shards": len(shards), "samples": sum(s["nsamples"] for s in shards),
                             "skipped": skipped, "index": str(out / f"{name}.json")}  # fmt: skip
    except BaseException:
        # A conversion that stops leaves nothing half-written, so that the same command can run
        # again once the cause is fixed.
        _remove_written(out)
        raise
    return summary


def _remove_written(out: Path) -> None:
    for old in out.iterdir():
        if _WRITTEN.fullmatch(old.name):
            old.unlink()


def _iter_splits(data: ImageData) -> Iterator[tuple[str, Split | FileSplit]]:
    yield "train", data.train
    yield "test", data.test


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="shards")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(_shards, cfg)


def _shards(cfg: DictConfig) -> None:
    from vitexp.inference import load_dataset

    require_settings(cfg)
    if cfg.get("dataset") is None:
        raise ConfigError("dataset is required: add dataset=NAME (and its settings, e.g. dataset.root=DIR)")
    if not isinstance(cfg.overwrite, bool):
        raise ConfigError(f"overwrite={cfg.overwrite!r} must be true or false")
    check_out(cfg.out, cfg.overwrite)  # before the dataset is read, which may take long
    load_cfg = OmegaConf.to_container(cfg.dataset.load, resolve=True)
    assert isinstance(load_cfg, dict)
    data = load_dataset({str(k): v for k, v in load_cfg.items()}, "dataset", stored=False)
    summary = write_shards(
        data, cfg.out, shard_size=int(cfg.shard_size), fmt=str(cfg.format), quality=int(cfg.quality),
        shuffle=bool(cfg.shuffle), seed=int(cfg.seed), overwrite=cfg.overwrite,
    )  # fmt: skip
    for name, _ in _iter_splits(data):
        part = summary[name]
        skipped = f"; {part['skipped']} unreadable images skipped" if part["skipped"] else ""
        log.info(
            "%s: %d samples in %d shards, index %s%s",
            name, part["samples"], part["shards"], part["index"], skipped,
        )  # fmt: skip


def main() -> None:
    """`python -m vitexp.shards [overrides]` (see conf/shards.yaml)."""
    run_command(_hydra_main)
