"""The commonest first-run mistakes end in one line and the exit status of their kind: an error
raised while a config is built is wrapped with its context (`errors.with_context`), never
rebuilt from its class, which breaks for errors whose constructor takes other arguments."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import compose_cfg, run_cli
from vitexp.cli import run_job
from vitexp.config import instantiate_group
from vitexp.data.datasets import DatasetNotFound
from vitexp.data.images import UnreadableImage
from vitexp.errors import ConfigError, DataError, TrainingDiverged, VitexpError, first_line, with_context
from vitexp.training import train


def _train_split_only(root: Path) -> Path:
    """An image folder with train/ and no val/ split."""
    for label, color in enumerate(("red", "blue")):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), color).save(folder / f"{i}.png")
    return root


MISTAKES = {
    "image folder without val/": (
        lambda tmp: ["dataset=imagefolder", f"dataset.root={_train_split_only(tmp / 'images')}"],
        "error: dataset: image folder {tmp}/images/val does not exist",
    ),
    "wrong dataset.root": (
        lambda tmp: ["dataset=imagefolder", f"dataset.root={tmp / 'nowhere'}"],
        "error: dataset: image folder {tmp}/nowhere/train does not exist",
    ),
    "CIFAR missing, download=false": (
        lambda tmp: ["dataset=cifar10", f"dataset.root={tmp}", "dataset.download=false"],
        "error: dataset: cifar10 not found: expected {tmp}/cifar-10-batches-py/",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_first_run_mistake_is_one_line_and_exit_status_2(mistake, tmp_path, caplog, monkeypatch):
    """Through the error handler every command shares (`cli.run_job`), in this process."""
    monkeypatch.delenv("VITEXP_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    overrides, start = MISTAKES[mistake]
    cfg = compose_cfg([*overrides(tmp_path), "dataset.num_classes=2"], run_dir=tmp_path / "run")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run_job(train, cfg)
    assert exit_.value.code == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    line = record.getMessage()
    assert line.startswith(start.format(tmp=tmp_path)) and "\n" not in line, line
    assert record.exc_info is None  # no traceback


@pytest.mark.slow
def test_an_image_folder_without_val_through_the_command_line(tmp_path):
    root = _train_split_only(tmp_path / "images")
    run_dir = tmp_path / "run"
    result = run_cli(
        "dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=2", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 2
    output = (result.stdout + result.stderr).splitlines()
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = [line for line in output if "error" in line.lower()]
    assert f"error: dataset: image folder {root}/val does not exist; set dataset.root" in line, line


# --------------------------------------------------------------------------- wrapping


def raise_error(kind: str) -> None:
    """A test-only `_target_`: raises a vitexp error whose class takes other arguments."""
    if kind == "data":
        raise UnreadableImage("x.png", "truncated")
    raise DatasetNotFound("cifar10 not found", dataset="cifar10", folder=Path("/nowhere"))


@pytest.mark.parametrize(("kind", "error", "code"), [("data", DataError, 3), ("config", ConfigError, 2)])
def test_instantiate_group_wraps_an_error_with_its_context_and_keeps_its_kind(kind, error, code):
    node = {"_target_": "tests.test_first_run_errors.raise_error", "kind": kind}
    with pytest.raises(error) as caught:
        instantiate_group("dataset.load", node, label="dataset")
    assert caught.value.exit_code == code
    assert str(caught.value).startswith("dataset: ") and str(caught.value.__cause__) in str(caught.value)
    assert isinstance(caught.value.__cause__, UnreadableImage | DatasetNotFound)


def test_with_context_keeps_the_exit_status_of_any_kind():
    diverged = with_context(TrainingDiverged("the loss became non-finite at step 3", step=3), "fit")
    assert type(diverged) is VitexpError and diverged.exit_code == 4
    assert str(diverged) == "fit: the loss became non-finite at step 3"


def test_first_line_of_an_error():
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line("x" * 500, limit=10) == "x" * 10
