"""Converters of weights to the convolutional families' names: the R50+ViT hybrid, CvT and CCT.

* hybrid (`HybridVisionTransformer`): ``vitexp`` (ours), ``timm`` (``vit_base_r50_s16_224``:
  ``patch_embed.backbone.stem/stages.N.blocks.M``), ``npz`` (the official ``R50+ViT-B_16.npz`` of
  google-research/vision_transformer: ``conv_root``, ``gn_root``, ``blockN/unitM/convK``...);
* CvT: ``vitexp`` and ``hf`` (``CvtForImageClassification`` / ``CvtModel``: ``cvt.encoder.stages...``);
* CCT: ``vitexp`` only (the official CCT layer differs from our block; see `vitexp.models.cct`).

As for the plain ViT (`vitexp.models.weights.vit`), each layout is one pure function
``state_dict -> state_dict`` that renames what it knows and passes the rest through for the strict
load to report; the hybrid converters translate the backbone and leave the transformer to
`vit.convert_timm` / `vit.convert_npz`. Fitting and loading are `vitexp.models.weights.load_pretrained`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vitexp.models.weights.io import unwrap_state_dict
from vitexp.models.weights.keys import Converter, Markers, rename, rules, strip_prefix
from vitexp.models.weights.vit import FLAX_PREFIXES, convert_npz, convert_timm, convert_vitexp

__all__ = [
    "CCT_CONVERTERS",
    "CCT_MARKERS",
    "CVT_CONVERTERS",
    "CVT_MARKERS",
    "HYBRID_CONVERTERS",
    "HYBRID_MARKERS",
    "convert_hf_cvt",
    "convert_npz_hybrid",
    "convert_timm_hybrid",
]

# A key only that layout has, per family; the first matching format wins.
HYBRID_MARKERS: Markers = (
    ("vitexp", re.compile(r"embeddings\.backbone\.root\.conv\.weight")),
    ("timm", re.compile(r"patch_embed\.backbone\.(stem\.)?conv\.weight")),
    ("npz", re.compile(r"((opt/target|params)/)?conv_root/kernel")),
)
CVT_MARKERS: Markers = (
    ("vitexp", re.compile(r"stages\.\d+\.embeddings\.projection\.weight")),
    (
        "hf",
        re.compile(r"(cvt\.)?encoder\.stages\.\d+\.embedding\.convolution_embeddings\.projection\.weight"),
    ),
)
CCT_MARKERS: Markers = (("vitexp", re.compile(r"embeddings\.tokenizer\.\d+\.conv\.weight")),)


# ---------------------------------------------------------------------------------------------
# The R50 hybrid.

_BACKBONE = "embeddings.backbone."
_TIMM_BACKBONE = re.compile(
    r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(conv[123]|norm[123]|downsample\.conv|downsample\.norm)"
    r"\.(weight|bias)"
)
# Stem-only hybrids (resnet_layers=[]) hold the stem directly as the backbone.
_TIMM_ROOT = re.compile(r"patch_embed\.backbone\.(?:stem\.)?(conv|norm)\.(weight|bias)")
_TIMM_UNIT_PART = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}


def convert_timm_hybrid(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """timm hybrid `VisionTransformer` (`HybridEmbed` over `ResNetV2(preact=False)`) → ours.

    The ResNet's `stem.conv/norm` become `root.conv/gn`, `stages.i.blocks.j` become
    `body.block{i+1}.unit{j+1}` with `normK` → `gnK` and `downsample.conv/norm` → `conv_proj/gn_proj`;
    the transformer (`patch_embed.proj`, `blocks`, `norm`, `head`...) is `vit.convert_timm`'s."""
    out: dict[str, Tensor] = {}
    for key, value in convert_timm(state_dict).items():
        unit = _TIMM_BACKBONE.fullmatch(key)
        if unit:
            stage, block, part, leaf = unit.groups()
            part = _TIMM_UNIT_PART.get(part, part.replace("norm", "gn"))
            key = f"{_BACKBONE}body.block{int(stage) + 1}.unit{int(block) + 1}.{part}.{leaf}"
        elif root := _TIMM_ROOT.fullmatch(key):
            part, leaf = root.groups()
            key = f"{_BACKBONE}root.{'conv' if part == 'conv' else 'gn'}.{leaf}"
        out[key] = value
    return out


