"""Converters of foreign Vision Transformer weights to `vitexp.models.VisionTransformer`'s names.

Five layouts are understood:

* ``vitexp``: our own state dicts, bare or inside a training checkpoint under ``"model"``;
* ``timm``: `timm.models.vision_transformer.VisionTransformer` (``patch_embed.proj``, ``blocks.N``);
* ``hf``: Hugging Face ``ViTModel`` / ``ViTForImageClassification``, in the layout of the files on
  the Hub (``vit.encoder.layer.N.attention.attention.query``) and in transformers-5 module names
  (``vit.layers.N.attention.q_proj``);
* ``npz``: the JAX/Flax ``.npz`` checkpoints of google-research/vision_transformer;
* ``article``: ``epoch%s_checkpoint.bin`` state dicts of the article's training script (the
  jeonsworld/ViT-pytorch port: ``transformer.embeddings...``, separate query/key/value).

Each layout is translated by one pure function ``state_dict -> state_dict`` (`CONVERTERS`, in the
spirit of timm's ``checkpoint_filter_fn``), so a conversion can be tested without a model. Keys a
converter does not know are passed through unchanged, so that the strict load names them instead
of silently dropping weights. Fitting the result to a model and loading it is
`vitexp.models.weights.load_pretrained`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vitexp.errors import ConfigError
from vitexp.models.vit import VisionTransformer
from vitexp.models.weights.adapt import check_state_dict_fits  # for training.loop's import; see __all__
from vitexp.models.weights.io import unwrap_state_dict
from vitexp.models.weights.keys import (
    CLS_TOKEN,
    PATCH_WEIGHT,
    POSITION_EMBEDDINGS,
    Converter,
    Markers,
    detect_layout,
    first_keys,
    rename,
    rules,
    strip_prefix,
)

__all__ = [
    "CONVERTERS",
    "FLAX_PREFIXES",
    "FORMATS",
    "MARKERS",
    "check_npz_heads",
    # Re-exported because vitexp.training.loop imports it from here; its home is the package.
    "check_state_dict_fits",
    "convert_article",
    "convert_hf",
    "convert_npz",
    "convert_timm",
    "convert_vitexp",
    "detect_format",
]

FORMATS = ("vitexp", "timm", "hf", "npz", "article")

# Flax optimizer checkpoints keep the parameters under opt/target/, newer ones under params/.
FLAX_PREFIXES = ("opt/target/", "params/")

# A key that only one layout has; the first format with a matching key wins.
MARKERS: Markers = (
    ("vitexp", re.compile(r"embeddings\.patch_embeddings\.weight|encoder\.layer\.\d+\.attn\.qkv\.weight")),
    (
        "article",
        re.compile(
            r"transformer\.embeddings\.patch_embeddings\.weight"
            r"|transformer\.encoder\.layer\.\d+\.attn\.query\.weight"
        ),
    ),
    (
        "hf",
        re.compile(
            r"(vit\.)?embeddings\.patch_embeddings\.projection\.weight"
            r"|(vit\.)?(encoder\.layer|layers)\.\d+\.attention\.(attention\.query|q_proj)\.weight"
        ),
    ),
    ("timm", re.compile(r"patch_embed\.proj\.weight|blocks\.\d+\.attn\.qkv\.weight")),
    ("npz", re.compile(r"((opt/target|params)/)?(embedding/kernel|Transformer/encoderblock_\d+/.+)")),
)

_QKV_PART = re.compile(r"encoder\.layer\.(\d+)\.attn\.(query|key|value)\.(weight|bias)")


def _fuse_qkv(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate separate `attn.query/key/value` projections into our fused `attn.qkv` (rows
    ordered q|k|v, which is how `Attention._qkv` splits them). An incomplete triple is left
    alone so the strict load reports it."""
    parts: dict[tuple[str, str], dict[str, str]] = {}
    for key in state_dict:
        match = _QKV_PART.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            parts.setdefault((layer, kind), {})[which] = key
    out = dict(state_dict)
    for (layer, kind), keys in parts.items():
        if len(keys) == 3:
            tensors = [out.pop(keys[which]) for which in ("query", "key", "value")]
            out[f"encoder.layer.{layer}.attn.qkv.{kind}"] = torch.cat(tensors, dim=0)
    return out


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """Name the ViT layout of `state_dict`: one of `FORMATS`.

    Accepts a bare state dict or a training checkpoint holding it under `model`; `module.` and
    `_orig_mod.` prefixes are ignored. Raises ConfigError when no layout matches."""
    flat = unwrap_state_dict(state_dict)
    fmt = detect_layout(flat, MARKERS)
    if fmt is None:
        raise ConfigError(
            f"cannot tell which ViT layout the weights use (keys such as {first_keys(flat)}): "
            f"set model.pretrained_format to one of {', '.join(FORMATS)}"
        )
    return fmt


