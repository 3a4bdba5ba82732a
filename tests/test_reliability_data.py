"""Data sources under bad input and faults: every source that reads encoded images or label
columns (`SOURCES`, which a new source joins) meets a corrupt image, an image whose header
declares 13,600 × 13,600 pixels, and labels of the wrong kind, and each is one line naming the
item and the fix, before training where it can be; `vitexp.shards` never overwrites what is in
its folder and checks its sources; a shard index that miscounts a shard is caught; libjpeg's
and `datasets`' noise is one line; the documented brace patterns parse."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from tests.helpers import REPO, TINY_MODEL, compose_cfg, run_cli  # noqa: E402
from vitexp.cli import check_command_line  # noqa: E402
from vitexp.commands.shards import check_out, write_shards  # noqa: E402
from vitexp.config import validate  # noqa: E402
from vitexp.data import (  # noqa: E402
    BatchTransform,
    ImageData,
    Split,
    decode_image,
    decode_jpegs,
    load_hf,
    load_image,
    load_imagefolder,
    load_wds,
    make_loader,
)
from vitexp.data.images import UnreadableImage, defer_or_load, jpeg_size  # noqa: E402
from vitexp.data.stored import STORED_DATASETS  # noqa: E402
from vitexp.errors import ConfigError, DataError  # noqa: E402

CPU = torch.device("cpu")
PLAIN = BatchTransform(img_size=4, mean=[0.0] * 3, std=[1.0] * 3)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and " at 0x" not in message, message
    return message


# --------------------------------------------------------------------------- images made here


def png(value: int, size: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(value: int = 128, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(value).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def huge_jpeg(side: int = 13_600) -> bytes:
    """A small JPEG file whose frame header declares `side` × `side` pixels (185 Mpixel at the
    default): what a decompression bomb looks like to a decoder that trusts the header."""
    data = bytearray(jpeg())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    assert jpeg_size(bytes(data)) == (side, side)
    return bytes(data)


CORRUPT = b"\xff\xd8\xff not a jpeg at all"


# --------------------------------------------------------------------------- the sources


@dataclass(frozen=True)
class Source:
    """A data source as the tests drive it: `write(folder, items)` stores train items (image
    bytes, label value) and a good test split and returns the loader's arguments; `load` is the
    loader; `names_item` the pattern naming item `i` in a message; `label_column` whether its
    labels are data (not folder names); `files` whether its split is read by index from files or
    rows (a FileSplit, which `vitexp.shards` converts byte for byte)."""

    name: str
    loader: str
    write: Callable[[Path, list[tuple[bytes, Any]]], dict[str, Any]]
    load: Callable[..., ImageData]
    names_item: Callable[[int], str]
    label_column: bool = True
    files: bool = False


def _ext(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "jpg"


def write_folder(root: Path, items: list[tuple[bytes, Any]]) -> dict[str, Any]:
    for split, rows in (("train", items), ("val", GOOD)):
        for i, (data, label) in enumerate(rows):
            path = root / split / f"c{label}" / f"item{i}.{_ext(data)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for label in (0, 1):  # both splits need both classes, even when the bad item is one of them
        (root / "train" / f"c{label}").mkdir(parents=True, exist_ok=True)
    return {"root": root}


def write_hf(root: Path, items: list[tuple[bytes, Any]]) -> dict[str, Any]:
    def table(rows: list[tuple[bytes, Any]]) -> datasets.Dataset:
        kinds = {type(label) for _, label in rows}
        dtype = "string" if str in kinds else "float64" if float in kinds else "int64"
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value(dtype)})
        cells = [{"bytes": data, "path": None} for data, _ in rows]
        return datasets.Dataset.from_dict({"image": cells, "label": [label for _, label in rows]}, features)

    test = GOOD if not isinstance(items[0][1], str) else [(d, NAMES[int(i) % 2]) for d, i in GOOD]
    datasets.DatasetDict(train=table(items), test=table(test)).save_to_disk(str(root / "hf"))
    return {"path": str(root / "hf")}


def write_wds(root: Path, items: list[tuple[bytes, Any]]) -> dict[str, Any]:
    from webdataset import TarWriter

    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", items), ("test", GOOD)):
        with TarWriter(str(root / f"{split}.tar")) as writer:
            for i, (data, label) in enumerate(rows):
                writer.write({"__key__": f"item{i}", _ext(data): data, "cls": str(label)})
    return {"train_shards": str(root / "train.tar"), "test_shards": str(root / "test.tar")}


def _hf(**mode: Any) -> Callable[..., ImageData]:
    return lambda **kw: load_hf(**mode, **kw)


SOURCES = [
    Source("imagefolder", "load_imagefolder", write_folder, load_imagefolder,
           lambda i: rf"item{i}\.", label_column=False, files=True),
    Source("hf-in-memory", "load_hf", write_hf, _hf(in_memory=True), lambda i: rf"\[train\] row {i}\b"),
    Source("hf-by-index", "load_hf", write_hf, _hf(in_memory=False), lambda i: rf"\[train\] row {i}\b",
           files=True),
    Source("hf-streamed", "load_hf", write_hf, _hf(streaming=True), lambda i: r"\[train\] shard \d+ row \d+"),
    Source("wds", "load_wds", write_wds, load_wds, lambda i: rf"sample item{i}\b"),
]  # fmt: skip
# Loaders with nothing encoded to decode and no label column to read: their tests are elsewhere
# (tests/test_data_errors.py).
IN_MEMORY_ONLY = {"load_cifar10", "load_cifar100", "load_digits", "load_fake"}
GOOD = [(png(10 * i), i % 2) for i in range(6)]
NAMES = ["cat", "dog"]


def test_every_dataset_loader_is_driven_by_these_tests():
    """A new data source joins SOURCES (or says why it reads nothing encoded)."""
    loaders = {name.rsplit(".", 1)[1] for name in STORED_DATASETS}
    assert loaders == {s.loader for s in SOURCES} | IN_MEMORY_ONLY


def _settings(source: Source, on_error: str = "fail", **extra: Any) -> dict[str, Any]:
    settings = {"image_size": 4, "on_error": on_error, **extra}
    if source.loader == "load_hf" and "classes" not in extra:
        settings["classes"] = ["0", "1"]
    if source.loader == "load_wds":
        settings.setdefault("num_classes", 2)
    return settings


def drain(data: ImageData, decode_on: str = "workers") -> tuple[list[int], list[int]]:
    """Every training batch of `data`, in stored order: (pixel value of each image, labels)."""
    seen, labels = [], []
    for x, y in make_loader(data.train, batch_size=4, transform=PLAIN, train=False, device=CPU,
                            decode_on=decode_on):  # fmt: skip
        seen += (x[:, 0, 0, 0] * 255).round().long().tolist()
        labels += y.tolist()
    return seen, labels


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
@pytest.mark.parametrize("bad", ["corrupt", "huge"])
def test_a_bad_image_is_one_line_naming_it_and_skip_leaves_out_only_it(source, bad, tmp_path, monkeypatch):
    """The image at position 3 is corrupt, or declares 13,600 × 13,600 pixels (refused from its
    header: the decoders are never asked to decode it)."""
    import torchvision.io

    real = torchvision.io.decode_jpeg

    def guarded(data, *args, **kwargs):
        inputs = data if isinstance(data, list) else [data]
        assert all(jpeg_size(memoryview(d.numpy())) != (13_600, 13_600) for d in inputs), "decoded a bomb"
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", guarded)
    items = [*GOOD[:3], (CORRUPT if bad == "corrupt" else huge_jpeg(), 1), *GOOD[3:]]
    settings = source.write(tmp_path / "data", items)
    why = "cannot identify image file|[Tt]runcated|not a jpeg" if bad == "corrupt" else "13600×13600"
    for decode_on in ("workers", "device"):
        with pytest.raises(DataError) as e:
            drain(source.load(**settings, **_settings(source)), decode_on)
        message = one_line(e)
        assert re.search(source.names_item(3), message) and re.search(why, message), message
        assert "on_error=skip" in message
        if bad == "huge":
            assert "PIL.Image.MAX_IMAGE_PIXELS" in message
        seen, _ = drain(source.load(**settings, **_settings(source, "skip")), decode_on)
        assert sorted(seen) == [10 * i for i in range(6)]


@pytest.mark.parametrize("source", [s for s in SOURCES if s.label_column], ids=lambda s: s.name)
@pytest.mark.parametrize("labels", ["fractions", "names"])
def test_labels_of_the_wrong_kind_stop_at_load_in_one_line(source, labels, tmp_path):
    """Float labels (1.5, 0.7) and class names without a class list stop when the dataset is
    loaded, in the main process, naming the dataset, the label and the setting to change; with
    dataset.classes the names map to their indices."""
    values = [1.5, 0.7, 0.0, 1.0, 0.0, 1.0] if labels == "fractions" else [NAMES[i % 2] for i in range(6)]
    settings = source.write(
        tmp_path / "data", [(data, value) for (data, _), value in zip(GOOD, values, strict=True)]
    )
    with pytest.raises(ConfigError) as e:
        source.load(**settings, **{**_settings(source), "classes": None})
    message = one_line(e)
    where = "column 'label'" if source.loader == "load_hf" else "cls label"
    assert where in message and str(values[0]) in message, message
    assert (
        ("dataset.classes=[" in message)
        if labels == "names"
        else ("dataset.label_column" in message or "dataset.classes" in message)
    )
    if labels == "names":
        data = source.load(**settings, **_settings(source, classes=NAMES))
        assert data.classes == NAMES and drain(data)[1] == [0, 1, 0, 1, 0, 1]


def test_hugging_face_names_outside_the_classes_are_named(tmp_path):
    settings = write_hf(tmp_path, [(data, ["cat", "dog", "cow"][i % 3]) for i, (data, _) in enumerate(GOOD)])
    with pytest.raises(DataError) as e:
        load_hf(**settings, image_size=4, classes=NAMES)
    assert re.search(r"\[train\]: the label 'cow' of row 2 in column 'label' is not one of dataset.classes "
                     r"\(cat, dog\)", one_line(e))  # fmt: skip


# --------------------------------------------------------------------------- every decode path


@pytest.mark.parametrize(
    "path",
    ["jpeg fast path", "pillow", "jpeg batch", "jpeg left for the device", "load_image (predict)"],
)
def test_every_decode_path_refuses_more_pixels_than_pillows_limit(path, tmp_path, monkeypatch, recwarn):
    """Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS), lowered to 3,000 pixels: a 64 × 64 image
    (4,096) is refused before decoding on every path, though Pillow itself would only warn
    below twice its limit; a 48 × 48 one (2,304) passes."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    big, small = (png(7, 64), png(7, 48)) if path == "pillow" else (jpeg(size=64), jpeg(size=48))

    def decode(data: bytes) -> Any:
        if path == "jpeg batch":
            return decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], 3)[0]
        if path == "jpeg left for the device":
            return defer_or_load(data, 3, (8, 8), "x.jpg")
        if path == "load_image (predict)":
            (tmp_path / "x.jpg").write_bytes(data)
            return load_image(tmp_path / "x.jpg", 3, (8, 8))
        return decode_image(data, 3, "x.jpg")

    assert decode(small) is not None
    if path == "jpeg batch":
        assert decode(big) is None  # decode_image then refuses it, naming it
        return
    with pytest.raises(UnreadableImage) as e:
        decode(big)
    assert (
        "x.jpg cannot be read (it is 64×64 = 4,096 pixels, more than the 3,000 of PIL.Image.MAX_IMAGE_PIXELS"
        in (one_line(e))
    )
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_predict_refuses_a_13600_pixel_square_jpeg_before_decoding(tmp_path, monkeypatch):
    import torchvision.io

    from vitexp.commands.predict import predict_images
    from vitexp.models import build_model
    from vitexp.training.checkpoint import save_checkpoint

    cfg = compose_cfg(
        ["dataset=fake", "dataset.num_classes=2", "model=vit_ti4", *TINY_MODEL, "model.img_size=8"]
    )
    save_checkpoint({"model": build_model(cfg.model).state_dict(),
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "last.pt")  # fmt: skip
    (tmp_path / "bomb.jpg").write_bytes(huge_jpeg())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: pytest.fail("decoded a bomb"))
    with pytest.raises(DataError) as e:
        predict_images(tmp_path / "last.pt", [tmp_path / "bomb.jpg"])
    expected = (
        r"bomb.jpg cannot be read \(it is 13600×13600 = 184,960,000 pixels, more than the 89,478,485 of "
        r"PIL.Image.MAX_IMAGE_PIXELS, the decompression-bomb limit\); downscale it"
    )
    assert re.search(expected, one_line(e))


