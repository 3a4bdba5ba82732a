"""The weights package's dispatch (`vitexp.models.weights.FAMILIES`) and what it knows of the
paper's sizes; the per-format conversions are tested in test_convert.py and test_conv_models.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import model_config, model_options, model_target
from vitexp.errors import ConfigError
from vitexp.models import CCT, CvT, HybridVisionTransformer, VisionTransformer
from vitexp.models.build import MODEL_REGISTRY
from vitexp.models.timm_models import timm_model
from vitexp.models.vit import PAPER_PATCH_SIZES, PAPER_SIZES, paper_model_name
from vitexp.models.weights import FAMILIES, family_of, load_converted, load_pretrained


def test_paper_size_table_names_exactly_the_configs_there_are() -> None:
    vit_configs = {
        name: model_config(name)
        for name in model_options()
        if name.startswith("vit_") and model_target(name) == "vitexp.models.VisionTransformer"
    }
    named = {f"vit_{size}{patch}" for size, patches in PAPER_PATCH_SIZES.items() for patch in patches}
    assert named == set(vit_configs)
    for name, cfg in vit_configs.items():
        size = re.fullmatch(r"vit_([a-z]+)\d+", name).group(1)
        assert PAPER_SIZES[size] == {k: cfg[k] for k in ("hidden_size", "num_layers", "mlp_dim", "num_heads")}
        assert paper_model_name(cfg.hidden_size, cfg.num_layers, cfg.mlp_dim, cfg.patch_size) == name


def test_no_name_for_sizes_outside_the_paper() -> None:
    assert paper_model_name(768, 12, 3072, 2) is None  # B at a patch size with no config
    assert paper_model_name(64, 2, 256, 8) is None


def _tiny_vit(**overrides: object) -> VisionTransformer:
    kwargs: dict = dict(
        img_size=16, patch_size=4, num_classes=3, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2
    )
    return VisionTransformer(**(kwargs | overrides)).eval()


def test_fit_hint_reads_the_paper_table_not_the_config_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Run from elsewhere with no conf/ in sight: the hint still names the config.
    monkeypatch.chdir(tmp_path)
    with torch.device("meta"):
        b16 = VisionTransformer(img_size=224, patch_size=16, **PAPER_SIZES["b"])
        ti16 = VisionTransformer(img_size=224, patch_size=16, **PAPER_SIZES["ti"])
    with pytest.raises(ConfigError) as error:
        load_converted(ti16, b16.state_dict(), source="B_16.pth")
    assert str(error.value).endswith(
        "pick the model config that matches the checkpoint "
        "(model=vit_b16, i.e. patch_size=16 hidden_size=768 mlp_dim=3072 num_layers=12)"
    )


def test_every_registered_model_class_has_a_family() -> None:
    # Every model class vitexp builds imports weights through a family; `timm_model` (model=timm) is
    # a builder whose models load timm's own weights through timm.
    classes = {target for target in MODEL_REGISTRY.values() if isinstance(target, type)}
    assert {family.model_type for family in FAMILIES} == classes
    assert set(MODEL_REGISTRY.values()) - classes == {timm_model}
    hybrid = HybridVisionTransformer(
        img_size=16, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, resnet_layers=[1, 1]
    )
    assert family_of(hybrid).name == "R50+ViT hybrid"
    assert family_of(_tiny_vit()).name == "ViT"
    assert [family_of(model).model_type for model in (CvT(), CCT())] == [CvT, CCT]


def test_other_models_are_refused_in_one_line(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(
        ConfigError, match=r"cannot import pretrained weights into a Linear: vitexp imports them"
    ):
        load_pretrained(nn.Linear(2, 2), tmp_path / "linear.pth")


def test_weights_of_another_family_are_named_for_a_plain_vit(tmp_path: Path) -> None:
    cvt = CvT(
        img_size=16, num_classes=3, hidden_size=[16, 32], num_heads=[1, 2], num_layers=[1, 1],
        patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], drop_path_rate=[0.0, 0.0],
    )  # fmt: skip
    torch.save({"model": cvt.state_dict()}, tmp_path / "last.pt")
    with pytest.raises(ConfigError) as error:
        load_pretrained(_tiny_vit(), tmp_path / "last.pt")
    assert str(error.value).startswith(f"{tmp_path / 'last.pt'} holds CvT weights, not ViT weights: point")


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_own_rectangular_checkpoint_loads_into_the_same_model_unchanged(
    classifier: str, tmp_path: Path
) -> None:
    # A 4x6 grid (+ class token: 25 positions, a square count) must not be taken for a 5x5 one.
    source = _tiny_vit(img_size=(16, 24), classifier=classifier)
    with torch.no_grad():
        source.embeddings.position_embeddings.normal_()
    torch.save({"model": source.state_dict()}, tmp_path / "last.pt")
    ours = _tiny_vit(img_size=(16, 24), classifier=classifier)
    load_pretrained(ours, tmp_path / "last.pt")
    assert torch.equal(ours.embeddings.position_embeddings, source.embeddings.position_embeddings)
    x = torch.randn(2, 3, 16, 24)
    torch.testing.assert_close(ours(x), source(x), rtol=0, atol=0)