# ---------------------------------------------------------------------------------------------
# Converters: one pure function per layout, state dict in, our state dict out.


def convert_vitexp(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our own layout: unwrap a training checkpoint and strip `module.`/`_orig_mod.` prefixes."""
    return unwrap_state_dict(state_dict)


_TIMM_RULES = rules(
    (r"cls_token", CLS_TOKEN),
    (r"pos_embed", POSITION_EMBEDDINGS),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.attention_norm.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layer.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attn.out.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.ffn_norm.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.ffn.\2.\3"),
    (r"blocks\.(\d+)\.(ls1|ls2)\.gamma", r"encoder.layer.\1.\2.gamma"),
    (r"norm\.(weight|bias)", r"encoder.encoder_norm.\1"),
    # timm < 0.9 kept the paper's representation layer as pre_logits.fc.
    (r"pre_logits\.fc\.(weight|bias)", r"pre_logits.0.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
)


def convert_timm(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """timm `VisionTransformer` → ours: a renaming; timm's qkv is fused in the same q|k|v order.

    Parts our model lacks (`fc_norm` with weights, `reg_token`, `norm_pre`, `q_norm`...) keep
    their names so the strict load reports them."""
    return rename(unwrap_state_dict(state_dict), _TIMM_RULES)


_HF_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_HF_RULES = rules(
    (r"embeddings\.cls_token", CLS_TOKEN),
    (r"embeddings\.position_embeddings", POSITION_EMBEDDINGS),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    # Hub files (and save_pretrained) use the legacy names; transformers 5 renames them on load.
    (_HF_LAYER + r"attention\.attention\.(query|key|value)\.(weight|bias)", r"encoder.layer.\1.attn.\2.\3"),
    (_HF_LAYER + r"attention\.q_proj\.(weight|bias)", r"encoder.layer.\1.attn.query.\2"),
    (_HF_LAYER + r"attention\.k_proj\.(weight|bias)", r"encoder.layer.\1.attn.key.\2"),
    (_HF_LAYER + r"attention\.v_proj\.(weight|bias)", r"encoder.layer.\1.attn.value.\2"),
    (_HF_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"encoder.layer.\1.attn.out.\2"),
    (_HF_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"encoder.layer.\1.ffn.fc1.\2"),
    (_HF_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"encoder.layer.\1.ffn.fc2.\2"),
    (_HF_LAYER + r"layernorm_before\.(weight|bias)", r"encoder.layer.\1.attention_norm.\2"),
    (_HF_LAYER + r"layernorm_after\.(weight|bias)", r"encoder.layer.\1.ffn_norm.\2"),
    (r"layernorm\.(weight|bias)", r"encoder.encoder_norm.\1"),
    # ViTModel's pooler is tanh(dense(class token)): exactly the paper's pre-logits layer.
    (r"pooler\.dense\.(weight|bias)", r"pre_logits.0.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
)


def convert_hf(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Hugging Face ViTModel / ViTForImageClassification → ours: strip the `vit.` prefix of the
    classification model, rename, fuse q/k/v. `mask_token` (masked image modelling only) is
    dropped. HF ViT uses exact GELU like ours, but LayerNorm eps 1e-12 by default: set the
    model's norm_eps to the checkpoint's `layer_norm_eps` for bit-exact outputs."""
    flat = unwrap_state_dict(state_dict)
    flat = {key.removeprefix("vit."): value for key, value in flat.items()}
    flat.pop("embeddings.mask_token", None)
    return _fuse_qkv(rename(flat, _HF_RULES))


_ARTICLE_RULES = rules(
    # The jeonsworld port names it cls_token; the article's text spells it classifer_token.
    (r"transformer\.embeddings\.(?:cls_token|classifer_token)", CLS_TOKEN),
    (r"transformer\.embeddings\.position_embeddings", POSITION_EMBEDDINGS),
    (r"transformer\.embeddings\.patch_embeddings\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (
        r"transformer\.encoder\.layer\.(\d+)\.(attention_norm|ffn_norm)\.(weight|bias)",
        r"encoder.layer.\1.\2.\3",
    ),
    (
        r"transformer\.encoder\.layer\.(\d+)\.attn\.(query|key|value|out)\.(weight|bias)",
        r"encoder.layer.\1.attn.\2.\3",
    ),
    (r"transformer\.encoder\.layer\.(\d+)\.ffn\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.ffn.\2.\3"),
    (r"transformer\.encoder\.encoder_norm\.(weight|bias)", r"encoder.encoder_norm.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
)


def convert_article(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """The article's `VisionTransformer` (`epoch%s_checkpoint.bin`) → ours: our module names are
    the article's, so this drops the `transformer.` level and fuses query/key/value. Hybrid
    (ResNet-stem) checkpoints keep their `hybrid_model` keys and are refused by the strict load."""
    return _fuse_qkv(rename(unwrap_state_dict(state_dict), _ARTICLE_RULES))


_NPZ_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")
_NPZ_LEAF = {"scale": "weight", "bias": "bias", "kernel": "weight"}


def _npz_block_param(layer: str, name: str, value: Tensor) -> tuple[str, Tensor] | None:
    """One parameter of `Transformer/encoderblock_N/...` (the Flax `Encoder1DBlock`, whose
    submodules are numbered in creation order: LayerNorm_0, MultiHeadDotProductAttention_1,
    LayerNorm_2, MlpBlock_3)."""
    prefix = f"encoder.layer.{layer}."
    module, _, leaf = name.rpartition("/")
    if leaf not in _NPZ_LEAF:
        return None
    param = _NPZ_LEAF[leaf]
    if module == "LayerNorm_0":
        return f"{prefix}attention_norm.{param}", value
    if module == "LayerNorm_2":
        return f"{prefix}ffn_norm.{param}", value
    attention = re.fullmatch(r"MultiHeadDotProductAttention_1/(query|key|value|out)", module)
    if attention:
        which = attention.group(1)
        if which == "out":  # kernel (heads, head_dim, D) → Linear weight (D, heads*head_dim)
            value = value.reshape(-1, value.shape[-1]).T if leaf == "kernel" else value
        elif leaf == "kernel":  # (D, heads, head_dim) → (heads*head_dim, D)
            value = value.reshape(value.shape[0], -1).T
        else:  # bias (heads, head_dim)
            value = value.reshape(-1)
        return f"{prefix}attn.{which}.{param}", value
    dense = re.fullmatch(r"MlpBlock_3/Dense_([01])", module)
    if dense:
        value = value.T if leaf == "kernel" else value  # Dense kernels are (in, out)
        return f"{prefix}ffn.fc{int(dense.group(1)) + 1}.{param}", value
    return None


def convert_npz(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Original JAX/Flax `.npz` (google-research/vision_transformer) → ours: Flax kernels are
    (in, out) and the patch convolution HWIO, so they are transposed; the per-head attention
    kernels are flattened. Keys outside the known layout (e.g. big_vision's stacked
    `Transformer/encoderblock/...`) pass through and are reported by the strict load."""
    flat = strip_prefix(unwrap_state_dict(state_dict), FLAX_PREFIXES, "embedding/kernel")
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        converted: tuple[str, Tensor] | None = None
        block = _NPZ_BLOCK.fullmatch(key)
        if block:
            converted = _npz_block_param(block.group(1), block.group(2), value)
        elif key == "embedding/kernel":
            converted = PATCH_WEIGHT, value.permute(3, 2, 0, 1)  # HWIO → OIHW
        elif key == "embedding/bias":
            converted = "embeddings.patch_embeddings.bias", value
        elif key == "cls":
            converted = CLS_TOKEN, value
        elif key == "Transformer/posembed_input/pos_embedding":
            converted = POSITION_EMBEDDINGS, value
        else:
            top = re.fullmatch(r"(Transformer/encoder_norm|pre_logits|head)/(scale|bias|kernel)", key)
            if top:
                module = {
                    "Transformer/encoder_norm": "encoder.encoder_norm",
                    "pre_logits": "pre_logits.0",
                    "head": "head",
                }[top.group(1)]
                leaf = top.group(2)
                converted = f"{module}.{_NPZ_LEAF[leaf]}", value.T if leaf == "kernel" else value
        name, tensor = converted if converted is not None else (key, value)
        out[name] = tensor.contiguous()
    return _fuse_qkv(out)


CONVERTERS: dict[str, Converter] = {
    "vitexp": convert_vitexp,
    "timm": convert_timm,
    "hf": convert_hf,
    "npz": convert_npz,
    "article": convert_article,
}


def _npz_num_heads(state_dict: Mapping[str, Tensor]) -> int | None:
    """Flax stores query kernels as (D, heads, head_dim): the only layout that records the head
    count. Fused or flattened weights load into any head count, silently computing something else."""
    for key, value in state_dict.items():
        if key.endswith("MultiHeadDotProductAttention_1/query/kernel") and value.ndim == 3:
            return int(value.shape[1])
    return None


def check_npz_heads(state_dict: Mapping[str, Tensor], model: VisionTransformer, source: str) -> None:
    """Refuse `.npz` weights of another head count than the model's: the one layout that records it."""
    heads = _npz_num_heads(state_dict)
    model_heads = model.encoder.blocks[0].attn.num_heads if len(model.encoder.layer) else None
    if heads is not None and model_heads is not None and heads != model_heads:
        raise ConfigError(
            f"pretrained weights {source} have {heads} attention heads but the model {model_heads}: "
            f"set model.num_heads={heads}"
        )