# --------------------------------------------------------------------------- noise


def test_libjpeg_warnings_become_one_warning_naming_the_file(tmp_path, capfd, caplog):
    """libjpeg prints "Warning: unknown JFIF revision number 3.01" (and corrupt-data warnings)
    straight to stderr through torchvision's decoder; vitexp says it once, naming the file."""
    data = bytearray(jpeg())
    data[data.find(b"JFIF\x00") + 5] = 3  # JFIF major version 3
    odd = tmp_path / "odd.jpg"
    odd.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="vitexp.data.images"):
        first = load_image(odd, 3, (8, 8))
        assert torch.equal(load_image(odd, 3, (8, 8)), first)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        assert torch.equal(
            decode_jpegs([tensor], 3, names=["batch/odd.jpg"])[0], decode_image(bytes(data), 3, "b")
        )
    assert "JFIF" not in capfd.readouterr().err
    said = [r.getMessage() for r in caplog.records if "JFIF" in r.getMessage()]
    assert said == [f"image {odd}: libjpeg: Warning: unknown JFIF revision number 3.01",
                    "image batch/odd.jpg: libjpeg: Warning: unknown JFIF revision number 3.01",
                    "image b: libjpeg: Warning: unknown JFIF revision number 3.01"]  # fmt: skip


def test_bytes_pillow_cannot_identify_are_named_without_an_object_address():
    with pytest.raises(UnreadableImage) as e:
        decode_image(b"GIF89a not really", 3, "shard.tar: sample k")
    assert (
        "image shard.tar: sample k cannot be read (UnidentifiedImageError: cannot identify image file)"
        in (one_line(e))
    )