_NPZ_BACKBONE = re.compile(r"(block\d+/unit\d+)/(conv[123]|conv_proj|gn[123]|gn_proj)/(kernel|scale|bias)")
_NPZ_ROOT = re.compile(r"(conv_root|gn_root)/(kernel|scale|bias)")
_NPZ_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _npz_backbone_param(key: str, value: Tensor) -> tuple[str, Tensor] | None:
    unit = _NPZ_BACKBONE.fullmatch(key)
    root = _NPZ_ROOT.fullmatch(key)
    if unit:
        module = f"{_BACKBONE}body.{unit.group(1).replace('/', '.')}.{unit.group(2)}"
        leaf = unit.group(3)
    elif root:
        module = f"{_BACKBONE}root.{'conv' if root.group(1) == 'conv_root' else 'gn'}"
        leaf = root.group(2)
    else:
        return None
    if leaf == "kernel":
        value = value.permute(3, 2, 0, 1)  # Flax HWIO → PyTorch OIHW
    return f"{module}.{_NPZ_LEAF[leaf]}", value.contiguous()


def convert_npz_hybrid(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official R50+ViT `.npz` (google-research/vision_transformer) → ours.

    `conv_root`/`gn_root` become `root.conv`/`root.gn`, `blockN/unitM/{convK,gnK,conv_proj,gn_proj}`
    keep their names under `body` (kernels HWIO → OIHW, GroupNorm `scale` → `weight`); the
    transformer is `vit.convert_npz`'s. timm reads these files the same way, so imported weights
    give timm's logits (both standardise kernels with eps 1e-8 inside the square root and use
    GroupNorm eps 1e-5, where the JAX code divides by std + 1e-5 and uses eps 1e-6)."""
    flat = strip_prefix(unwrap_state_dict(state_dict), FLAX_PREFIXES, "conv_root/kernel")
    backbone: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for key, value in flat.items():
        converted = _npz_backbone_param(key, value)
        if converted is None:
            rest[key] = value
        else:
            backbone[converted[0]] = converted[1]
    return {**convert_npz(rest), **backbone}


# ---------------------------------------------------------------------------------------------
# CvT.

_HF_CVT_LAYER = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_HF_CVT_RULES = rules(
    (r"encoder\.stages\.(\d+)\.cls_token", r"stages.\1.cls_token"),
    (
        r"encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.(weight|bias)",
        r"stages.\1.embeddings.projection.\2",
    ),
    (
        r"encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.(weight|bias)",
        r"stages.\1.embeddings.norm.\2",
    ),
    # convolution_projection_{query,key,value} → conv_{q,k,v}: the group keeps the first letter.
    (
        _HF_CVT_LAYER
        + r"attention\.attention\.convolution_projection_(q|k|v)[a-z]*\.convolution_projection\."
        r"convolution\.weight",
        r"stages.\1.layer.\2.attn.conv_\3.conv.weight",
    ),
    (
        _HF_CVT_LAYER
        + r"attention\.attention\.convolution_projection_(q|k|v)[a-z]*\.convolution_projection\."
        r"normalization\.(weight|bias|running_mean|running_var|num_batches_tracked)",
        r"stages.\1.layer.\2.attn.conv_\3.bn.\4",
    ),
    (
        _HF_CVT_LAYER + r"attention\.attention\.projection_(query|key|value)\.(weight|bias)",
        r"stages.\1.layer.\2.attn.\3.\4",
    ),
    (_HF_CVT_LAYER + r"attention\.output\.dense\.(weight|bias)", r"stages.\1.layer.\2.attn.out.\3"),
    (_HF_CVT_LAYER + r"intermediate\.dense\.(weight|bias)", r"stages.\1.layer.\2.ffn.fc1.\3"),
    (_HF_CVT_LAYER + r"output\.dense\.(weight|bias)", r"stages.\1.layer.\2.ffn.fc2.\3"),
    (_HF_CVT_LAYER + r"layernorm_before\.(weight|bias)", r"stages.\1.layer.\2.attention_norm.\3"),
    (_HF_CVT_LAYER + r"layernorm_after\.(weight|bias)", r"stages.\1.layer.\2.ffn_norm.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
)


def convert_hf_cvt(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Hugging Face `CvtForImageClassification` / `CvtModel` → ours: strip the `cvt.` prefix and
    rename; every tensor keeps its shape (q/k/v stay separate, as in our `ConvAttention`).
    BatchNorm running statistics come along. A `CvtModel` file has no final LayerNorm or head: the
    strict load reports the LayerNorm missing."""
    flat = {key.removeprefix("cvt."): value for key, value in unwrap_state_dict(state_dict).items()}
    return rename(flat, _HF_CVT_RULES)


HYBRID_CONVERTERS: dict[str, Converter] = {
    "vitexp": convert_vitexp,
    "timm": convert_timm_hybrid,
    "npz": convert_npz_hybrid,
}
CVT_CONVERTERS: dict[str, Converter] = {"vitexp": convert_vitexp, "hf": convert_hf_cvt}
CCT_CONVERTERS: dict[str, Converter] = {"vitexp": convert_vitexp}
