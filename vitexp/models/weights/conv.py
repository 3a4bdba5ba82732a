"""Import weights into the convolutional families: the R50+ViT hybrid, CvT and CCT.

`vitexp.models.weights.vit.load_pretrained` hands these models to `load_pretrained_conv`. Layouts:

* hybrid (`HybridVisionTransformer`): ``vitexp`` (ours), ``timm`` (``vit_base_r50_s16_224``:
  ``patch_embed.backbone.stem/stages.N.blocks.M``), ``npz`` (the official ``R50+ViT-B_16.npz`` of
  google-research/vision_transformer: ``conv_root``, ``gn_root``, ``blockN/unitM/convK``...);
* CvT: ``vitexp`` and ``hf`` (``CvtForImageClassification`` / ``CvtModel``: ``cvt.encoder.stages...``);
* CCT: ``vitexp`` only (the official CCT layer differs from our block; see `vitexp.models.cct`).

As in `convert`, each layout is one pure function ``state_dict -> state_dict`` that renames what it
knows and passes the rest through for the strict load to report; the hybrid converters translate
the backbone and leave the transformer to `convert.convert_timm` / `convert.convert_npz`. The
weights are then fitted to the model (RGB stem summed for 1-channel input; for the hybrid also
position embeddings resampled to the grid and a classifier for other classes, exactly as for the
plain ViT; for CCT its position embeddings; for CvT and CCT the classifier) and loaded strictly.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from vitexp.errors import ConfigError
from vitexp.models.cct import CCT
from vitexp.models.cvt import CvT
from vitexp.models.hybrid import HybridVisionTransformer
from vitexp.models.weights import vit as convert

__all__ = [
    "CONV_CONVERTERS",
    "CONV_FORMATS",
    "convert_hf_cvt",
    "convert_npz_hybrid",
    "convert_timm_hybrid",
    "detect_conv_format",
    "family_of",
    "handles",
    "load_converted_conv",
    "load_pretrained_conv",
]

logger = logging.getLogger(__name__)

Converter = Callable[[Mapping[str, Any]], dict[str, Tensor]]

# The first convolution of each family: the one that sees the image's channels.
_STEM = {
    "hybrid": "embeddings.backbone.root.conv.weight",
    "cvt": "stages.0.embeddings.projection.weight",
    "cct": "embeddings.tokenizer.0.conv.weight",
}
_NAMES = {"hybrid": "R50+ViT hybrid", "cvt": "CvT", "cct": "CCT"}
_EXAMPLES = {
    "hybrid": "timm's vit_base_r50_s16_224, R50+ViT-B_16.npz or a vitexp checkpoint of model=vit_r50_b16",
    "cvt": "Hugging Face microsoft/cvt-13 or a vitexp checkpoint of model=cvt_13",
    "cct": "a vitexp checkpoint of a cct_* model",
}

# A key only that layout has, per family; the first matching format wins.
_MARKERS: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    "hybrid": (
        ("vitexp", re.compile(r"embeddings\.backbone\.root\.conv\.weight")),
        ("timm", re.compile(r"patch_embed\.backbone\.(stem\.)?conv\.weight")),
        ("npz", re.compile(r"((opt/target|params)/)?conv_root/kernel")),
    ),
    "cvt": (
        ("vitexp", re.compile(r"stages\.\d+\.embeddings\.projection\.weight")),
        (
            "hf",
            re.compile(
                r"(cvt\.)?encoder\.stages\.\d+\.embedding\.convolution_embeddings\.projection\.weight"
            ),
        ),
    ),
    "cct": (("vitexp", re.compile(r"embeddings\.tokenizer\.\d+\.conv\.weight")),),
}


def family_of(model: nn.Module) -> str | None:
    """'hybrid', 'cvt' or 'cct' for the models this module loads, else None."""
    if isinstance(model, HybridVisionTransformer):
        return "hybrid"
    if isinstance(model, CvT):
        return "cvt"
    if isinstance(model, CCT):
        return "cct"
    return None


def handles(model: nn.Module) -> bool:
    """Whether `load_pretrained_conv` (rather than `convert.load_pretrained`) loads `model`."""
    return family_of(model) is not None


def detect_conv_format(state_dict: Mapping[str, Tensor], family: str) -> str | None:
    """The layout of `state_dict` among the formats `family` understands, or None."""
    for fmt, marker in _MARKERS[family]:
        if any(marker.fullmatch(key) for key in state_dict):
            return fmt
    return None


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
    the transformer (`patch_embed.proj`, `blocks`, `norm`, `head`...) is `convert.convert_timm`'s."""
    out: dict[str, Tensor] = {}
    for key, value in convert.convert_timm(state_dict).items():
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
    transformer is `convert.convert_npz`'s. timm reads these files the same way, so imported weights
    give timm's logits (both standardise kernels with eps 1e-8 inside the square root and use
    GroupNorm eps 1e-5, where the JAX code divides by std + 1e-5 and uses eps 1e-6)."""
    flat = convert._unwrap(state_dict)
    for prefix in convert._FLAX_PREFIXES:
        if f"{prefix}conv_root/kernel" in flat:
            flat = {key[len(prefix) :]: value for key, value in flat.items() if key.startswith(prefix)}
            break
    backbone: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for key, value in flat.items():
        converted = _npz_backbone_param(key, value)
        if converted is None:
            rest[key] = value
        else:
            backbone[converted[0]] = converted[1]
    return {**convert.convert_npz(rest), **backbone}


# ---------------------------------------------------------------------------------------------
# CvT.

_HF_CVT_LAYER = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_HF_CVT_RULES = convert._rules(
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
    flat = {key.removeprefix("cvt."): value for key, value in convert._unwrap(state_dict).items()}
    return convert._rename(flat, _HF_CVT_RULES)


CONV_CONVERTERS: dict[tuple[str, str], Converter] = {
    ("hybrid", "vitexp"): convert.convert_vitexp,
    ("hybrid", "timm"): convert_timm_hybrid,
    ("hybrid", "npz"): convert_npz_hybrid,
    ("cvt", "vitexp"): convert.convert_vitexp,
    ("cvt", "hf"): convert_hf_cvt,
    ("cct", "vitexp"): convert.convert_vitexp,
}
CONV_FORMATS: dict[str, tuple[str, ...]] = {
    family: tuple(fmt for fam, fmt in CONV_CONVERTERS if fam == family) for family in _NAMES
}


# ---------------------------------------------------------------------------------------------
# Adapting and loading.


def _adapt_input_channels(state_dict: dict[str, Tensor], model: nn.Module, family: str) -> None:
    """Colour weights for a 1-channel model: sum the first convolution over its input channels
    (exact for CvT and CCT; for the hybrid's weight-standardised stem, as timm's
    `adapt_input_conv`, a close approximation, since standardisation follows the sum)."""
    key = _STEM[family]
    weight = state_dict.get(key)
    target = model.state_dict().get(key)
    if weight is None or target is None or weight.ndim != 4:
        return
    if target.shape[1] == 1 and weight.shape[1] > 1:
        state_dict[key] = weight.sum(dim=1, keepdim=True)
        logger.info(
            "pretrained %s summed over its %d input channels for 1-channel images", key, weight.shape[1]
        )


def _adapt_cct_position_embeddings(state_dict: dict[str, Tensor], model: CCT) -> None:
    """Resample learnable CCT position embeddings (no class token) to the model's token grid."""
    key = "embeddings.position_embeddings"
    pos = state_dict.get(key)
    if pos is None or not isinstance(model.embeddings.position_embeddings, nn.Parameter):
        return
    if pos.ndim != 3 or pos.shape[-1] != model.embeddings.position_embeddings.shape[-1]:
        return  # another width: the strict load names the mismatch
    resampled = convert.resample_position_embeddings(pos, model.embeddings.grid_size, num_prefix_tokens=0)
    if resampled.shape != pos.shape:
        logger.info(
            "pretrained position embeddings resampled bicubically to a %dx%d grid",
            *model.embeddings.grid_size,
        )
    state_dict[key] = resampled


