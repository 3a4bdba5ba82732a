"""`model=timm`: any timm model by name, timm's pretrained weights from an offline Hub cache,
its own normalisation stored with the checkpoint, and the commands on its checkpoints.

No Hub here: the caches are filled with randomly initialised models of the same architecture
(`fill_hub_cache`, as huggingface_hub lays a download out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, compose_cfg, fill_hub_cache, run_cli
from vitexp.commands.attention import attention_figure
from vitexp.commands.evaluate import evaluate_checkpoint
from vitexp.commands.export import export_checkpoint
from vitexp.commands.predict import predict_images
from vitexp.errors import ConfigError, DataError
from vitexp.inference import load_trained
from vitexp.models import build_model, build_stored_model
from vitexp.models.timm_models import timm_attention_maps
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint
from vitexp.viz import compute_attention, has_attention_maps

timm = pytest.importorskip("timm")
from timm.models._hub import save_for_hf  # noqa: E402

NAME, HUB_ID = "vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2.lvd142m"
SMALL = {"depth": 2}  # the same architecture, fewer blocks: the file and the model agree
MODEL = ["model=timm", f"model.name={NAME}", "model.model_args={depth:2}"]
FAST = ["dataset=fake", *MODEL, "model.img_size=28", "trainer.batch_size=64", "trainer.progress=false",
        "trainer.sample_figures=false"]  # fmt: skip


def timm_cfg(**overrides: object) -> dict:
    return {"_target_": "vitexp.models.timm_model", "name": NAME, "num_classes": 10, **overrides}


@pytest.fixture
def dinov2_cache(hub_cache: Path, tmp_path: Path) -> torch.nn.Module:
    """The Hub cache holding a random DINOv2 ViT-S (two blocks) under timm's id; the reference model."""
    torch.manual_seed(0)
    reference = timm.create_model(NAME, pretrained=False, **SMALL).eval()
    save_for_hf(reference, str(tmp_path / "saved"), safe_serialization=True)
    fill_hub_cache(hub_cache, HUB_ID, tmp_path / "saved")
    return reference


def test_pretrained_true_reads_timms_weights_from_the_offline_cache(dinov2_cache):
    model = build_model(timm_cfg(pretrained=True, model_args=SMALL)).eval()
    images = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), dinov2_cache.forward_features(images))
    assert model.img_size == (518, 518)  # the pretrained config's input size
    # Another image size: timm resamples the position embeddings.
    small = build_model(timm_cfg(pretrained=True, model_args=SMALL, img_size=28))
    assert small.img_size == (28, 28) and small(torch.randn(1, 3, 28, 28)).shape == (1, 10)


def test_nothing_cached_offline_is_one_line_naming_the_hub_id(hub_cache):
    with pytest.raises(DataError) as err:
        build_model(timm_cfg(pretrained=True))
    message = str(err.value)
    assert message.startswith(f"cannot fetch hf-hub:{HUB_ID}: ") and "HF_HUB_OFFLINE is set" in message
    assert "\n" not in message


def test_an_unknown_name_is_one_line_with_close_names():
    with pytest.raises(ConfigError) as err:
        build_model(timm_cfg(name="vit_smal_patch14_dinov2"))
    assert str(err.value).startswith(
        "model.name=vit_smal_patch14_dinov2 is not a timm model; did you mean vit_small_patch14_dinov2"
    )


def test_without_timm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(
        ConfigError, match=r"^model=timm needs the timm package.*pip install -e '\.\[timm\]'$"
    ):
        build_model(timm_cfg())


def test_arguments_that_are_not_the_models_are_refused():
    with pytest.raises(ConfigError, match=r"^model.model_args.checkpoint_path is not for model_args"):
        build_model(timm_cfg(model_args={"checkpoint_path": "/tmp/x.pth"}))
    with pytest.raises(ConfigError, match=r"^model: timm's vit_small_patch14_dinov2 refuses its arguments"):
        build_model(timm_cfg(model_args={"depht": 2}))
    # A stored config is built through the allow-list, with the same refusal.
    with pytest.raises(DataError, match=r"^ckpt.pt: its stored model config cannot be built"):
        build_stored_model(timm_cfg(model_args={"checkpoint_path": "/tmp/x.pth"}), source="ckpt.pt")


def test_a_convolutional_network_takes_the_image_size_it_is_given():
    model = build_model(timm_cfg(name="convnext_atto", img_size=32))
    assert model.img_size == (32, 32) and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mean_std_interpolation_and_size_come_from_the_model_unless_overridden():
    cfg = compose_cfg(["dataset=fake", *MODEL, "model.img_size=28"])
    model = build_model(cfg.model)
    from vitexp.training.setup import model_inputs

    assert model_inputs(cfg, model) == {
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"
    }  # fmt: skip
    cfg = compose_cfg(["dataset=fake", *MODEL, "model.img_size=28", "model.mean=[0.5,0.5,0.5]",
                       "model.std=[0.5,0.5,0.5]", "model.interpolation=bilinear"])  # fmt: skip
    assert model_inputs(cfg, build_model(cfg.model)) == {
        "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"
    }  # fmt: skip


