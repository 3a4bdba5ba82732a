"""Datasets read into memory, batched augmentation, and the loaders."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitexp.data import (
    BatchTransform,
    DeviceLoader,
    Split,
    carve_validation,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fake,
)
from vitexp.errors import ConfigError, DataError


def test_cifar10_subset_reads_every_image(cifar_root):
    data = load_cifar10(cifar_root, download=False)
    assert data.train.images.shape == (5085, 3, 32, 32)
    assert data.test.images.shape == (500, 3, 32, 32)
    assert data.train.images.dtype == torch.uint8
    assert data.classes[0] == "airplane" and data.num_classes == 10
    assert set(data.train.labels.unique().tolist()) == set(range(10))
    # Row-major layout: 1024 red, then green, then blue values per image.
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert torch.equal(data.test.images[3].flatten(), torch.from_numpy(np.asarray(raw["data"][3])))
    assert data.test.labels[:10].tolist() == raw["labels"][:10]


def test_digits_split_is_fixed_and_stratified():
    a, b = load_digits(), load_digits()
    assert len(a.train) == 1437 and len(a.test) == 360
    assert torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.shape[1:] == (1, 8, 8)
    assert a.train.images.max() > 200  # rescaled from 0..16 to 0..255
    counts = torch.bincount(a.test.labels)
    assert counts.min() >= 35


def test_fake_data_is_deterministic():
    a, b = load_fake(num_train=8, num_test=4, seed=3), load_fake(num_train=8, num_test=4, seed=3)
    assert torch.equal(a.train.images, b.train.images)
    assert a.train.images.shape == (8, 3, 32, 32)


def test_missing_dataset_offline_says_what_to_do(tmp_path):
    with pytest.raises(
        ConfigError, match=r"cifar10 not found: expected .*cifar-10-batches-py.*dataset.root"
    ) as e:
        load_cifar10(tmp_path, download=False)
    assert "\n" not in str(e.value)


def test_download_failure_names_the_archive_and_the_folder(tmp_path, monkeypatch):
    """The code path a user with a network takes, with torchvision's download made to fail
    as it does without a network (no real network is touched)."""
    import urllib.error

    import torchvision.datasets

    calls = []

    def no_network(self, *args, **kwargs):
        calls.append(kwargs)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "__init__", no_network)
    with pytest.raises(
        ConfigError, match=r"could not download cifar100 .*cifar-100-python.tar.gz.*dataset.root="
    ):
        load_cifar100(tmp_path, download=True)
    assert calls and calls[0]["download"] is True and calls[0]["root"] == str(tmp_path)


def test_download_is_skipped_when_the_folder_exists(cifar_root, monkeypatch):
    import torchvision.datasets

    def fail(*args, **kwargs):
        raise AssertionError("torchvision must not be asked to download an existing dataset")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", fail)
    assert len(load_cifar10(cifar_root, download=True).test) == 500


def _copy_subset(cifar_root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_root / "cifar-10-batches-py", target)
    return target


def test_truncated_batch_is_named(cifar_root, tmp_path):
    folder = _copy_subset(cifar_root, tmp_path)
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"data_batch_3 is truncated or corrupt") as e:
        load_cifar10(tmp_path, download=False)
    assert "\n" not in str(e.value)


def test_missing_batch_is_named(cifar_root, tmp_path):
    folder = _copy_subset(cifar_root, tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py is incomplete: missing test_batch"):
        load_cifar10(tmp_path, download=False)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_batch_that_would_run_code_is_refused(cifar_root, tmp_path):
    folder = _copy_subset(cifar_root, tmp_path)
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": exploit, "labels": []}, f)
    with pytest.raises(DataError, match=r"data_batch_1 is not a plain CIFAR batch: it asks to load") as e:
        load_cifar10(tmp_path, download=False)
    assert not marker.exists()
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- augmentation


def _images(n=6, c=3, size=8):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8)


def _transform(**kw):
    return BatchTransform(img_size=kw.pop("img_size", 8), mean=[0.0] * 3, std=[1.0] * 3, **kw)


def test_eval_path_normalises_and_resizes():
    x = _images()
    out = BatchTransform(img_size=8, mean=[0.5] * 3, std=[0.25] * 3).eval(x)
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    big = _transform(img_size=16).eval(x)
    assert big.shape == (6, 3, 16, 16)


def test_padded_crop_is_an_exact_shift_with_black_padding():
    x = _images(n=64)
    g = torch.Generator().manual_seed(0)
    out = _transform(crop_padding=2).train(x, g)
    xf = x.float() / 255
    padded = F.pad(xf, (2, 2, 2, 2))
    # Every output must be one of the 25 integer shifts of its input, exactly.
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.allclose(out[i], padded[i, :, dy : dy + 8, dx : dx + 8], atol=1e-6)
        ]
        assert len(hits) >= 1, f"sample {i} is not an integer shift"
    assert not torch.allclose(out, xf)  # and it is random


def test_flip_flips_about_half_the_batch():
    x = _images(n=200)
    out = _transform(hflip=True).train(x, torch.Generator().manual_seed(1))
    xf = x.float() / 255
    flipped = torch.tensor([torch.allclose(o, i.flip(-1), atol=1e-6) for o, i in zip(out, xf, strict=True)])
    kept = torch.tensor([torch.allclose(o, i, atol=1e-6) for o, i in zip(out, xf, strict=True)])
    assert (flipped | kept).all()
    assert 60 < flipped.sum() < 140


def test_random_resized_crop_gives_model_resolution_and_varies():
    x = _images(n=16, size=32)
    out = _transform(img_size=48, rrc_scale=[0.2, 1.0]).train(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 48, 48)
    assert out.min() >= 0 and out.max() <= 1


def test_augmentation_is_reproducible_from_the_generator():
    x = _images(n=16)
    t = _transform(crop_padding=2, hflip=True)
    a = t.train(x, torch.Generator().manual_seed(5))
    b = t.train(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_bad_rrc_scale():
    with pytest.raises(ConfigError, match="rrc_scale"):
        _transform(rrc_scale=[0.5, 0.1])


# --------------------------------------------------------------------------- loaders


def _split(n: int) -> Split:
    return Split(_images(n=n), torch.arange(n))


def test_eval_loader_visits_every_sample_once_including_the_short_last_batch():
    loader = DeviceLoader(_split(10), batch_size=4, transform=_transform(), train=False)
    labels = torch.cat([y for _, y in loader])
    assert len(loader) == 3
    assert labels.tolist() == list(range(10))


def test_train_loader_shuffles_and_drops_the_short_batch():
    loader = DeviceLoader(_split(10), batch_size=4, transform=_transform(), train=True,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    epoch1 = [y for _, y in loader]
    epoch2 = [y for _, y in loader]
    assert len(loader) == 2 and all(len(y) == 4 for y in epoch1)
    assert len(set(torch.cat(epoch1).tolist())) == 8
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))


def test_validation_split_is_disjoint_and_fixed():
    split = _split(100)
    train, val = carve_validation(split, 0.1, seed=0)
    _, val2 = carve_validation(split, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert not set(train.labels.tolist()) & set(val.labels.tolist())
    assert torch.equal(val.labels, val2.labels)
    with pytest.raises(ConfigError, match="val_split"):
        carve_validation(split, 1.5)
