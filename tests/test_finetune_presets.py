"""The timm fine-tuning presets (experiments/*dinov2*, *siglip2*): each composes, passes the
checks, and trains two steps from a filled offline Hub cache holding a randomly initialised
model of its architecture (two blocks): there is no Hub and no GPU here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import compose_cfg, fill_hub_cache
from vitexp.config import validate
from vitexp.models import build_model
from vitexp.training import train
from vitexp.training.checkpoint import load_checkpoint

timm = pytest.importorskip("timm")
from timm.models._hub import save_for_hf  # noqa: E402

# preset: (its model's Hub id, a small image size its patches divide)
PRESETS = {
    "cifar100_finetune_dinov2_s14": ("timm/vit_small_patch14_dinov2.lvd142m", 28),
    "cifar10_finetune_siglip2_b16": ("timm/vit_base_patch16_siglip_224.v2_webli", 32),
    "cifar10_linear_probe_dinov2_s14": ("timm/vit_small_patch14_dinov2.lvd142m", 28),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_preset_trains_from_a_filled_offline_cache(preset, hub_cache, tmp_path):
    cfg = compose_cfg([f"experiment={preset}"])
    assert validate(cfg) == [] and cfg.model.pretrained is True
    hub_id, size = PRESETS[preset]
    torch.manual_seed(0)
    random = timm.create_model(cfg.model.name, pretrained=False, depth=2)
    assert timm.models.get_pretrained_cfg(cfg.model.name).hf_hub_id == hub_id
    save_for_hf(random, str(tmp_path / "saved"), safe_serialization=True)
    fill_hub_cache(hub_cache, hub_id, tmp_path / "saved")
    run_dir = tmp_path / "run"
    overrides = [
        f"experiment={preset}", "dataset=fake", "model.model_args={depth:2}", f"model.img_size={size}",
        "trainer.max_steps=2", "trainer.batch_size=32", "trainer.grad_accum_steps=1",
        "trainer.eval_batch_size=64", "trainer.progress=false", "trainer.sample_figures=false",
    ]  # fmt: skip
    run_cfg = compose_cfg(overrides)
    loaded = build_model(run_cfg.model).state_dict()  # the cached weights, fitted to img_size
    train(run_cfg, run_dir=run_dir)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["progress"]["global_step"] == 2
    if cfg.trainer.freeze == "backbone":  # the linear probe: the pretrained backbone is untouched
        backbone = [k for k in ckpt["model"] if not k.startswith("head.")]
        assert backbone and all(torch.equal(ckpt["model"][k], loaded[k]) for k in backbone)
        assert not torch.equal(ckpt["model"]["head.weight"], loaded["head.weight"])
    else:
        assert not torch.equal(
            ckpt["model"]["blocks.0.attn.qkv.weight"], random.state_dict()["blocks.0.attn.qkv.weight"]
        )


def test_every_timm_preset_is_listed_here():
    from vitexp.config import experiments_dir

    timm_presets = {
        p.stem for p in Path(experiments_dir()).glob("*.yaml") if "override /model: timm" in p.read_text()
    }
    assert timm_presets == set(PRESETS)
