"""Data beyond memory: WebDataset shards and Hugging Face datasets made here from the CIFAR
subset, read once per sample per epoch over ranks and workers, resumed bitwise mid-epoch; the
JPEG fast path of the one decoder; one line for every kind of bad input."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from tests.helpers import TINY_MODEL, compose_cfg, rows, run_cli  # noqa: E402
from vitexp.commands.evaluate import evaluate_checkpoint  # noqa: E402
from vitexp.commands.shards import write_shards  # noqa: E402
from vitexp.config import validate  # noqa: E402
from vitexp.data import (  # noqa: E402
    BatchTransform,
    Split,
    StreamLoader,
    decode_image,
    decode_jpegs,
    load_cifar10,
    load_hf,
    load_wds,
    make_loader,
)
from vitexp.data.images import UnreadableImage, _decode_pil  # noqa: E402
from vitexp.errors import ConfigError, DataError  # noqa: E402
from vitexp.training import train  # noqa: E402
from vitexp.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

CPU = torch.device("cpu")
PLAIN = BatchTransform(img_size=4, mean=[0.0] * 3, std=[1.0] * 3)


# --------------------------------------------------------------------------- sources made here


def numbered(n: int = 203) -> Split:
    """n 4×4 images whose pixels spell their own index (red: index mod 256, green: index // 256)."""
    idx = torch.arange(n)
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = (idx % 256).to(torch.uint8)[:, None, None]
    images[:, 1] = (idx // 256).to(torch.uint8)[:, None, None]
    return Split(images, idx % 10)


def ids(images: torch.Tensor) -> list[int]:
    """The index an image of `numbered` spells, from the loader's uint8 or float batch."""
    x = images if images.dtype == torch.uint8 else (images * 255).round().to(torch.long)
    return (x[:, 0, 0, 0].long() + 256 * x[:, 1, 0, 0].long()).tolist()


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory) -> Path:
    from vitexp.data import ImageData

    out = tmp_path_factory.mktemp("numbered")
    data = ImageData(numbered(203), numbered(61), [str(i) for i in range(10)])
    write_shards(data, out, shard_size=17, shuffle=False)  # 12 shards, the last one short
    return out


@pytest.fixture(scope="module")
def cifar(cifar_root):
    return load_cifar10(cifar_root, download=False)


@pytest.fixture(scope="module")
def cifar_shards(cifar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar_shards")
    write_shards(cifar, out, shard_size=1000)
    return out


@pytest.fixture(scope="module")
def cifar_hf(cifar, tmp_path_factory) -> Path:
    """The CIFAR subset as a Hugging Face DatasetDict (PNG images, ClassLabel names) on disk."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def table(split: Split) -> datasets.Dataset:
        cells = []
        for x in split.images:
            buffer = io.BytesIO()
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(buffer, "PNG")
            cells.append({"bytes": buffer.getvalue(), "path": None})
        return datasets.Dataset.from_dict({"img": cells, "label": split.labels.tolist()}, features=features)

    out = tmp_path_factory.mktemp("cifar_hf") / "cifar"
    datasets.DatasetDict(train=table(cifar.train), test=table(cifar.test)).save_to_disk(str(out))
    return out


def loader(
    split, *, train: bool, batch: int = 8, rank: int = 0, world: int = 1, workers: int = 0, seed: int = 0
):
    return make_loader(
        split, batch_size=batch, transform=PLAIN, train=train, device=CPU, rank=rank, world_size=world,
        generator=torch.Generator().manual_seed(seed), augment_generator=torch.Generator().manual_seed(1),
        num_workers=workers,
    )  # fmt: skip


# --------------------------------------------------------------------------- the JPEG fast path


def test_the_jpeg_fast_path_gives_pillows_pixels_exactly(cifar):
    """decode_jpeg and Pillow both decode with libjpeg-turbo's defaults (accurate integer IDCT,
    smooth upsampling): the same pixels, bit for bit, for every subsampling, progressive and
    grayscale files, each EXIF orientation, and the conversion to one channel."""
    cases = []
    for i, (quality, subsampling) in enumerate([(75, 0), (90, 1), (95, 2), (50, 2)]):
        img = Image.fromarray(cifar.test.images[i].permute(1, 2, 0).numpy()).resize((61, 47), Image.BICUBIC)
        for orientation in (1, 3, 6, 8):
            exif = Image.Exif()
            exif[0x0112] = orientation
            buffer = io.BytesIO()
            img.save(
                buffer, "JPEG", quality=quality, subsampling=subsampling, exif=exif, progressive=i % 2 == 1
            )
            cases.append(buffer.getvalue())
    buffer = io.BytesIO()
    img.convert("L").save(buffer, "JPEG")
    cases.append(buffer.getvalue())
    for data in cases:
        for channels in (3, 1):
            ours = decode_image(data, channels, "case")
            theirs = _decode_pil(io.BytesIO(data), "case", channels)
            assert torch.equal(ours, theirs)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in cases]
    batched = decode_jpegs(tensors, 3)
    assert all(torch.equal(b, decode_image(d, 3, "x")) for b, d in zip(batched, cases, strict=True))
    # CMYK goes to Pillow (the fast path hands it back), a broken file is named.
    buffer = io.BytesIO()
    img.convert("CMYK").save(buffer, "JPEG")
    cmyk = buffer.getvalue()
    assert decode_jpegs([torch.frombuffer(bytearray(cmyk), dtype=torch.uint8)], 3) == [None]
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(cmyk))).convert("RGB"))
    assert torch.equal(decode_image(cmyk, 3, "c"), torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    with pytest.raises(UnreadableImage, match=r"image shard.tar: sample 7 cannot be read \(OSError"):
        decode_image(cases[0][: len(cases[0]) // 2], 3, "shard.tar: sample 7")


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 1, 8), (2, 2, 8), (3, 2, 5), (2, 4, 16)])
def test_every_sample_of_an_epoch_is_read_once_over_ranks_and_workers(numbered_shards, world, workers, batch):
    """The plan of an epoch, as each (rank, worker) reads it (workers=2 runs the slots in the
    main process here; the next test uses real worker processes): training reads no sample
    twice and leaves out fewer than world × (batch + 1), the same count on every rank;
    evaluation reads every sample exactly once."""
    data = load_wds(str(numbered_shards / "train.json"), str(numbered_shards / "test.json"), image_size=4)
    for split, training, total in ((data.train, True, 203), (data.test, False, 61)):
        seen, steps = [], set()
        for rank in range(world):
            ld = loader(split, train=training, batch=batch, rank=rank, world=world)
            ld.slots = workers
            batches = [ids(x) for x, _ in ld.iter_from(ld.new_order())]
            assert len(batches) == len(ld)
            steps.add(len(batches))
            seen += [i for b in batches for i in b]
        assert len(seen) == len(set(seen))
        if training:
            assert len(steps) == 1 and total - len(seen) < world * (batch + 1)
        else:
            assert sorted(seen) == list(range(total))


def test_worker_processes_and_a_mid_epoch_resume_replay_the_same_batches(numbered_shards):
    """2 ranks × 2 DataLoader workers (kept across epochs): two epochs with different shard
    orders and shuffles; then a fresh loader given the first loader's state replays epoch 2
    from batch 3 bitwise, with 2 workers and with none (the slots come from the state)."""
    data = load_wds(str(numbered_shards / "train.json"), str(numbered_shards / "test.json"), image_size=4,
                    shuffle_buffer=10)  # fmt: skip
    for rank in range(2):
        ld = loader(data.train, train=True, rank=rank, world=2, workers=2)
        assert isinstance(ld, StreamLoader)
        first = [ids(x) for x, _ in ld.iter_from(ld.new_order())]
        order = ld.new_order()
        state = ld.state_dict()
        second = [(x, y) for x, y in ld.iter_from(order)]
        read = [i for batch in first for i in batch]
        assert sorted(read) != read and [ids(x) for x, _ in second] != first
        ld.close()
        for workers in (2, 0):
            again = loader(data.train, train=True, rank=rank, world=2, workers=workers, seed=5)
            again.load_state_dict(state)
            replay = list(again.iter_from(order, 3))
            assert len(replay) == len(second) - 3
            assert all(
                torch.equal(a, b) and torch.equal(c, d)
                for (a, c), (b, d) in zip(replay, second[3:], strict=True)
            )


@pytest.mark.slow
def test_shards_match_the_in_memory_path_where_the_order_is_the_same(cifar, cifar_shards):
    """Test shards are written in order: their eval batches are the in-memory path's, bitwise.
    Training without a shuffle buffer reads the shards' samples in shard order: the in-memory
    loader given that order yields the same augmented batches."""
    data = load_wds(str(cifar_shards / "train.json"), str(cifar_shards / "test.json"), image_size=32,
                    shuffle_buffer=0)  # fmt: skip
    transform = BatchTransform(img_size=32, mean=[0.5] * 3, std=[0.25] * 3, crop_padding=4, hflip=True)

    def build(split, train):
        return make_loader(split, batch_size=100, transform=transform, train=train, device=CPU,
                           generator=torch.Generator().manual_seed(0),
                           augment_generator=torch.Generator().manual_seed(1))  # fmt: skip

    for (x, y), (rx, ry) in zip(build(data.test, False), build(cifar.test, False), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    stream = build(data.train, True)
    order = stream.new_order()
    written = json.loads((cifar_shards / "train.json").read_text())["shardlist"]
    # The shards hold the training images in write_shards' seeded order.
    permutation = torch.randperm(5085, generator=torch.Generator().manual_seed(0))
    starts = np.cumsum([0] + [s["nsamples"] for s in written])
    in_order = torch.cat([permutation[starts[i] : starts[i + 1]] for i in order.tolist()])
    for (x, y), (rx, ry) in zip(
        stream.iter_from(order), build(cifar.train, True).iter_from(in_order), strict=True
    ):
        assert torch.equal(y, ry) and torch.equal(x, rx)


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.slow
def test_a_hugging_face_dataset_in_memory_by_index_and_streamed(cifar, cifar_hf):
    """In memory it is the CIFAR loader's Split, pixel for pixel; by index its batches are the
    in-memory ones; streamed over 2 ranks × 2 slots every test row is scored once."""
    in_memory = load_hf(str(cifar_hf), image_size=32)
    assert in_memory.classes[:2] == ["airplane", "automobile"] and isinstance(in_memory.train, Split)
    assert torch.equal(in_memory.train.images, cifar.train.images)
    assert torch.equal(in_memory.test.labels, cifar.test.labels)
    indexed = load_hf(str(cifar_hf), image_size=32, in_memory=False)
    a, b = (
        loader(indexed.test, train=False, batch=64, workers=1),
        loader(in_memory.test, train=False, batch=64),
    )
    for (x, y), (rx, ry) in zip(a, b, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    streamed = load_hf(str(cifar_hf), image_size=32, streaming=True)
    assert len(streamed.test) == 500
    labels = []
    for rank in range(2):
        ld = loader(streamed.test, train=False, batch=64, rank=rank, world=2)
        ld.slots = 2
        labels += [y for _, y in ld]
    assert sorted(torch.cat(labels).tolist()) == sorted(cifar.test.labels.tolist())


def test_hugging_face_settings_that_cannot_work_are_one_line(cifar_hf, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"dataset.image_column='picture' is not a column of .*\[train\] "
                                          r"\(its columns: img, label\)"):  # fmt: skip
        load_hf(str(cifar_hf), image_column="picture", image_size=32)
    with pytest.raises(
        ConfigError, match=r"dataset.test_split='validation' is not a split of .* \(it has: train, test"
    ):
        load_hf(str(cifar_hf), test_split="validation", image_size=32)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConfigError, match=r"dataset.path=nobody/nothing is neither a local dataset folder nor"
    ):
        load_hf("nobody/nothing", image_size=32)


# --------------------------------------------------------------------------- bad shards


def write_tar(path: Path, samples: list[dict]) -> None:
    from webdataset import TarWriter

    with TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_shards_are_one_line_each_and_skip_leaves_out_only_them(tmp_path, caplog):
    good = [{"__key__": f"s{i}", "png": png(i), "cls": i % 2} for i in range(6)]
    write_tar(tmp_path / "good.tar", good)
    write_tar(tmp_path / "nolabel.tar", [*good[:2], {"__key__": "lost", "png": png(9)}, *good[3:]])
    write_tar(
        tmp_path / "corrupt.tar", [*good[:4], {"__key__": "bad", "jpg": b"\xff\xd8\xff not a jpeg", "cls": 1}]
    )
    missing = str(tmp_path / "missing.tar")
    kw = {"image_size": 4, "num_classes": 2, "shuffle_buffer": 0}
    opened = (
        r"missing.tar \(dataset.train_shards\): the shard cannot be opened .*; fix the shard list, or set"
    )
    with pytest.raises(DataError, match=opened + r" dataset.on_error=skip") as e:
        load_wds([str(tmp_path / "good.tar"), missing], str(tmp_path / "good.tar"), **kw)
    assert "\n" not in str(e.value)
    messages = {
        "nolabel": r"nolabel.tar: sample lost: it has no cls label; fix or replace the shard",
        "corrupt": r"corrupt.tar: sample bad: .*; fix or replace the shard, or set dataset.on_error=skip",
    }
    for shard, message in messages.items():
        data = load_wds(str(tmp_path / f"{shard}.tar"), str(tmp_path / "good.tar"), **kw)
        with pytest.raises(DataError, match=message):
            list(loader(data.train, train=False, batch=3))
        skipping = load_wds(str(tmp_path / f"{shard}.tar"), str(tmp_path / "good.tar"), on_error="skip", **kw)
        with caplog.at_level(logging.WARNING, logger="vitexp.data"):
            batches = [
                (x[:, 0, 0, 0] * 255).round().long().tolist()
                for x, _ in loader(skipping.train, train=False, batch=3)
            ]
        assert sorted(i for b in batches for i in b) == (
            [0, 1, 3, 4, 5] if shard == "nolabel" else [0, 1, 2, 3]
        )
        assert caplog.text.count(f"{shard}.tar: sample") == 1
    with caplog.at_level(logging.WARNING, logger="vitexp.data"):
        data = load_wds(
            [str(tmp_path / "good.tar"), missing], str(tmp_path / "good.tar"), on_error="skip", **kw
        )
    assert len(data.train) == 6 and "skipping shard" in caplog.text and "missing.tar" in caplog.text
    # A shard that disappears after start-up: its samples are named, once.
    index = tmp_path / "index.json"
    index.write_text(
        json.dumps({"shardlist": [{"url": "good.tar", "nsamples": 6}, {"url": "gone.tar", "nsamples": 6}]})
    )
    shutil.copy(tmp_path / "good.tar", tmp_path / "gone.tar")
    data = load_wds(str(index), str(tmp_path / "good.tar"), **kw)
    (tmp_path / "gone.tar").unlink()
    with pytest.raises(DataError, match=r"gone.tar: the shard cannot be opened \(FileNotFoundError"):
        list(loader(data.train, train=False, batch=4))


def test_stream_settings_are_checked_before_anything_is_built(tmp_path):
    common = [
        "dataset=wds",
        "dataset.train_shards=a.json",
        "dataset.test_shards=b.json",
        "dataset.num_classes=2",
    ]
    with pytest.raises(ConfigError, match=r"dataset.val_split=0.1: a streamed dataset cannot hold out"):
        validate(compose_cfg([*common, "dataset.val_split=0.1"]))
    with pytest.raises(ConfigError, match=r"dataset.shuffle_buffer=-1 must not be negative"):
        validate(compose_cfg([*common, "dataset.shuffle_buffer=-1"]))
    with pytest.raises(ConfigError, match=r"dataset.streaming='yes' must be true or false"):
        validate(
            compose_cfg(["dataset=hf", "dataset.path=x", "dataset.num_classes=2", "dataset.streaming=yes"])
        )


# --------------------------------------------------------------------------- training


def _keep_every_checkpoint(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)

    def write(state, path: Path) -> None:
        save_checkpoint(state, path)
        if path.name == "last.pt":
            save_checkpoint(state, folder / f"step{state['progress']['global_step']}.pt")

    return write


@pytest.mark.slow
def test_killed_mid_epoch_a_stream_resumes_with_the_same_batches(numbered_shards, tmp_path):
    """A run over shards with 2 workers and random crops, checkpointing every 4 steps; resuming
    from the mid-epoch checkpoint of step 8 (as after SIGKILL) gives the same losses and the
    same weights, bitwise."""
    common = ["dataset=wds", f"dataset.train_shards={numbered_shards}/train.json",
              f"dataset.test_shards={numbered_shards}/test.json", "dataset.num_classes=10",
              "dataset.num_workers=2", "dataset.shuffle_buffer=20", *TINY_MODEL, "model.img_size=8",
              "model.patch_size=4", "trainer.max_epochs=2", "trainer.batch_size=16", "trainer.progress=false",
              "trainer.sample_figures=false", "trainer.checkpoint_every_steps=4", "trainer.log_every_steps=1",
              "dataset.augment.rrc_scale=[0.5,1.0]"]  # fmt: skip
    kept = tmp_path / "kept"
    train(compose_cfg(common, run_dir=tmp_path / "whole"), write_checkpoint=_keep_every_checkpoint(kept))
    mid = load_checkpoint(kept / "step8.pt")
    assert not mid["progress"]["epoch_complete"] and mid["data"]["slots"] == 2
    train(compose_cfg([*common, f"trainer.resume={kept}/step8.pt"], run_dir=tmp_path / "resumed"))
    ours, theirs = (load_checkpoint(tmp_path / d / "last.pt") for d in ("resumed", "whole"))
    assert ours["progress"]["global_step"] == theirs["progress"]["global_step"] == 24
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    losses = {r["step"]: r["train/loss"] for r in rows(tmp_path / "whole") if "train/loss" in r}
    assert [(r["step"], r["train/loss"]) for r in rows(tmp_path / "resumed") if "train/loss" in r] == [
        (s, v) for s, v in losses.items() if s > 8
    ]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["wds", "hf"])
def test_the_command_line_trains_on_converted_cifar_and_evaluates_all_500(
    source, cifar_root, cifar_hf, tmp_path
):
    """The issue's commands, with the shards command itself converting the CIFAR subset."""
    if source == "wds":
        made = tmp_path / "shards"
        result = run_cli("dataset=cifar10", f"dataset.root={cifar_root}", f"out={made}", "shard_size=2000",
                         module="vitexp.shards")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(p.name for p in made.glob("*.tar")) == [
            "test-000000.tar",
            *(f"train-00000{i}.tar" for i in range(3)),
        ]
        dataset = [
            "dataset=wds",
            f"dataset.train_shards={made}/train.json",
            f"dataset.test_shards={made}/test.json",
        ]
    else:
        dataset = ["dataset=hf", f"dataset.path={cifar_hf}", "dataset.in_memory=false"]
    run_dir = tmp_path / "run"
    settings = ["dataset.num_classes=10", "model=vit_ti4", "model.img_size=32", *TINY_MODEL,
                "trainer.max_epochs=1", "trainer.batch_size=256", "dataset.num_workers=1",
                "trainer.sample_figures=false"]  # fmt: skip
    result = run_cli(*dataset, *settings, f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = evaluate_checkpoint(run_dir / "last.pt", output=tmp_path / "eval.json", device="cpu")
    assert report["num_samples"] == 500
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report["acc1"] == summary["final"]["val/acc1"]


# --------------------------------------------------------------------------- 2 gloo processes × 2 workers


def _ddp_args(dataset: list[str], run_dir: Path) -> list[str]:
    return [*dataset, "dataset.num_classes=10", "dataset.num_workers=2", *TINY_MODEL, "model.img_size=8",
            "model.patch_size=4", "trainer.max_epochs=2", "trainer.batch_size=16", "trainer.progress=false",
            "trainer.sample_figures=false", "trainer.log_every_steps=1", "trainer.checkpoint_every_steps=2",
            "dataset.augment.rrc_scale=[0.5,1.0]", f"hydra.run.dir={run_dir}"]  # fmt: skip


@pytest.mark.ddp
def test_two_gloo_processes_with_two_workers_each_train_on_shards(numbered_shards, tmp_path):
    from tests.test_distributed import torchrun

    dataset = ["dataset=wds", f"dataset.train_shards={numbered_shards}/train.json",
               f"dataset.test_shards={numbered_shards}/test.json", "dataset.shuffle_buffer=20"]  # fmt: skip
    run_dir = tmp_path / "ddp"
    result = torchrun(*_ddp_args(dataset, run_dir), "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    # 203 samples: 101 per rank, 8 per rank and step: 12 steps (5 samples left out on each rank).
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(1, 13))
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["data"]["slots"] == 2
    report = evaluate_checkpoint(run_dir / "last.pt", output=tmp_path / "eval.json", device="cpu")
    assert report["num_samples"] == 61
    assert report["acc1"] == json.loads((run_dir / "summary.json").read_text())["final"]["val/acc1"]


@pytest.mark.ddp
@pytest.mark.signals
@pytest.mark.parametrize("source", ["wds", "hf"])
def test_sigkill_under_ddp_and_resume_replays_the_stream_exactly(source, numbered_shards, tmp_path):
    """2 processes × 2 workers, killed with SIGKILL mid-epoch 2 (no chance to save): resuming
    from the last periodic checkpoint gives the uninterrupted run's losses and weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO
    from tests.test_distributed import torchrun

    if source == "wds":
        shards = [
            f"dataset.train_shards={numbered_shards}/train.json",
            f"dataset.test_shards={numbered_shards}/test.json",
        ]
        dataset = ["dataset=wds", *shards, "dataset.shuffle_buffer=20"]
    else:
        hf_dir = tmp_path / "hf"
        for name, split in (("train", numbered(203)), ("test", numbered(61))):
            cells = []
            for x in split.images:
                buffer = io.BytesIO()
                Image.fromarray(x.permute(1, 2, 0).numpy()).save(buffer, "PNG")
                cells.append({"bytes": buffer.getvalue(), "path": None})
            features = datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
            )
            table = datasets.Dataset.from_dict(
                {"image": cells, "label": split.labels.tolist()}, features=features
            )
            table.to_parquet(str(hf_dir / "data" / f"{name}-00000-of-00001.parquet"))
        dataset = [
            "dataset=hf",
            f"dataset.path={hf_dir}",
            "dataset.streaming=true",
            "dataset.shuffle_buffer=20",
        ]
    cache = {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}  # load_dataset caches what it reads
    reference = tmp_path / "reference"
    assert torchrun(*_ddp_args(dataset, reference), env=cache).returncode == 0
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "vitexp", *_ddp_args(dataset, run_dir)]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **cache}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and '"step": 17,' in metrics.read_text():
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["progress"]["epoch"] == 2 and not ckpt["progress"]["epoch_complete"]
    resumed = torchrun(*_ddp_args(dataset, run_dir), "trainer.resume=auto", env=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, theirs = (
        load_checkpoint(run_dir / "last.pt")["model"],
        load_checkpoint(reference / "last.pt")["model"],
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [(r["step"], r["train/loss"]) for r in rows(run_dir) if "train/loss" in r] == [
        (r["step"], r["train/loss"]) for r in rows(reference) if "train/loss" in r
    ]


@pytest.mark.slow
def test_the_decode_benchmark_reports_both_decoders(cifar_root, tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "decode.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--quick", "--workers", "1", "--root", str(cifar_root),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| workers | decoder" in result.stdout and "machine:" in result.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"pil/1", "torchvision/1", "torchvision-batch/1"}
    assert all(r["images_per_s"] > 0 for r in results.values())


def test_jpegs_left_for_the_training_device_decode_to_the_same_batches(cifar, tmp_path, caplog):
    """decode_on="device": workers hand over JPEG bytes and the training process decodes each
    batch with one decode_jpegs call (nvJPEG on a GPU; here the CPU, where the pixels are the
    workers' own). Image folders and shards alike; a corrupt JPEG is still named, or skipped."""
    from vitexp.data import ImageData, load_imagefolder

    train_part = Split(cifar.train.images[:40], cifar.train.labels[:40])
    small = ImageData(train_part, Split(cifar.test.images[:30], cifar.test.labels[:30]), cifar.classes)
    write_shards(small, tmp_path / "shards", shard_size=16, fmt="jpg", quality=80)
    for label in range(2):
        (tmp_path / "folder" / "train" / f"c{label}").mkdir(parents=True)
        (tmp_path / "folder" / "val" / f"c{label}").mkdir(parents=True)
    for i, x in enumerate(cifar.test.images[:20]):
        img = Image.fromarray(x.permute(1, 2, 0).numpy())
        img.save(tmp_path / "folder" / "train" / f"c{i % 2}" / f"{i}.jpg", quality=85)
        img.save(tmp_path / "folder" / "val" / f"c{i % 2}" / f"{i}.png")  # PNGs stay with the workers
    (tmp_path / "folder" / "train" / "c1" / "99.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    shards = load_wds(str(tmp_path / "shards" / "train.json"), str(tmp_path / "shards" / "test.json"),
                      image_size=24, shuffle_buffer=8)  # fmt: skip
    folder = load_imagefolder(tmp_path / "folder", image_size=24, on_error="skip")
    transform = BatchTransform(img_size=24, mean=[0.5] * 3, std=[0.25] * 3, rrc_scale=[0.5, 1.0], hflip=True)
    for split in (shards.train, shards.test, folder.train, folder.test):
        runs = []
        for decode_on in ("workers", "device"):
            generators = {"generator": torch.Generator().manual_seed(0),
                          "augment_generator": torch.Generator().manual_seed(1)}  # fmt: skip
            ld = make_loader(split, batch_size=8, transform=transform, train=True, device=CPU,
                             num_workers=1, decode_on=decode_on, **generators)  # fmt: skip
            assert ld.defer_jpegs == (decode_on == "device")
            with caplog.at_level(logging.WARNING, logger="vitexp.data"):
                runs.append(list(ld))
            ld.close()
        assert len(runs[0]) == len(runs[1]) > 0
        for (x, y), (rx, ry) in zip(*runs, strict=True):
            assert torch.equal(y, ry) and torch.equal(x, rx)
    assert "99.jpg" in caplog.text  # skipped in both modes
    strict = load_imagefolder(tmp_path / "folder", image_size=24)
    ld = make_loader(
        strict.train, batch_size=21, transform=transform, train=False, device=CPU, decode_on="device"
    )
    with pytest.raises(DataError, match=r"cannot read image .*99.jpg \(.*\); fix or remove it"):
        list(ld)
    with pytest.raises(ConfigError, match=r"decode_on='gpu' is not one of workers, device, auto"):
        make_loader(strict.train, batch_size=4, transform=transform, train=False, device=CPU, decode_on="gpu")