def test_data_files_datasets_cannot_cast_are_one_line_naming_the_file(tmp_path, capfd):
    """Parquet files whose columns differ: `datasets` logs a page of schemas and raises; vitexp
    says it in one line naming the file, and nothing else reaches stderr."""
    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    for name, extra in (("train-0", {}), ("train-1", {"extra": [1] * 3}), ("test-0", {})):
        table = {"image": [{"bytes": png(i), "path": None} for i in range(3)], "label": [0, 1, 0], **extra}
        datasets.Dataset.from_dict(table).to_parquet(str(folder / f"{name}.parquet"))
    capfd.readouterr()
    for streaming in (False, True):
        with pytest.raises(DataError) as e:
            load_hf(str(tmp_path / "pq"), image_size=4, streaming=streaming, classes=["0", "1"])
        expected = (
            r"cannot be read by datasets: .*train-1.parquet does not match the columns and types of the "
            r"files before it \(there are 1 new columns \(\{?'?extra'?\}?\)\); give every data file of a "
            r"split the same columns and types"
        )
        assert re.search(expected, one_line(e))
        assert "Couldn't cast" not in capfd.readouterr().err


# --------------------------------------------------------------------------- shard indexes


@pytest.fixture
def numbered_shards(tmp_path) -> Path:
    """Shards of 6 samples each whose pixels spell their index (18 training, 12 test)."""

    def split(n: int) -> Split:
        images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).contiguous()
        return Split(images, torch.arange(n) % 2)

    write_shards(
        ImageData(split(18), split(12), ["a", "b"]), tmp_path / "shards", shard_size=6, shuffle=False
    )
    return tmp_path / "shards"


