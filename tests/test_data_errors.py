"""Bad datasets stop when they are loaded, in one line: a setting to change is a ConfigError,
an unusable file (corrupt, truncated, incomplete, code-running, labels outside the classes) a
DataError naming it."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vitexp.data import (
    BatchTransform,
    FileSplit,
    ImageData,
    Split,
    carve_validation,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fake,
)
from vitexp.data.datasets import DatasetNotFound
from vitexp.errors import ConfigError, DataError


def write_batch(path: Path, n: int, labels: list[int] | None = None, key: str = "labels", **extra) -> None:
    rng = np.random.default_rng(len(path.name))
    batch = {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        key: labels or [i % 10 for i in range(n)],
    }
    with path.open("wb") as f:
        pickle.dump({**batch, **extra}, f)


def cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        write_batch(folder / name, n)
    return folder


def cifar100(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        write_batch(folder / name, n, [i * 30 for i in range(n)], key="fine_labels")
    return folder


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_small_cifar_folder_loads(tmp_path):
    cifar10(tmp_path)
    data = load_cifar10(tmp_path, download=False)
    assert data.train.images.shape == (20, 3, 32, 32) and data.train.labels.dtype == torch.int64
    assert data.classes == [str(i) for i in range(10)]  # no batches.meta: numbered classes
    cifar100(tmp_path)
    assert load_cifar100(tmp_path, download=False).test.labels.tolist() == [0, 30, 60, 90]


def test_a_missing_folder_is_a_setting(tmp_path):
    with pytest.raises(
        DatasetNotFound, match=r"cifar100 not found: expected .*cifar-100-python/; set dataset.root"
    ):
        load_cifar100(tmp_path, download=False)
    assert issubclass(DatasetNotFound, ConfigError)


def test_an_incomplete_folder_names_what_is_missing(tmp_path):
    folder = cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(
        DataError, match=r"cifar-10-batches-py is incomplete: missing data_batch_4, test_batch"
    ) as e:
        load_cifar10(tmp_path, download=True)  # an existing folder is never downloaded over
    one_line(e)
    folder = cifar100(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(DataError, match=r"cifar-100-python is incomplete: missing test"):
        load_cifar100(tmp_path, download=False)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:200]), r"data_batch_2 is truncated or corrupt \("),
        (lambda p: p.write_bytes(b""), r"data_batch_2 is truncated or corrupt \(EOFError"),
        (lambda p: p.write_bytes(b"\x80\x04garbage"), r"data_batch_2 is truncated or corrupt \("),
        (
            lambda p: p.write_bytes(pickle.dumps([1, 2, 3])),
            r"data_batch_2 is not a CIFAR batch \(it holds a list\)",
        ),
        (
            lambda p: p.write_bytes(pickle.dumps({"data": []})),
            r"data_batch_2 is truncated or corrupt \(no 'data' or",
        ),
        (lambda p: write_batch(p, 3, labels=[1, 2]), r"data_batch_2: 3 images but 2 labels"),
        (
            lambda p: p.write_bytes(pickle.dumps({"data": np.zeros(100, np.uint8), "labels": [0]})),
            r"data_batch_2 is truncated or corrupt \(bad 'data' or 'labels'",
        ),
    ],
    ids=["truncated", "empty", "garbage", "not_a_dict", "no_labels", "label_count", "bad_shape"],
)
def test_a_damaged_batch_is_named(tmp_path, damage, message):
    folder = cifar10(tmp_path)
    damage(folder / "data_batch_2")
    with pytest.raises(DataError, match=message) as e:
        load_cifar10(tmp_path, download=False)
    assert str(folder / "data_batch_2") in one_line(e)


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["test_batch", "batches.meta"])
def test_a_batch_that_asks_for_code_is_refused_unrun(tmp_path, name):
    folder = cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with (folder / name).open("wb") as f:
        pickle.dump({"data": _Touch(marker), "labels": [0], "label_names": _Touch(marker)}, f)
    with pytest.raises(
        DataError, match=rf"{name} is not a plain CIFAR batch: it asks to load pathlib\."
    ) as e:
        load_cifar10(tmp_path, download=False)
    one_line(e)
    assert not marker.exists()


def test_labels_outside_the_classes_name_the_file_and_the_label(tmp_path):
    folder = cifar10(tmp_path)
    write_batch(folder / "data_batch_3", 4, labels=[1, 2, 10, 11])
    with pytest.raises(
        DataError, match=r"data_batch_3: label 10 \(image 2\) is outside the 10 classes 0..9"
    ) as e:
        load_cifar10(tmp_path, download=False)
    one_line(e)
    folder = cifar100(tmp_path)
    write_batch(folder / "test", 2, labels=[5, -1], key="fine_labels")
    with pytest.raises(
        DataError, match=r"cifar-100-python/test: label -1 \(image 1\) is outside the 100 classes"
    ):
        load_cifar100(tmp_path, download=False)


def test_a_meta_file_with_the_wrong_class_list_is_named(tmp_path):
    folder = cifar10(tmp_path)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": ["cat", "dog"]}, f)
    with pytest.raises(
        DataError, match=r"batches.meta is corrupt: 'label_names' is not a list of 10 class names"
    ):
        load_cifar10(tmp_path, download=False)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    assert load_cifar10(tmp_path, download=False).classes[3] == "c3"


def _split(n: int = 4, labels: torch.Tensor | None = None) -> Split:
    return Split(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n) if labels is None else labels)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            _split(labels=torch.tensor([0, 1, 5, 2])),
            r"the train split: label 5 \(image 2\) is outside the 4 classes 0..3",
        ),
        (_split(labels=torch.tensor([0, -2, 1, 2])), r"the train split: label -2 \(image 1\) is outside"),
        (
            _split(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])),
            r"the train split: the labels are torch.float32 \(4,\)",
        ),
        (_split(labels=torch.tensor([0, 1, 2], dtype=torch.long)), r"the train split: 4 images but 3 labels"),
        (
            Split(torch.zeros(4, 3, 2, 2), torch.arange(4)),
            r"the train split: the images are torch.float32 \(4, 3, 2, 2\)",
        ),
        (
            Split(torch.zeros(4, 2, 2, dtype=torch.uint8), torch.arange(4)),
            r"vitexp needs uint8 \(N, C, H, W\)",
        ),
        (FileSplit(["a.png"], torch.tensor([7]), (8, 8)), r"the train split: label 7 \(image 0\) is outside"),
        (FileSplit(["a.png", "b.png"], torch.tensor([0]), (8, 8)), r"the train split: 2 images but 1 labels"),
    ],
    ids=["too_big", "negative", "float", "count", "float_images", "three_dims", "files", "file_count"],
)
def test_image_data_checks_its_splits_when_it_is_made(train, message):
    with pytest.raises(DataError, match=message) as e:
        ImageData(train, _split(), ["a", "b", "c", "d"])
    one_line(e)


def test_the_test_split_is_checked_too_and_the_loaders_pass():
    with pytest.raises(DataError, match=r"the test split: label 4 \(image 0\)"):
        ImageData(_split(), _split(labels=torch.tensor([4, 0, 0, 0])), ["a", "b", "c", "d"])
    assert ImageData(_split(0), _split(0), []).num_classes == 0  # empty splits are fine here
    assert load_digits().num_classes == 10 and len(load_fake(8, 4, 4, num_classes=3).train) == 8


def test_settings_that_cannot_work_are_config_errors():
    with pytest.raises(ConfigError, match=r"dataset.val_split=1.5 must be between 0 and 1"):
        carve_validation(_split(), 1.5)
    with pytest.raises(ConfigError, match=r"dataset.val_split=0.9 holds out all 4 training images"):
        carve_validation(_split(), 0.9)
    with pytest.raises(ConfigError, match=r"dataset.load.num_classes=0 must be an integer >= 1"):
        load_fake(num_classes=0)
    with pytest.raises(ConfigError, match=r"test_fraction=1.2 must be between 0 and 1"):
        load_digits(test_fraction=1.2)
    kw = {"img_size": 4, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ConfigError, match=r"rrc_scale=\[0.5, 0.1\] must be \[low, high\]"):
        BatchTransform(**kw, rrc_scale=[0.5, 0.1])
    with pytest.raises(ConfigError, match=r"rrc_ratio=\[0.0, 1.0\]"):
        BatchTransform(**kw, rrc_ratio=[0.0, 1.0])
    with pytest.raises(ConfigError, match=r"crop_padding=-1 must not be negative"):
        BatchTransform(**kw, crop_padding=-1)
    with pytest.raises(ConfigError, match=r"dataset.mean has 3 values and dataset.std 1"):
        BatchTransform(img_size=4, mean=[0.5] * 3, std=[0.5])
    with pytest.raises(ConfigError, match=r"dataset.std=\[0.5, 0.0, 0.5\] must be positive"):
        BatchTransform(img_size=4, mean=[0.5] * 3, std=[0.5, 0.0, 0.5])
    with pytest.raises(ConfigError, match=r"dataset.mean/std have 3 channels but the images have 1"):
        BatchTransform(**kw).eval(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
