"""Inspecting a trained model: attention maps, evaluation reports, prediction, export.

One tiny checkpoint is trained per session (digits, class token, 3 steps) and one is built
without training (RGB, average pooling, a 2×3 patch grid, class names stored); every command
is tested as a function and once through its command line.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import REPO, TINY_MODEL, compose_cfg
from vitexp.cli import one_line_errors
from vitexp.commands.attention import attention_figure
from vitexp.commands.evaluate import evaluate_checkpoint
from vitexp.commands.export import export_checkpoint
from vitexp.commands.predict import predict_images
from vitexp.config import conf_dir
from vitexp.data import DeviceLoader, carve_validation, crop_to_aspect, load_digits, load_fake, read_image
from vitexp.errors import ConfigError, DataError
from vitexp.inference import dataset_from_cfg, load_trained
from vitexp.models import build_model
from vitexp.training import train
from vitexp.training.checkpoint import save_checkpoint
from vitexp.training.metrics import score
from vitexp.viz import (
    DPI,
    PANEL_INCHES,
    compute_attention,
    patch_scores,
    rollout,
    sample_images,
    save_attention_grid,
    to_grid,
)

GAP_CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="session")
def token_ckpt(tmp_path_factory) -> Path:
    """A digits model with a class token, trained for 3 steps by the training loop."""
    run_dir = tmp_path_factory.mktemp("token_run")
    cfg = compose_cfg(
        ["experiment=digits", *TINY_MODEL, "model.classifier=token", "trainer.max_steps=3",
         "trainer.progress=false"],
        run_dir=run_dir,
    )  # fmt: skip
    train(cfg)
    return run_dir / "last.pt"


@pytest.fixture(scope="session")
def gap_ckpt(tmp_path_factory) -> Path:
    """An untrained RGB model with average pooling and a non-square 2×3 patch grid, saved
    like a training checkpoint, with class names."""
    cfg = compose_cfg(
        ["dataset=fake", "dataset.num_classes=3", "model=vit_ti4", *TINY_MODEL, "model.classifier=gap",
         "model.img_size=[8,12]", "model.patch_size=4"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("gap_run") / "last.pt"
    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint({"model": model.state_dict(), "config": config, "classes": GAP_CLASSES, "epoch": 1}, path)
    return path


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess, as a user would run it."""
    env = {
        **os.environ,
        "HYDRA_FULL_ERROR": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_picture(path: Path, size: tuple[int, int] | None = None) -> None:
    """A PNG of the expected size with real content: not one flat colour."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        if size is not None:
            assert img.size == size
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 20
    assert len(np.unique(pixels, axis=0)) > 50


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------- rollout math


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)  # batch 2, 3 heads
    joint = rollout([eye, eye, eye])
    torch.testing.assert_close(joint, torch.eye(5).expand(2, 5, 5))


def test_rollout_averages_heads_and_adds_the_residual():
    # Two tokens; head 1 attends to itself, head 2 to the other token: the head mean is 0.5
    # everywhere, plus half the identity gives [[.75, .25], [.25, .75]] per layer.
    heads = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])[None]
    torch.testing.assert_close(rollout([heads]), torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))
    two_layers = torch.tensor([[[0.625, 0.375], [0.375, 0.625]]])  # [[.75,.25],[.25,.75]] squared
    torch.testing.assert_close(rollout([heads, heads]), two_layers)


def test_rollout_multiplies_later_layers_on_the_left():
    # Layer 1: every token attends to token 1; layer 2: to token 2. Token 1's content reached
    # every token in layer 1, so it also reaches them through token 2 in layer 2:
    # R = A2' A1' = 0.25 I + 0.5 J1 + 0.25 J2 (J_k: all attention on token k).
    to = lambda k: torch.zeros(3, 3).index_fill_(1, torch.tensor([k]), 1.0)[None, None]  # noqa: E731
    joint = rollout([to(1), to(2)])
    torch.testing.assert_close(joint[0, 0], torch.tensor([0.25, 0.5, 0.25]))
    torch.testing.assert_close(joint.sum(-1), torch.ones(1, 3))


def test_rows_renormalised_when_the_input_rows_do_not_sum_to_one():
    attn = torch.rand(1, 2, 4, 4) * 3
    torch.testing.assert_close(rollout([attn, attn]).sum(-1), torch.ones(1, 4))


def test_class_token_row_or_mean_query_over_the_patch_grid():
    matrix = torch.arange(49, dtype=torch.float32).reshape(1, 7, 7)  # 1 class token + 2×3 patches
    scores = patch_scores(matrix, num_prefix_tokens=1)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 2, 3, 4, 5, 6]]))
    grid = to_grid(scores, (2, 3))
    assert grid.shape == (1, 2, 3) and grid[0, 1, 0] == 4.0  # row-major: patch 3 starts row 2
    no_cls = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6)
    torch.testing.assert_close(patch_scores(no_cls, 0), no_cls.mean(dim=1))


def test_compute_attention_for_class_token_and_average_pooling(token_ckpt, gap_ckpt):
    token = load_trained(token_ckpt)
    x = token.transform.eval(load_digits().test.images[:3])
    result = compute_attention(token.model, x)
    assert result.query == "class token"
    assert result.rollout.shape == (3, 4, 4) and result.heads.shape == (3, 2, 4, 4)
    # The class token's share of the flow to the patches: positive, below 1 (it keeps some).
    assert (result.rollout > 0).all() and (result.rollout.sum((1, 2)) < 1).all()
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(3))
    gap = load_trained(gap_ckpt)
    result = compute_attention(gap.model, torch.randn(2, 3, 8, 12))
    assert result.query == "mean query"
    assert result.rollout.shape == (2, 2, 3) and result.heads.shape == (2, 2, 2, 3)
    # Without a class token the mean row over all tokens is a distribution over the patches.
    torch.testing.assert_close(result.rollout.sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(result.heads.sum((2, 3)), torch.ones(2, 2))


# --------------------------------------------------------------------------- attention pictures


def test_save_attention_grid_for_a_fixed_set_of_images(token_ckpt, tmp_path):
    """The call the training loop makes at the end of a run."""
    trained = load_trained(token_ckpt)
    images, labels = sample_images(load_digits().test, count=4)
    assert sorted(labels.tolist()) == [0, 1, 2, 3]  # one per class first
    trained.model.train()
    names = [f"digit {i}" for i in range(10)]
    path = save_attention_grid(
        trained.model, images, trained.transform, tmp_path / "a" / "grid.png", names, labels=labels
    )
    assert trained.model.training  # mode restored
    cols, rows = 2 + 2, 4  # image, rollout, 2 heads
    assert_picture(path, (round(cols * PANEL_INCHES * DPI), round((rows * PANEL_INCHES + 0.5) * DPI)))


def test_attention_figure_for_files_and_dataset_indices(token_ckpt, gap_ckpt, tmp_path):
    photo = write_image(
        tmp_path / "photo.jpg", np.random.default_rng(0).integers(0, 256, (120, 90, 3), np.uint8)
    )
    path = attention_figure(token_ckpt, images=[photo])
    assert path == token_ckpt.parent / "last_attention_photo.png"
    assert_picture(path)
    path = attention_figure(gap_ckpt, indices=[0, 5], split="train", output=tmp_path / "out.png")
    assert_picture(path, (round(4 * PANEL_INCHES * DPI), round((2 * PANEL_INCHES + 0.5) * DPI)))
    with pytest.raises(ConfigError, match="index=400 is out of range: the test split has 360 images"):
        attention_figure(token_ckpt, indices=[400])
    with pytest.raises(ConfigError, match="either image=FILE"):
        attention_figure(token_ckpt)


def test_attention_of_a_model_without_maps_is_refused_naming_the_checkpoint(tmp_path):
    cfg = compose_cfg(["dataset=fake", "dataset.num_classes=3", "model=cct_2_3x2", "model.img_size=8"])
    path = tmp_path / "cct.pt"
    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": config, "epoch": 1}, path)
    message = "cct.pt: attention maps are drawn for vitexp's ViTs and timm's ViT family, not vitexp's CCT"
    with pytest.raises(ConfigError, match=f"^{message}$"):
        attention_figure(path, indices=[0])


def test_attention_cli_writes_only_the_picture(token_ckpt, tmp_path):
    write_image(tmp_path / "cat.png", np.random.default_rng(1).integers(0, 256, (33, 47), np.uint8))
    before = set(tmp_path.iterdir())
    result = run_module("vitexp.attention", f"checkpoint={token_ckpt}", "image=cat.png", "output=cat_att.png",
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(tmp_path.iterdir()) - before == {tmp_path / "cat_att.png"}  # no outputs/, .hydra/, logs
    assert_picture(tmp_path / "cat_att.png")


# --------------------------------------------------------------------------- evaluation


def test_evaluate_checkpoint_agrees_with_the_training_metrics(token_ckpt):
    report = evaluate_checkpoint(token_ckpt, device="cpu")
    trained = load_trained(token_ckpt)
    test = load_digits().test
    expected = score(
        trained.model, DeviceLoader(test, batch_size=100, transform=trained.transform, train=False),
        torch.autocast("cpu", enabled=False),
    )  # fmt: skip
    assert report["num_samples"] == 360 and report["split"] == "test"
    for key in ("loss", "acc1", "acc5"):
        assert report[key] == pytest.approx(expected[key], rel=1e-6)
    matrix = torch.tensor(report["confusion_matrix"])
    with torch.no_grad():
        predictions = trained.model(trained.transform.eval(test.images)).argmax(1)
    assert matrix.sum() == 360 and matrix.trace() / 360 == pytest.approx(report["acc1"])
    assert matrix[3].sum() == (test.labels == 3).sum()
    assert matrix[3, 5] == ((test.labels == 3) & (predictions == 5)).sum()
    per_class = {c["class"]: c for c in report["per_class"]}
    assert per_class["3"]["count"] == int(matrix[3].sum())
    assert per_class["3"]["accuracy"] == pytest.approx(matrix[3, 3].item() / matrix[3].sum().item())
    report_path = token_ckpt.parent / "last_eval_test.json"
    assert json.loads(report_path.read_text()) == report
    assert_picture(Path(report["confusion_png"]))


def test_evaluate_with_hflip_averages_each_image_and_its_mirror(token_ckpt, tmp_path):
    report = evaluate_checkpoint(token_ckpt, device="cpu", output=tmp_path / "r.json", hflip=True)
    trained = load_trained(token_ckpt)
    test = load_digits().test
    with torch.no_grad():
        x = trained.transform.eval(test.images)
        logits = (trained.model(x) + trained.model(x.flip(-1))) / 2
    assert report["hflip"] is True
    assert report["loss"] == pytest.approx(F.cross_entropy(logits, test.labels).item(), rel=1e-5)
    assert report["acc1"] == pytest.approx((logits.argmax(1) == test.labels).float().mean().item())
    matrix = torch.tensor(report["confusion_matrix"])  # one prediction per image, not two
    assert matrix.sum() == 360 and matrix.trace() / 360 == pytest.approx(report["acc1"])


def test_evaluate_other_splits_and_datasets(token_ckpt, tmp_path):
    trained, out = load_trained(token_ckpt), tmp_path / "r.json"
    report = evaluate_checkpoint(trained, split="val", val_split=0.1, output=out)
    held_out = carve_validation(load_digits().train, 0.1, seed=0)[1]  # as a val_split=0.1 run carves
    assert report["num_samples"] == len(held_out) == 144
    assert [c["count"] for c in report["per_class"]] == torch.bincount(held_out.labels, minlength=10).tolist()
    other = load_fake(num_train=8, num_test=30, img_size=12, in_channels=1, num_classes=10)
    assert evaluate_checkpoint(trained, other, output=out)["num_samples"] == 30
    assert evaluate_checkpoint(trained, other, split="train", output=out)["num_samples"] == 8
    with pytest.raises(ConfigError, match=r"predicts 10 classes but the dataset has 5;"):
        evaluate_checkpoint(trained, load_fake(8, 8, 8, in_channels=1, num_classes=5), output=out)
    with pytest.raises(ConfigError, match=r"images have 3 channels but last\.pt's model takes 1"):
        evaluate_checkpoint(trained, load_fake(8, 8, 8, in_channels=3), output=out)
    with pytest.raises(ConfigError, match=r"split=val needs dataset\.val_split > 0"):
        evaluate_checkpoint(trained, split="val", output=out)
    with pytest.raises(ConfigError, match=r"split='dev' is not one of test, train, val"):
        evaluate_checkpoint(trained, other, split="dev", output=out)


def test_evaluate_on_an_image_folder_whose_config_refers_to_the_model(token_ckpt, tmp_path):
    """imagefolder.yaml sizes its images by `${model.img_size}`: it resolves against the
    checkpoint's model config, which the evaluate command's own config does not have."""
    if not (conf_dir() / "dataset" / "imagefolder.yaml").is_file():
        pytest.skip("no imagefolder dataset config")
    rng = np.random.default_rng(4)
    for part in ("train", "val"):
        for digit in range(10):
            (tmp_path / part / str(digit)).mkdir(parents=True)
            write_image(tmp_path / part / str(digit) / "a.png", rng.integers(0, 256, (20, 30), np.uint8))
    folder = [
        "dataset=imagefolder",
        f"dataset.root={tmp_path}",
        "dataset.num_classes=10",
        "dataset.in_channels=1",
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("evaluate", [f"checkpoint={token_ckpt}", *folder])
    trained = load_trained(token_ckpt)
    data = dataset_from_cfg(cfg, trained)
    assert data.test.image_size == (8, 8) and data.classes == [str(d) for d in range(10)]
    pictures, labels = sample_images(data.test, count=3)  # files read for a train-end grid
    assert pictures.shape == (3, 1, 8, 8) and labels.tolist() == [0, 1, 2]  # as the model is fed
    report = evaluate_checkpoint(trained, data, output=tmp_path / "r.json")
    assert report["num_samples"] == 10 and sum(map(sum, report["confusion_matrix"])) == 10
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("evaluate", [f"checkpoint={token_ckpt}", "dataset=imagefolder"])
    with pytest.raises(ConfigError, match=r"dataset\.num_classes is required here"):
        dataset_from_cfg(cfg, trained)


@pytest.mark.parametrize("value", ["digits", "null"])
def test_a_dataset_load_that_is_not_a_loader_config_is_a_config_error(gap_ckpt, value):
    """`dataset.load=digits` (the loader's name instead of `dataset=digits`) is a setting to fix,
    not a traceback from OmegaConf."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("evaluate", [f"checkpoint={gap_ckpt}", "dataset=fake", f"dataset.load={value}"])
    shown = "'digits'" if value == "digits" else "null"
    with pytest.raises(ConfigError, match=rf"^dataset\.load={shown} is not a loader config: choose"):
        dataset_from_cfg(cfg, load_trained(gap_ckpt))


def test_evaluate_cli_composes_a_dataset_from_the_group(token_ckpt, tmp_path):
    result = run_module(
        "vitexp.evaluate", f"checkpoint={token_ckpt}", "dataset=fake", "dataset.in_channels=1",
        "dataset.load.img_size=8", "dataset.load.num_test=40", "device=cpu", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((token_ckpt.parent / "last_eval_fake_test.json").read_text())
    assert report["num_samples"] == 40 and "acc1 " in result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- images and prediction


def test_read_image_converts_any_mode_to_the_model_channels(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red, right half transparent
    img = read_image(write_image(tmp_path / "a.png", rgba, "RGBA"), channels=3)
    assert img.shape == (3, 4, 6) and img.dtype == torch.uint8
    assert img[:, 0, 0].tolist() == [200, 0, 0] and img[:, 0, 5].tolist() == [255, 255, 255]
    deep = np.array([[0, 65535], [32896, 257]], np.uint16)
    assert read_image(write_image(tmp_path / "d.png", deep), channels=1).tolist() == [[[0, 255], [128, 1]]]
    gray = read_image(write_image(tmp_path / "g.png", np.full((3, 5), 77, np.uint8)), channels=3)
    assert gray.shape == (3, 3, 5) and (gray == 77).all()
    palette = Image.fromarray(np.full((5, 5, 3), (10, 20, 30), np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png", channels=3)[:, 2, 2].tolist() == [10, 20, 30]
    Image.new("CMYK", (7, 2), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert (read_image(tmp_path / "c.jpg", channels=1) > 250).all()  # no ink: white
    oriented = Image.new("L", (6, 2))
    exif = oriented.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° to display
    oriented.save(tmp_path / "o.jpg", exif=exif)
    assert read_image(tmp_path / "o.jpg", channels=1).shape == (1, 6, 2)


def test_crop_to_aspect_keeps_the_centre():
    wide = torch.arange(2 * 4 * 8).reshape(2, 4, 8)
    torch.testing.assert_close(crop_to_aspect(wide, (8, 8)), wide[:, :, 2:6])
    tall = torch.zeros(1, 9, 3)
    assert crop_to_aspect(tall, (8, 12)).shape == (1, 2, 3)  # width / height = 1.5
    assert crop_to_aspect(wide, (16, 32)) is wide


def test_predict_top5_for_files_of_any_size_and_mode(token_ckpt, gap_ckpt, tmp_path):
    rng = np.random.default_rng(2)
    files = [
        write_image(tmp_path / "small.png", rng.integers(0, 256, (8, 8), np.uint8)),
        write_image(tmp_path / "big.jpg", rng.integers(0, 256, (240, 320, 3), np.uint8)),
        write_image(tmp_path / "alpha.png", rng.integers(0, 256, (20, 10, 4), np.uint8), "RGBA"),
    ]
    predictions = predict_images(token_ckpt, files)
    assert [p["image"] for p in predictions] == [str(f) for f in files]
    trained = load_trained(token_ckpt)
    with torch.no_grad():
        probs = F.softmax(trained.model(trained.transform.eval(read_image(files[0], 1)[None])), dim=-1)[0]
    top = predictions[0]["top"]
    assert len(top) == 5 and [t["index"] for t in top] == probs.topk(5).indices.tolist()
    assert [t["probability"] for t in top] == pytest.approx(probs.topk(5).values.tolist(), rel=1e-5)
    assert all(a["probability"] >= b["probability"] for a, b in itertools.pairwise(top))
    gap = predict_images(gap_ckpt, files[1:])  # RGB model, 3 named classes: top-5 is top-3
    assert sorted(t["class"] for t in gap[0]["top"]) == sorted(GAP_CLASSES)
    assert sum(t["probability"] for t in gap[1]["top"]) == pytest.approx(1.0, rel=1e-5)


def test_predict_names_the_file_it_cannot_read(token_ckpt, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"image .*notes.png cannot be read"):
        predict_images(token_ckpt, [tmp_path / "notes.png"])
    with pytest.raises(ConfigError, match=r"image .*missing.jpg does not exist"):
        predict_images(token_ckpt, [tmp_path / "missing.jpg"])


def test_predict_cli_prints_top5(token_ckpt, tmp_path):
    write_image(tmp_path / "a.png", np.random.default_rng(3).integers(0, 256, (16, 16, 3), np.uint8))
    result = run_module("vitexp.predict", f"checkpoint={token_ckpt}", "images=[a.png]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert (
        lines[0] == "a.png"
        and len(lines) == 6
        and all(line.strip().split()[0].endswith("%") for line in lines[1:])
    )


@pytest.mark.slow
def test_predict_cli_fails_in_one_line(token_ckpt, tmp_path):
    write_image(tmp_path / "a.png", np.random.default_rng(3).integers(0, 256, (16, 16, 3), np.uint8))
    result = run_module("vitexp.predict", f"checkpoint={token_ckpt}", "images=[a.png,b.png]", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: image b.png does not exist; check the path"]


@pytest.mark.parametrize("command", ["attention", "evaluate", "predict", "export"])
def test_a_command_without_its_checkpoint_stops_in_one_line(command, caplog):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(command, return_hydra_config=True)
    # Hydra writes nothing: no run directory, no .hydra/, no log file.
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == "."
    assert list(cfg.hydra.job_logging.handlers) == ["console"]
    with pytest.raises(SystemExit) as stop, one_line_errors(cfg):
        pytest.fail("the body runs only when every required setting is given")
    assert stop.value.code == 2
    assert caplog.messages == ["error: checkpoint is required: add checkpoint=... to the command"]


def test_only_vitexp_training_checkpoints_are_loaded(tmp_path):
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "weights.pt")
    with pytest.raises(DataError, match="is not a vitexp training checkpoint"):
        load_trained(tmp_path / "weights.pt")
    with pytest.raises(DataError, match="does not exist"):
        load_trained(tmp_path / "nope.pt")


# --------------------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_matches_pytorch_with_any_batch(token_ckpt, tmp_path):
    path = export_checkpoint(token_ckpt, "torchscript", tmp_path / "m.pt")
    extra = {"vitexp": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["vitexp"])
    assert meta["input_shape"] == ["batch", 1, 8, 8] and meta["mean"] == [0.3062]
    trained = load_trained(token_ckpt)
    with pytest.raises(ConfigError, match="format='tflite' is not one of onnx, torchscript"):
        export_checkpoint(token_ckpt, "tflite")
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert (loaded(x) - trained.model(x)).abs().max() <= 1e-4


@pytest.mark.slow
def test_export_onnx_matches_pytorch_with_any_batch(gap_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = export_checkpoint(gap_ckpt, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["vitexp"])["classes"] == GAP_CLASSES
    trained = load_trained(gap_ckpt)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 8, 12)
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        with torch.no_grad():
            assert (got - trained.model(x)).abs().max() <= 1e-4


def test_export_cli(token_ckpt, tmp_path):
    result = run_module("vitexp.export", f"checkpoint={token_ckpt}", "format=torchscript", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (token_ckpt.parent / "last.torchscript.pt").is_file()
    assert "max logit difference" in result.stderr