def test_a_timm_vits_attention_maps_are_its_softmax_and_leave_it_as_it_was():
    """Registers too: DINOv2 with 4 register tokens has 5 prefix tokens before the 2×2 patches."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", depth=2, img_size=28, num_classes=10).eval()
    fused = [block.attn.fused_attn for block in model.blocks]
    x = torch.randn(2, 3, 28, 28)
    maps = timm_attention_maps(model, x)
    assert [m.shape for m in maps] == [(2, 6, 9, 9)] * 2
    # The first block's probabilities, computed by hand from its weights.
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        block = model.blocks[0]
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(2, 9, 3, 6, 64).permute(2, 0, 3, 1, 4)
        q, k = block.attn.q_norm(qkv[0]), block.attn.k_norm(qkv[1])
        expected = (q * block.attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)
    torch.testing.assert_close(maps[0], expected)
    assert [block.attn.fused_attn for block in model.blocks] == fused
    assert all(not block.attn.attn_drop._forward_hooks for block in model.blocks)
    result = compute_attention(model, x)
    assert result.query == "class token" and result.layers == 2
    assert result.rollout.shape == (2, 2, 2) and result.heads.shape == (2, 6, 2, 2)


def test_attention_of_a_timm_vit_without_class_token_and_a_refusal_for_a_cnn():
    pooled = timm.create_model(
        "vit_tiny_patch16_224", depth=1, img_size=32, class_token=False, global_pool="avg", num_classes=3
    ).eval()
    result = compute_attention(pooled, torch.randn(1, 3, 32, 32))
    assert result.query == "mean query" and result.heads.shape == (1, 3, 2, 2)
    torch.testing.assert_close(result.rollout.sum((1, 2)), torch.ones(1))
    cnn = timm.create_model("resnet10t", num_classes=3)
    assert not has_attention_maps(cnn)
    with pytest.raises(ConfigError, match=r"timm's ViT family, not timm's ResNet$"):
        compute_attention(cnn, torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_a_timm_run_from_the_offline_cache_resumes_and_its_checkpoint_serves_every_command(
    dinov2_cache, tmp_path
):
    run_dir = tmp_path / "run"
    overrides = [*FAST, "model.pretrained=true", "optimizer.layer_decay=0.75", "trainer.ema_decay=0.9"]
    train(compose_cfg([*overrides, "trainer.max_steps=1"]), run_dir=run_dir)
    more = ["trainer.max_steps=2", "trainer.resume=auto", "trainer.resume_allow_changes=true"]
    train(compose_cfg([*overrides, *more]), run_dir=run_dir)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["progress"]["global_step"] == 2
    assert ckpt["inputs"] == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    }
    # The stored config rebuilds through the allow-list; inference normalises as training did.
    trained = load_trained(run_dir / "last.pt")
    assert type(trained.model).__module__.startswith("timm.") and trained.img_size == (28, 28)
    assert trained.inputs == ckpt["inputs"] and trained.transform.interpolation == "bicubic"
    report = evaluate_checkpoint(trained, output=tmp_path / "eval.json")
    assert 0.0 <= report["acc1"] <= 1.0
    image = tmp_path / "one.png"
    from torchvision.io import write_png

    write_png(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8), str(image))
    (prediction,) = predict_images(trained, [image], top_k=3)
    assert len(prediction["top"]) == 3
    exported = export_checkpoint(run_dir / "last.pt", "torchscript", tmp_path / "m.torchscript.pt")
    extra = {"vitexp": ""}
    torch.jit.load(str(exported), _extra_files=extra)
    meta = json.loads(extra["vitexp"])
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["interpolation"] == "bicubic"
    figure = attention_figure(trained, images=[image], output=tmp_path / "attention.png")
    assert figure.stat().st_size > 0


@pytest.mark.slow
def test_the_command_line_trains_dinov2_from_a_filled_offline_cache(tmp_path):
    """The full ViT-S/14 DINOv2 architecture, random weights in an offline Hub cache (HF_HOME)."""
    torch.manual_seed(0)
    saved = tmp_path / "saved"
    save_for_hf(timm.create_model(NAME, pretrained=False), str(saved), safe_serialization=True)
    fill_hub_cache(tmp_path / "hf" / "hub", HUB_ID, saved)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["model=timm", f"model.name={NAME}", "model.pretrained=true", "model.img_size=28", "dataset=fake",
            "trainer.max_steps=2", "trainer.batch_size=32", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = run_cli(*args, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").is_file()
    misspelt = ["model.name=vit_smal_patch14_dinov2", *args[2:-1], f"hydra.run.dir={tmp_path / 'other'}"]
    refused = run_cli(args[0], *misspelt, env=env, cwd=REPO)
    said = refused.stdout + refused.stderr
    assert (
        refused.returncode == 2
        and "did you mean vit_small_patch14_dinov2" in said
        and "Traceback" not in said
    )
