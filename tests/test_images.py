"""The one image decoder: the pixels it gives for awkward files, and that training on an image
folder, `evaluate`, `predict`, `attention` and the train-end grid feed the model the same
tensor for the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import vitexp.viz
from tests.helpers import TINY_MODEL, compose_cfg
from vitexp.commands.attention import attention_figure
from vitexp.commands.predict import predict_images
from vitexp.data import load_image, load_imagefolder, load_images, make_loader, read_image, resize_image
from vitexp.data.images import UnreadableImage
from vitexp.errors import ConfigError
from vitexp.inference import TrainedModel, load_trained
from vitexp.models import build_model
from vitexp.training.checkpoint import save_checkpoint
from vitexp.viz import sample_images

RED, BLUE = (220, 30, 30), (30, 30, 220)


# --------------------------------------------------------------------------- awkward files


def exif_rotated_jpeg(path: Path, size: tuple[int, int] = (12, 8)) -> Path:
    """Stored `size` (width, height) wide, left half red, right half blue, tagged with EXIF
    orientation 6: a viewer turns it 90° clockwise, so it shows tall, red on top."""
    width, height = size
    img = Image.new("RGB", size, BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, quality=95, exif=exif)
    return path


def rgba_png(path: Path, size: tuple[int, int] = (30, 20)) -> Path:
    """Thirds from the left: opaque red, half-transparent blue, fully transparent green."""
    width, height = size
    arr = np.zeros((height, width, 4), np.uint8)
    third = width // 3
    arr[:, :third] = (200, 0, 0, 255)
    arr[:, third : 2 * third] = (0, 0, 200, 128)
    arr[:, 2 * third :] = (0, 255, 0, 0)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def gray16_png(path: Path, size: tuple[int, int] = (32, 24)) -> np.ndarray:
    """A 16-bit horizontal ramp over the whole range, plus a little vertical structure."""
    width, height = size
    ramp = np.linspace(0, 65535, width)[None, :] * np.linspace(0.6, 1.0, height)[:, None]
    arr = np.rint(ramp).astype(np.uint16)
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored and read as 16-bit
    return arr


def cmyk_jpeg(path: Path, size: tuple[int, int] = (24, 16)) -> Path:
    """Left half pure cyan ink, right half no ink (white paper)."""
    width, height = size
    img = Image.new("CMYK", size, (0, 0, 0, 0))
    img.paste((255, 0, 0, 0), (0, 0, width // 2, height))
    img.save(path, quality=95)
    return path


def palette_png(path: Path, size: tuple[int, int] = (20, 28)) -> Path:
    """A palette image whose entry 1 is transparent: top half red (entry 0), bottom entry 1."""
    width, height = size
    img = Image.new("P", size, 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.paste(1, (0, height // 2, width, height))
    img.save(path, transparency=1)
    return path


def gray_png(path: Path, size: tuple[int, int] = (26, 18)) -> np.ndarray:
    width, height = size
    arr = (np.arange(width * height).reshape(height, width) * 7 % 256).astype(np.uint8)
    Image.fromarray(arr, "L").save(path)
    return arr


def awkward_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    gray16_png(folder / "deep.png")
    gray_png(folder / "gray.png")
    return [
        exif_rotated_jpeg(folder / "rotated.jpg", (40, 30)),
        rgba_png(folder / "alpha.png", (45, 27)),
        folder / "deep.png",
        cmyk_jpeg(folder / "cmyk.jpg", (36, 36)),
        palette_png(folder / "palette.png", (20, 34)),
        folder / "gray.png",
    ]


def near(pixel: torch.Tensor, rgb: tuple[int, ...], tol: int) -> bool:
    return bool((pixel.int() - torch.tensor(rgb)).abs().max() <= tol)


def test_exif_orientation_is_applied(tmp_path):
    img = read_image(exif_rotated_jpeg(tmp_path / "r.jpg"), channels=3)
    assert img.shape == (3, 12, 8)  # shown tall: 12 rows of 8
    assert near(img[:, 2, 4], RED, 40) and near(img[:, 9, 4], BLUE, 40)


def test_transparency_is_composited_on_white(tmp_path):
    img = read_image(rgba_png(tmp_path / "a.png"), channels=3)
    assert img[:, 5, 2].tolist() == [200, 0, 0]
    assert near(img[:, 5, 15], (127, 127, 227), 1)  # half blue over white
    assert img[:, 5, 27].tolist() == [255, 255, 255]  # transparent green shows as white
    pal = read_image(palette_png(tmp_path / "p.png"), channels=3)
    assert pal[:, 3, 3].tolist() == [255, 0, 0] and pal[:, 25, 3].tolist() == [255, 255, 255]
    key = Image.new("RGB", (4, 2), (1, 2, 3))
    key.paste((9, 9, 9), (0, 0, 2, 2))
    key.save(tmp_path / "k.png", transparency=(1, 2, 3))  # a tRNS colour key
    keyed = read_image(tmp_path / "k.png", channels=3)
    assert keyed[:, 0, 0].tolist() == [9, 9, 9] and keyed[:, 0, 3].tolist() == [255, 255, 255]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = gray16_png(tmp_path / "d.png")
    img = read_image(tmp_path / "d.png", channels=1)
    assert torch.equal(img[0], torch.from_numpy(np.rint(arr / 65535 * 255).astype(np.uint8)))
    assert img.min() == 0 and img.max() == 255 and 100 < img.float().mean() < 140  # not all white
    rgb = read_image(tmp_path / "d.png", channels=3)
    assert torch.equal(rgb, img.expand(3, -1, -1))


def test_cmyk_and_grayscale_become_the_models_channels(tmp_path):
    cmyk = read_image(cmyk_jpeg(tmp_path / "c.jpg"), channels=3)
    assert near(cmyk[:, 8, 3], (0, 255, 255), 12) and near(cmyk[:, 8, 20], (255, 255, 255), 12)
    arr = gray_png(tmp_path / "g.png")
    gray = read_image(tmp_path / "g.png", channels=3)
    assert gray.shape == (3, 18, 26) and all(torch.equal(c, torch.from_numpy(arr)) for c in gray)
    luma = read_image(rgba_png(tmp_path / "a.png"), channels=1)
    assert luma.shape == (1, 20, 30) and luma[0, 5, 27] == 255  # white, not black, where transparent


def test_load_image_crops_the_centre_and_resizes_once(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 3, (5, 5))
    assert out.shape == (3, 5, 5) and out.dtype == torch.uint8 and (out == 255).all()
    assert torch.equal(load_images([tmp_path / "wide.png"] * 2, 3, (5, 5)), torch.stack([out, out]))
    assert load_images([], 1, (4, 6)).shape == (0, 1, 4, 6)
    same = torch.randint(0, 256, (3, 6, 9), dtype=torch.uint8)
    assert resize_image(same, (6, 9)) is same
    small = resize_image(same, (2, 3))
    expected = torch.nn.functional.interpolate(
        same[None].float(), size=(2, 3), mode="bilinear", antialias=True
    )
    assert torch.equal(small, expected[0].round().clamp(0, 255).to(torch.uint8))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(
        UnreadableImage, match=r"image .*notes.png cannot be read \(UnidentifiedImageError"
    ) as e:
        read_image(tmp_path / "notes.png", 3)
    assert "\n" not in str(e.value) and e.value.path == str(tmp_path / "notes.png")
    Image.new("RGB", (64, 64), RED).save(tmp_path / "cut.jpg")
    blob = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UnreadableImage, match=r"cut.jpg cannot be read \(OSError: .*[Tt]runcated"):
        load_image(tmp_path / "cut.jpg", 3, (8, 8))
    with pytest.raises(ConfigError, match=r"image .*gone.png does not exist; check the path"):
        read_image(tmp_path / "gone.png", 3)
    with pytest.raises(ConfigError, match="only 1- or 3-channel"):
        read_image(tmp_path / "cut.jpg", 4)


# --------------------------------------------------------------------------- one model input everywhere


def _checkpoint(path: Path, channels: int) -> TrainedModel:
    """An untrained ViT with a non-square input (16×24) saved as a training checkpoint."""
    overrides = ["dataset=fake", "dataset.num_classes=2", "model=vit_ti4", *TINY_MODEL,
                 "model.img_size=[16,24]", "model.patch_size=8"]  # fmt: skip
    if channels == 1:
        overrides += ["dataset.in_channels=1", "dataset.mean=[0.4]", "dataset.std=[0.3]"]
    cfg = compose_cfg(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return load_trained(path)


@pytest.fixture(params=[3, 1], ids=["rgb_model", "gray_model"])
def folder_and_model(request, tmp_path) -> tuple:
    files = awkward_files(tmp_path / "src")
    root = tmp_path / "images"
    for split in ("train", "val"):
        for i, path in enumerate(files):
            target = root / split / ("a" if i < 3 else "b") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    trained = _checkpoint(tmp_path / "last.pt", request.param)
    data = load_imagefolder(root, image_size=trained.img_size, in_channels=trained.in_channels)
    return data, trained


def _predict_inputs(trained: TrainedModel, paths: list[str]) -> torch.Tensor:
    """What `predict_images` feeds the model, caught at the model's forward."""
    seen = []
    handle = trained.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        predict_images(trained, paths, top_k=1)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_evaluation_and_predict_feed_the_model_the_same_tensor(folder_and_model, num_workers):
    data, trained = folder_and_model
    split = data.test
    assert len(split) == 6 and split.image_size == (16, 24)
    predicted = _predict_inputs(trained, split.paths)
    assert predicted.shape == (6, trained.in_channels, 16, 24)

    evaluation = make_loader(split, batch_size=4, transform=trained.transform, train=False,
                             device=torch.device("cpu"), num_workers=num_workers)  # fmt: skip
    batches = list(evaluation)
    assert [len(y) for _, y in batches] == [4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), predicted)

    # Training without augmentation: the shuffled batches hold the same rows.
    training = make_loader(split, batch_size=3, transform=trained.transform, train=True,
                           device=torch.device("cpu"), generator=torch.Generator().manual_seed(3),
                           num_workers=num_workers)  # fmt: skip
    order = training.new_order()
    assert order.tolist() != list(range(6))
    x = torch.cat([x for x, _ in training.iter_from(order)])
    assert torch.equal(x, predicted[order])