def load_converted_conv(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "") -> None:
    """Adapt converted weights (our key names) to `model` and load them strictly; raises a
    one-line ConfigError naming the key and both shapes, or the missing/unexpected names."""
    family = family_of(model)
    if family is None:
        raise ConfigError(f"{type(model).__name__} is not a hybrid, CvT or CCT model")
    adapted = dict(state_dict)
    _adapt_input_channels(adapted, model, family)
    if family == "hybrid":
        # The transformer half is the plain ViT's: position embeddings, class token and classifier
        # are fitted (and the strict load done) by the ViT loader.
        convert.load_converted(model, adapted, source)  # type: ignore[arg-type]
        return
    if isinstance(model, CCT):
        _adapt_cct_position_embeddings(adapted, model)
    target = model.state_dict()
    convert._adapt_classifier(adapted, target)
    convert._check_fits(adapted, target, source or "(in memory)")
    model.load_state_dict(adapted, strict=True)


def load_pretrained_conv(model: nn.Module, path: str | os.PathLike[str], fmt: str = "auto") -> None:
    """Import the weights in `path` into a hybrid, CvT or CCT `model` (in place).

    `fmt` is "auto" (detect from the key names) or one of the family's formats (`CONV_FORMATS`);
    an explicit format that the file contradicts, or weights of another family, raise ConfigError."""
    family = family_of(model)
    if family is None:
        raise ConfigError(f"{type(model).__name__} is not a hybrid, CvT or CCT model")
    name, formats = _NAMES[family], CONV_FORMATS[family]
    fmt = str(fmt).lower()
    if fmt != "auto" and fmt not in formats:
        raise ConfigError(
            f"model.pretrained_format={fmt!r} cannot be imported into a {name}: "
            f"use one of auto, {', '.join(formats)}"
        )
    raw = convert.read_weights(path)
    detected = detect_conv_format(raw, family)
    if detected is None and fmt == "auto":
        other = next((fam for fam in _MARKERS if fam != family and detect_conv_format(raw, fam)), None)
        plain = convert._detect(raw)
        what = (
            f"{_NAMES[other]} weights"
            if other
            else f"{plain} weights of a plain ViT"
            if plain
            else f"weights of an unknown layout (keys such as {convert._first(raw)})"
        )
        raise ConfigError(
            f"{path} holds {what}, not {name} weights: point model.pretrained at {_EXAMPLES[family]}, "
            f"or pick the model config those weights belong to"
        )
    if fmt == "auto":
        fmt = str(detected)
    elif detected is not None and detected != fmt:
        raise ConfigError(
            f"model.pretrained_format={fmt} but {path} holds {detected} weights: "
            f"set model.pretrained_format={detected} (or auto)"
        )
    if family == "hybrid" and fmt == "npz":
        heads = convert._npz_num_heads(raw)
        model_heads = model.encoder.layer[0].attn.num_heads if len(model.encoder.layer) else None
        if heads is not None and model_heads is not None and heads != model_heads:
            raise ConfigError(
                f"pretrained weights {path} have {heads} attention heads but the model {model_heads}: "
                f"set model.num_heads={heads}"
            )
    load_converted_conv(model, CONV_CONVERTERS[(family, fmt)](raw), source=str(path))
    logger.info("loaded %s %s weights from %s", fmt, name, path)
