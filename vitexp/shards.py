"""Write any dataset vitexp reads as WebDataset shards, for `dataset=wds`:

    python -m vitexp.shards dataset=imagefolder dataset.root=DIR dataset.num_classes=K out=SHARDS
    python -m vitexp.shards dataset=cifar10 dataset.root=../shared/data out=SHARDS

Each split becomes `out/{train,test}-NNNNNN.tar` of `shard_size` samples (`KEY.jpg|png|webp`
and `KEY.cls`, the class index), a shard index `out/{train,test}.json` in webdataset's `wids`
format (each shard's URL, relative to the index, and sample count; and the class names), and
`out/classes.txt`. Image files and dataset rows are written as stored (their own bytes, so the
shards decode to the same pixels as the source); images held in memory are encoded as PNG
(lossless) or JPEG (`format=jpg`). Training samples are written in a seeded random order, so
that every shard mixes the classes (a stream shuffles only within windows); test samples keep
their order.
"""

from __future__ import annotations

import io
import json
import logging
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
from vitexp.data import FileSplit, HFSplit, ImageData, Split, StreamSplit, read_image
from vitexp.data.hf import _image_bytes
from vitexp.data.images import is_jpeg
from vitexp.errors import ConfigError

log = logging.getLogger("vitexp.shards")

_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


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
    """(extension, bytes, label) of item `index` of a split."""
    label = int(split.labels[index])
    if isinstance(split, Split):
        return (*_encode(split.images[index], fmt, quality), label)
    if isinstance(split, HFSplit):
        data = _image_bytes(split.rows[index][split.image_column], split.where(index))
    else:
        path = Path(split.paths[index])
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:  # BMP, TIFF, ...: decoded by the one decoder, stored losslessly
            return (*_encode(read_image(path, split.in_channels), "png", quality), label)
        data = path.read_bytes()
    kind = _kind(data)
    if kind is None:
        return (*_encode(split.load(index), "png", quality), label)
    return kind, data, label


def _write_split(
    split: Split | FileSplit, name: str, out: Path, classes: list[str], *, shard_size: int,
    order: list[int], fmt: str, quality: int,
) -> list[dict[str, Any]]:  # fmt: skip
    from webdataset import TarWriter

    shards: list[dict[str, Any]] = []
    writer = None
    for position, index in enumerate(order):
        if position % shard_size == 0:
            if writer is not None:
                writer.close()
            url = f"{name}-{len(shards):06d}.tar"
            writer = TarWriter(str(out / url))
            shards.append({"url": url, "nsamples": 0})
        kind, data, label = _samples(split, index, fmt, quality)
        assert writer is not None
        writer.write({"__key__": f"{name}{index:08d}", kind: data, "cls": label})
        shards[-1]["nsamples"] += 1
    if writer is not None:
        writer.close()
    index_file = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": shards,
                  "classes": classes}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(index_file, indent=1) + "\n")
    return shards


def write_shards(
    data: ImageData,
    out: str | Path,
    *,
    shard_size: int = 1000,
    fmt: str = "png",
    quality: int = 95,
    shuffle: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write `data` as WebDataset shards in `out` (see the module docstring); returns a summary
    (per split: shards and samples)."""
    if shard_size <= 0:
        raise ConfigError(f"shard_size={shard_size} must be positive")
    if fmt not in ("png", "jpg"):
        raise ConfigError(f"format={fmt!r} must be png or jpg")
    for split in (data.train, data.test):
        if isinstance(split, StreamSplit):
            raise ConfigError("the dataset is already read from shards; give the dataset to convert")
    out = Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise ConfigError(f"out={out} holds shards already; give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in data.classes))
    summary: dict[str, Any] = {"out": str(out), "classes": len(data.classes)}
    for name, split in (("train", data.train), ("test", data.test)):
        order = list(range(len(split)))
        if shuffle and name == "train":
            order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
        shards = _write_split(split, name, out, list(data.classes), shard_size=shard_size, order=order,
                              fmt=fmt, quality=quality)  # fmt: skip
        summary[name] = {"shards": len(shards), "samples": len(order), "index": str(out / f"{name}.json")}
    return summary


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
    load_cfg = OmegaConf.to_container(cfg.dataset.load, resolve=True)
    assert isinstance(load_cfg, dict)
    data = load_dataset({str(k): v for k, v in load_cfg.items()}, "dataset", stored=False)
    summary = write_shards(
        data, cfg.out, shard_size=int(cfg.shard_size), fmt=str(cfg.format), quality=int(cfg.quality),
        shuffle=bool(cfg.shuffle), seed=int(cfg.seed),
    )  # fmt: skip
    for name, _ in _iter_splits(data):
        part = summary[name]
        log.info(
            "%s: %d samples in %d shards, index %s", name, part["samples"], part["shards"], part["index"]
        )


def main() -> None:
    """`python -m vitexp.shards [overrides]` (see conf/shards.yaml)."""
    run_command(_hydra_main, "shards")


if __name__ == "__main__":
    main()
