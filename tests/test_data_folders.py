"""Image folders: listing, unreadable files mid-epoch, and DataLoader workers kept alive
across epochs without changing a batch (so resume stays exact)."""

from __future__ import annotations

import gc
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import TINY_MODEL, compose_cfg
from vitexp.data import BatchTransform, FolderLoader, load_imagefolder, make_loader
from vitexp.data.datasets import DatasetNotFound
from vitexp.errors import ConfigError, DataError
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def image_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (20, 16)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                pixels = rng.integers(0, 256, (size[1] + i, size[0], 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def transform(**augment) -> BatchTransform:
    return BatchTransform(img_size=8, mean=[0.5] * 3, std=[0.25] * 3, **augment)


def test_listing_and_its_errors(tmp_path):
    root = image_folder(tmp_path / "images")
    data = load_imagefolder(root, image_size=8)
    assert data.classes == ["class0", "class1"] and len(data.train) == 12 and len(data.test) == 4
    assert data.train.labels.dtype == torch.int64 and data.train.labels.tolist() == [0] * 6 + [1] * 6
    with pytest.raises(
        DatasetNotFound, match=r"image folder .*nowhere/train does not exist; set dataset.root"
    ):
        load_imagefolder(tmp_path / "nowhere")
    assert issubclass(DatasetNotFound, ConfigError)
    with pytest.raises(ConfigError, match=r"dataset.on_error='ignore' must be fail or skip"):
        load_imagefolder(root, on_error="ignore")
    with pytest.raises(ConfigError, match=r"dataset.in_channels=4"):
        load_imagefolder(root, in_channels=4)
    (root / "val" / "class9").mkdir()
    with pytest.raises(DataError, match=r"val has class folders the training set lacks: class9"):
        load_imagefolder(root)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(
        DataError, match=r"no images found under .*empty/train: expected one folder per class"
    ):
        load_imagefolder(tmp_path / "empty")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_unreadable_image_mid_epoch_is_named(tmp_path, num_workers):
    root = image_folder(tmp_path / "images")
    (root / "train" / "class1" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = load_imagefolder(root, image_size=8)
    assert data.train.paths[-1].endswith("9_broken.png")
    loader = make_loader(data.train, batch_size=4, transform=transform(), train=False, device=CPU,
                         num_workers=num_workers)  # fmt: skip
    before = {p.pid for p in multiprocessing.active_children()}
    batches = loader.iter_from(loader.new_order())
    assert [len(next(batches)[1]) for _ in range(3)] == [4, 4, 4]  # read fine until the broken file's batch
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == num_workers
    with pytest.raises(DataError, match=r"cannot read image .*class1/9_broken.png \(.*\); fix or remove it, "
                                        r"or set dataset.on_error=skip") as e:  # fmt: skip
        next(batches)
    assert "\n" not in str(e.value)
    # The workers stop with the error, though its traceback (kept in `e`) holds the iteration:
    # left to the garbage collector, torch's shutdown would wait 5 s for each.
    assert not workers & {p.pid for p in multiprocessing.active_children()}


def test_a_loader_let_go_stops_its_workers_at_once(tmp_path):
    """No reference cycle keeps a loader with persistent workers alive: dropping the last
    reference stops them, with the garbage collector off (it would close the workers' queues
    before torch's shutdown could tell them to stop, which then waits 5 s for each)."""
    data = load_imagefolder(image_folder(tmp_path / "images"), image_size=8)
    loader = make_loader(
        data.train, batch_size=4, transform=transform(), train=False, device=CPU, num_workers=2
    )
    before = {p.pid for p in multiprocessing.active_children()}
    assert len(list(loader)) == 3
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2  # persistent: alive after the epoch
    gc.disable()
    try:
        del loader
        assert not workers & {p.pid for p in multiprocessing.active_children()}
    finally:
        gc.enable()


def test_unreadable_images_can_be_skipped_and_a_whole_bad_batch_is_named(tmp_path, caplog):
    root = image_folder(tmp_path / "images")
    broken = root / "train" / "class1" / "9_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    data = load_imagefolder(root, image_size=8, on_error="skip")
    loader = make_loader(data.train, batch_size=13, transform=transform(), train=False, device=CPU)
    with caplog.at_level(logging.WARNING, logger="vitexp.data"):
        ((_, y),) = list(loader)
    assert len(y) == 12 and "skipping unreadable image" in caplog.text and "9_broken.jpg" in caplog.text
    # A file that was listed and has gone since is reported like an unreadable one.
    (root / "train" / "class0" / "0.png").unlink()
    only_bad = data.train.subset(torch.tensor([0, 12]))
    with pytest.raises(
        DataError, match=r"no image of a whole batch could be read \(e.g. .*0.png: the file no longer"
    ):
        list(make_loader(only_bad, batch_size=2, transform=transform(), train=False, device=CPU))


def _epochs(loader: FolderLoader, generator_seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Three epochs the way a run that was interrupted and resumed iterates: epoch 1 in full,
    epoch 2 abandoned after one batch and then replayed from batch 1 of the same order (as a
    resumed run does), epoch 3 in full."""
    loader.generator.manual_seed(generator_seed)
    loader.augment_generator.manual_seed(generator_seed + 1)
    out = [list(loader.iter_from(loader.new_order()))]
    order = loader.new_order()
    partial = loader.iter_from(order)
    first = next(partial)
    del partial  # abandoned mid-epoch with batches still in flight
    out.append([first, *loader.iter_from(order, start=1)])
    out.append(list(loader.iter_from(loader.new_order())))
    return out


def test_persistent_workers_serve_every_epoch_with_the_same_batches(tmp_path):
    data = load_imagefolder(image_folder(tmp_path / "images", per_class=10), image_size=8)

    def loader(num_workers: int, persistent: bool) -> FolderLoader:
        return make_loader(data.train, batch_size=4, transform=transform(rrc_scale=[0.3, 1.0], hflip=True),
                           train=True, device=CPU, generator=torch.Generator(),
                           augment_generator=torch.Generator(), num_workers=num_workers,
                           persistent_workers=persistent)  # fmt: skip

    reference = _epochs(loader(0, persistent=False), 7)
    kept = loader(2, persistent=True)
    before = {p.pid for p in multiprocessing.active_children()}
    list(kept)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2  # still alive after the epoch ended
    epochs = _epochs(kept, 7)
    assert {p.pid for p in multiprocessing.active_children()} - before == workers  # the same two served all
    for ours, theirs in zip(epochs, reference, strict=True):
        assert len(ours) == len(theirs) == 5
        for (x, y), (rx, ry) in zip(ours, theirs, strict=True):
            assert torch.equal(y, ry) and torch.equal(x, rx)
    assert not torch.equal(epochs[0][0][1], epochs[2][0][1])  # and the order did change per epoch
    # An iteration opened while another is still running gets its own DataLoader.
    outer = kept.iter_from(kept.new_order())
    next(outer)
    inner = list(kept.iter_from(torch.arange(20)))
    assert torch.cat([y for _, y in inner]).tolist() == data.train.labels[:20].tolist()
    assert len(list(outer)) == 4
    kept.close()
    assert not workers & {p.pid for p in multiprocessing.active_children()}


@pytest.mark.slow
def test_resume_on_an_image_folder_with_persistent_workers_is_exact(tmp_path):
    """Through the training loop: a 3-epoch run whose workers (train and eval) serve every
    epoch, against a resume from its epoch-1 checkpoint with workers started afresh, random
    crops and flips on top. (A mid-epoch replay is checked at the loader above.)"""
    root = image_folder(tmp_path / "images")
    common = ["dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=2", "dataset.num_workers=1",
              *TINY_MODEL, "model.img_size=8", "model.patch_size=4", "trainer.max_epochs=3",
              "trainer.batch_size=4", "trainer.progress=false", "trainer.sample_figures=false",
              "trainer.save_every_epoch=true"]  # fmt: skip
    train(compose_cfg(common, run_dir=tmp_path / "whole"))
    resumed = compose_cfg(
        [*common, f"trainer.resume={tmp_path}/whole/epoch1.pt"], run_dir=tmp_path / "resumed"
    )
    train(resumed)
    ours, theirs = (load_checkpoint(tmp_path / d / "last.pt") for d in ("resumed", "whole"))
    assert ours["progress"]["global_step"] == theirs["progress"]["global_step"] == 9
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    first = load_checkpoint(tmp_path / "whole" / "epoch1.pt")["model"]
    assert not all(torch.equal(first[k], theirs["model"][k]) for k in first)  # it did train on