@pytest.mark.slow
def test_attention_and_the_train_end_grid_see_the_same_tensor(folder_and_model, tmp_path, monkeypatch):
    data, trained = folder_and_model
    predicted = _predict_inputs(trained, data.test.paths)
    seen = []
    original = vitexp.viz.compute_attention

    def recording(model, x):
        seen.append(x.clone())
        return original(model, x)

    monkeypatch.setattr(vitexp.viz, "compute_attention", recording)
    attention_figure(trained, images=data.test.paths[:3], output=tmp_path / "files.png")
    attention_figure(trained, data=data, indices=[5, 1, 3], output=tmp_path / "indices.png")
    assert torch.equal(seen[0], predicted[:3])
    assert torch.equal(seen[1], predicted[[5, 1, 3]])
    pictures, labels = sample_images(data.test, count=6)  # every image, in index order
    assert labels.tolist() == data.test.labels.tolist()
    assert torch.equal(trained.transform.eval(pictures), predicted)


def test_the_decoded_pixels_are_right_at_the_model_size(tmp_path):
    """What the model is fed, not only what `read_image` gives: the rotation survives the
    resize, transparency is white, the 16-bit image is not white."""
    rotated_path, alpha_path, deep_path = awkward_files(tmp_path)[:3]
    rotated = load_image(rotated_path, 3, (16, 12))  # shown 30 wide, 40 tall: no crop needed
    assert near(rotated[:, 2, 6], RED, 40) and near(rotated[:, 13, 6], BLUE, 40)
    alpha = load_image(alpha_path, 3, (9, 15))  # a third of the size, same aspect
    assert alpha[:, 4, 1].tolist() == [200, 0, 0] and alpha[:, 4, 12].tolist() == [255, 255, 255]
    deep = load_image(deep_path, 1, (12, 16))
    assert deep.max() > 230 and deep.min() < 10 and 60 < deep.float().mean() < 160