@pytest.mark.parametrize("change", [-1, +1], ids=["under-counts", "over-counts"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_index_that_miscounts_a_shard_stops_the_evaluation(numbered_shards, change, workers):
    """The test index lists 5 (or 7) samples for a shard of 6: the first evaluation stops in one
    line naming the shard, both counts and the index to write again; no sample is skipped
    silently. The true index scores all 12."""
    index = numbered_shards / "test.json"
    data = load_wds(str(numbered_shards / "train.json"), str(index), image_size=4)
    assert sorted(_evaluate(data, workers)) == list(range(12))
    listed = json.loads(index.read_text())
    listed["shardlist"][1]["nsamples"] += change
    index.write_text(json.dumps(listed))
    data = load_wds(str(numbered_shards / "train.json"), str(index), image_size=4)
    with pytest.raises(DataError) as e:
        _evaluate(data, workers)
    assert re.search(
        rf"test-000001.tar: it holds 6 samples, not the {6 + change} that its index .*test.json lists; write "
        rf"the index again \(python -m vitexp.shards writes shards with theirs\)",
        one_line(e),
    )


def _evaluate(data: ImageData, workers: int) -> list[int]:
    loader = make_loader(
        data.test, batch_size=4, transform=PLAIN, train=False, device=CPU, num_workers=workers
    )
    try:
        return [int(v) for x, _ in loader for v in (x[:, 0, 0, 0] * 255).round().long()]
    finally:
        loader.close()


# --------------------------------------------------------------------------- vitexp.shards


@pytest.mark.slow
def test_the_shards_command_never_overwrites_a_users_files(tmp_path):
    """The issue's case: out= a folder holding the user's train.json. Exit 2, one line, the file
    untouched; out= a file is one line too."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train.json").write_text("my notes\n")
    result = run_cli("dataset=digits", f"out={out}", module="vitexp.shards")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert re.search(r"out=.*mine is not empty \(it holds train.json\); give a new or empty folder, or add "
                     r"overwrite=true", result.stderr)  # fmt: skip
    assert (out / "train.json").read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == [
        "train.json"
    ]
    (tmp_path / "a_file").write_text("x")
    for given, message in (
        (tmp_path / "a_file", "is a file"),
        (tmp_path / "a_file" / "sub", "is a file, not a"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_out(given)


@pytest.mark.slow
def test_overwrite_replaces_only_what_a_conversion_wrote(tmp_path):
    def split(n: int) -> Split:
        return Split(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))

    data = ImageData(split(5), split(2), ["a"])
    out = tmp_path / "shards"
    write_shards(data, out, shard_size=1)  # train-000000..000004
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        write_shards(data, out, shard_size=5)
    write_shards(data, out, shard_size=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.txt", "notes.txt", "test-000000.tar", "test.json", "train-000000.tar", "train.json",
    ]  # fmt: skip
    check_command_line("shards", ["dataset=digits", f"out={out}", "overwrite=true"])


@pytest.mark.slow
@pytest.mark.parametrize("source", [s for s in SOURCES if s.files], ids=lambda s: s.name)
def test_the_shards_command_reads_every_source_image_first(source, tmp_path, caplog):
    """A corrupt source image is never copied into a shard: fail names it; skip leaves it out,
    counts it and the index lists what was written."""
    items = [*GOOD[:2], (CORRUPT, 0), *GOOD[2:]]
    settings = source.write(tmp_path / "data", items)
    with pytest.raises(DataError) as e:
        write_shards(source.load(**settings, **_settings(source)), tmp_path / "out")
    assert re.search(source.names_item(2), one_line(e)) and "dataset.on_error=skip" in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written: the command can run again
    skipping = _settings(source, "skip")
    with caplog.at_level(logging.WARNING, logger="vitexp.shards"):
        summary = write_shards(source.load(**settings, **skipping), tmp_path / "skipped", shuffle=False)
    assert summary["train"]["skipped"] == 1 and summary["train"]["samples"] == 6
    assert "skipping unreadable image" in caplog.text
    shards = load_wds(str(tmp_path / "skipped" / "train.json"), str(tmp_path / "skipped" / "test.json"),
                      image_size=4)  # fmt: skip
    assert sorted(drain(shards)[0]) == [10 * i for i in range(6)]


# --------------------------------------------------------------------------- documented commands


def _documented_commands() -> list[str]:
    """The data commands the docs show: the comments of conf/dataset/*.yaml and conf/shards.yaml
    (which tests/test_docs.py does not read), and the lines and `spans` of docs/data.md and the
    README that run `python -m vitexp` on dataset=wds|hf or `python -m vitexp.shards`."""
    found = []
    for path in [*sorted((REPO / "conf" / "dataset").glob("*.yaml")), REPO / "conf" / "shards.yaml"]:
        for line in path.read_text().splitlines():
            match = re.match(r"#\s+(python -m vitexp\S* \S+=.*?)(\s{2,}\(.*\))?$", line)
            if match:
                found.append(match[1])
    for page in (REPO / "docs" / "data.md", REPO / "README.md"):
        text = page.read_text()
        lines = re.findall(r"^(python -m vitexp.*)$", text, re.MULTILINE)
        spans = re.findall(r"`(python -m vitexp[^`]*)`", text)
        found += [c for c in lines + spans if "=" in c and re.search(r"dataset=(wds|hf)|vitexp\.shards", c)]
    return found


PLACEHOLDERS = {"K": "10", "ORG/NAME": "org/name", "DIR": "/data/x", "SHARDS": "/data/shards"}


@pytest.mark.slow
def test_documented_data_commands_parse_as_written(tmp_path):
    """Each documented data command goes through Hydra's override parser and the command
    line's check (with placeholders filled in): the brace patterns are quoted as Hydra needs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    commands = _documented_commands()
    assert any("{000000..000146}" in c for c in commands) and any(c.startswith("python -m vitexp.shards")
                                                                   for c in commands)  # fmt: skip
    for command in commands:
        words = shlex.split(command, comments=True)
        module, args = words[2], [a for a in words[3:] if a != "..." and not a.startswith("[")]
        args = [re.sub(r"\b(K|ORG/NAME|DIR|SHARDS)\b", lambda m: PLACEHOLDERS[m[1]], a) for a in args]
        parsed = OverridesParser.create().parse_overrides(args)
        shards = [o.value() for o in parsed if o.key_or_group == "dataset.train_shards"]
        assert all(isinstance(v, str) for v in shards), (command, shards)
        if module == "vitexp":
            check_command_line("config", args, validate)
        else:
            check_command_line("shards", args)
