"""`images=` of `python -m vitexp.predict`: files, folders and glob patterns, alone or listed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import REPO, TINY_MODEL, compose_cfg
from vitexp.commands.predict import image_files, predict_images
from vitexp.errors import ConfigError
from vitexp.models import build_model
from vitexp.training.checkpoint import save_checkpoint

# The commands as the README and conf/predict.yaml give them, run as written (from a folder
# holding outputs/digits/last.pt and photos/).
FOLDER_COMMAND = "python -m vitexp.predict checkpoint=outputs/digits/last.pt images=photos"
GLOB_COMMAND = """python -m vitexp.predict checkpoint=outputs/digits/last.pt 'images="photos/**/*.jpg"'"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained RGB model saved as a training checkpoint: prediction needs no training."""
    cfg = compose_cfg(["dataset=fake", "dataset.num_classes=3", *TINY_MODEL, "model.img_size=8"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": config, "epoch": 1}, path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """photos/{b.png, a.JPG, notes.txt, trip/{c.jpg, deeper/d.jpg}}, made in tmp_path."""
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.JPG", "trip/c.jpg", "trip/deeper/d.jpg"):
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(path, format="PNG")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    return tmp_path / "photos"


def test_a_folder_gives_its_images_sorted_without_subfolders(photos):
    assert image_files([photos]) == [photos / "a.JPG", photos / "b.png"]
    assert image_files([str(photos) + "/"]) == [photos / "a.JPG", photos / "b.png"]


def test_a_glob_gives_the_images_it_matches_sorted(photos):
    assert image_files([f"{photos}/**/*.jpg"]) == [
        photos / "trip" / "c.jpg",
        photos / "trip" / "deeper" / "d.jpg",
    ]
    assert image_files([f"{photos}/*"]) == [photos / "a.JPG", photos / "b.png"]  # not notes.txt
    assert image_files([f"{photos}/[ab].*"]) == [photos / "a.JPG", photos / "b.png"]


def test_files_folders_and_globs_mix_in_a_list_in_their_order(photos):
    listed = [photos / "trip" / "c.jpg", photos / "trip", f"{photos}/b.*"]
    assert image_files(listed) == [photos / "trip" / "c.jpg", photos / "trip" / "c.jpg", photos / "b.png"]
    # A file is taken as named (any extension); reading it says whether it is an image.
    assert image_files([photos / "notes.txt", photos / "gone.png"]) == [
        photos / "notes.txt",
        photos / "gone.png",
    ]


def test_a_folder_or_pattern_without_images_is_one_line(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        image_files([tmp_path / "empty"])
    assert str(e.value) == (
        f"image folder {tmp_path / 'empty'} holds no .jpg, .jpeg, .png, .bmp, .ppm, .pgm, .tif, .tiff, .webp "
        f"files; its subfolders are not searched: for them give 'images=\"{tmp_path / 'empty'}/**/*.jpg\"'"
    )
    with pytest.raises(
        ConfigError, match=r"^images=.*/photos/\*\.gif matches no \.jpg, .* files; check the pattern$"
    ):
        image_files([f"{photos}/*.gif"])


def test_predict_reads_every_image_of_a_folder(checkpoint, photos):
    predictions = predict_images(checkpoint, [photos], top_k=2)
    assert [p["image"] for p in predictions] == [str(photos / "a.JPG"), str(photos / "b.png")]
    assert all(len(p["top"]) == 2 for p in predictions)


def run_documented(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a documented `python -m ...` line as a shell would split it."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "printed"),
    [
        (FOLDER_COMMAND, ["photos/a.JPG", "photos/b.png"]),
        (GLOB_COMMAND, ["photos/trip/c.jpg", "photos/trip/deeper/d.jpg"]),
    ],
)
def test_the_documented_folder_and_glob_commands(command, printed, checkpoint, photos, tmp_path):
    (tmp_path / "outputs" / "digits").mkdir(parents=True)
    (tmp_path / "outputs" / "digits" / "last.pt").symlink_to(checkpoint)
    result = run_documented(command, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stdout.splitlines() if not line.startswith(" ")] == printed
