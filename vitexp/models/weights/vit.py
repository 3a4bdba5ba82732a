"""Import foreign Vision Transformer weights into `vitexp.models.VisionTransformer`.

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
of silently dropping weights. `load_pretrained` then adapts the converted weights to the model at
hand (position embeddings for another image size, RGB weights for grayscale input, a classifier
for other classes) and loads them strictly: anything else that does not fit stops the run with a
one-line `ConfigError`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitexp.errors import ConfigError
from vitexp.models.vit import VisionTransformer

__all__ = [
    "CONVERTERS",
    "FORMATS",
    "adapt_to_model",
    "convert_article",
    "convert_hf",
    "convert_npz",
    "convert_timm",
    "convert_vitexp",
    "detect_format",
    "load_converted",
    "load_pretrained",
    "read_weights",
    "resample_position_embeddings",
]

logger = logging.getLogger(__name__)

FORMATS = ("vitexp", "timm", "hf", "npz", "article")

_CLS = "embeddings.cls_token"
_POS = "embeddings.position_embeddings"
_PATCH = "embeddings.patch_embeddings.weight"

# Keys under which training scripts nest the model's state dict (ours uses "model").
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
# Wrappers that prefix every key: DataParallel/DistributedDataParallel and torch.compile.
_MODULE_PREFIX = "module."
_COMPILE_INFIX = "_orig_mod."
# Flax optimizer checkpoints keep the parameters under opt/target/, newer ones under params/.
_FLAX_PREFIXES = ("opt/target/", "params/")
# Files a Hugging Face `save_pretrained` directory holds, in order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# A key that only one layout has; the first format with a matching key wins.
_MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
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

# The ViT paper's model sizes, keyed by (hidden_size, num_layers, mlp_dim), for error hints.
_PAPER_SIZES = {
    (192, 12, 768): "ti",
    (384, 12, 1536): "s",
    (768, 12, 3072): "b",
    (1024, 24, 4096): "l",
    (1280, 32, 5120): "h",
}

Rules = tuple[tuple[re.Pattern[str], str], ...]


def _rules(*pairs: tuple[str, str]) -> Rules:
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


def _rename(state_dict: Mapping[str, Tensor], rules: Rules) -> dict[str, Tensor]:
    """Rename every key by the first rule that matches all of it; keep unknown keys as they are."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            match = pattern.fullmatch(key)
            if match:
                key = match.expand(replacement)
                break
        out[key] = value
    return out


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


def _strip_wrappers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the key prefixes that DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`,
    also in the middle of a key when only a submodule was compiled) add."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.replace(_COMPILE_INFIX, "")
        while key.startswith(_MODULE_PREFIX):
            key = key[len(_MODULE_PREFIX) :]
        out[key] = value
    return out


def _unwrap(obj: Any, source: str = "the state dict") -> dict[str, Tensor]:
    """The flat name → tensor mapping inside `obj`: a bare state dict or a training checkpoint
    that nests it under `model` (or `state_dict`), with wrapper prefixes stripped."""
    while isinstance(obj, Mapping) and not all(isinstance(value, Tensor) for value in obj.values()):
        nested = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        found = type(obj).__name__ if not isinstance(obj, Mapping) else f"a dict with keys {_first(obj)}"
        raise ConfigError(
            f"{source} holds no state dict ({found}): point model.pretrained at a file of model weights "
            f"(a state dict, or a training checkpoint with the weights under 'model')"
        )
    return _strip_wrappers(obj)


def _first(keys: Any, count: int = 3) -> str:
    names = [str(key) for key in keys]
    shown = ", ".join(names[:count])
    return shown + (f" (+{len(names) - count} more)" if len(names) > count else "")


def _detect(state_dict: Mapping[str, Tensor]) -> str | None:
    for fmt, marker in _MARKERS:
        if any(marker.fullmatch(key) for key in state_dict):
            return fmt
    return None


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """Name the layout of `state_dict`: one of `FORMATS`.

    Accepts a bare state dict or a training checkpoint holding it under `model`; `module.` and
    `_orig_mod.` prefixes are ignored. Raises ConfigError when no layout matches."""
    flat = _unwrap(state_dict)
    fmt = _detect(flat)
    if fmt is None:
        raise ConfigError(
            f"cannot tell which ViT layout the weights use (keys such as {_first(flat)}): "
            f"set model.pretrained_format to one of {', '.join(FORMATS)}"
        )
    return fmt


# ---------------------------------------------------------------------------------------------
# Converters: one pure function per layout, state dict in, our state dict out.


def convert_vitexp(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our own layout: unwrap a training checkpoint and strip `module.`/`_orig_mod.` prefixes."""
    return _unwrap(state_dict)


_TIMM_RULES = _rules(
    (r"cls_token", _CLS),
    (r"pos_embed", _POS),
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
    return _rename(_unwrap(state_dict), _TIMM_RULES)


_HF_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_HF_RULES = _rules(
    (r"embeddings\.cls_token", _CLS),
    (r"embeddings\.position_embeddings", _POS),
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
    flat = _unwrap(state_dict)
    flat = {key.removeprefix("vit."): value for key, value in flat.items()}
    flat.pop("embeddings.mask_token", None)
    return _fuse_qkv(_rename(flat, _HF_RULES))


_ARTICLE_RULES = _rules(
    # The jeonsworld port names it cls_token; the article's text spells it classifer_token.
    (r"transformer\.embeddings\.(?:cls_token|classifer_token)", _CLS),
    (r"transformer\.embeddings\.position_embeddings", _POS),
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
    return _fuse_qkv(_rename(_unwrap(state_dict), _ARTICLE_RULES))


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
    flat = _unwrap(state_dict)
    for prefix in _FLAX_PREFIXES:
        if f"{prefix}embedding/kernel" in flat:
            flat = {key[len(prefix) :]: value for key, value in flat.items() if key.startswith(prefix)}
            break
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        converted: tuple[str, Tensor] | None = None
        block = _NPZ_BLOCK.fullmatch(key)
        if block:
            converted = _npz_block_param(block.group(1), block.group(2), value)
        elif key == "embedding/kernel":
            converted = _PATCH, value.permute(3, 2, 0, 1)  # HWIO → OIHW
        elif key == "embedding/bias":
            converted = "embeddings.patch_embeddings.bias", value
        elif key == "cls":
            converted = _CLS, value
        elif key == "Transformer/posembed_input/pos_embedding":
            converted = _POS, value
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


CONVERTERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Tensor]]] = {
    "vitexp": convert_vitexp,
    "timm": convert_timm,
    "hf": convert_hf,
    "npz": convert_npz,
    "article": convert_article,
}


# ---------------------------------------------------------------------------------------------
# Reading files.


def _weights_in_directory(directory: Path) -> Path:
    """The weights file of a Hugging Face `save_pretrained` directory."""
    for name in _HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(
        f"pretrained weights directory {directory} holds neither {' nor '.join(_HF_WEIGHT_FILES)}: "
        f"set model.pretrained to the weights file itself"
    )


def _read_npz(file: Path) -> dict[str, Tensor]:
    with np.load(file, allow_pickle=False) as arrays:
        return {key: torch.from_numpy(np.array(arrays[key])) for key in arrays.files}


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file), device="cpu")


# What torch's weights-only unpickler says when a pickle asks for a function or class; garbage
# bytes fail it too, with other messages ("Unsupported operand ...").
_CODE_REQUEST = re.compile(r"GLOBAL (\S+)|allowlisted|unrecognized function")


def _refusal(error: BaseException) -> str | None:
    """Why a loader refused to run code from the file, or None when the error is not a refusal."""
    text = str(error)
    if "Weights only load failed" in text:
        request = _CODE_REQUEST.search(text.split("WeightsUnpickler error:", 1)[-1])
        if request is None:
            return None
        return (
            f"unpickling it would call {request.group(1)}"
            if request.group(1)
            else "it pickles Python objects"
        )
    if "allow_pickle" in text:
        return "it holds pickled Python objects"
    return None


def read_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a weights file into a flat name → tensor dict without running code from it.

    `.npz` via numpy (allow_pickle=False), `.safetensors` via safetensors, anything else with
    `torch.load(weights_only=True)`; a Hugging Face `save_pretrained` directory reads its weights
    file. A training checkpoint is unwrapped to the weights under `model`, and `module.` /
    `_orig_mod.` prefixes are stripped. Missing, damaged and code-carrying files raise ConfigError.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = _weights_in_directory(file)
    if not file.is_file():
        raise ConfigError(
            f"pretrained weights file {file} does not exist: set model.pretrained to an existing "
            f".npz, .safetensors, .pth or .bin file"
        )
    suffix = file.suffix.lower()
    try:
        if suffix == ".npz":
            obj: Any = _read_npz(file)
        elif suffix == ".safetensors":
            obj = _read_safetensors(file)
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    # The loaders raise a zoo of types for damaged files (OSError, RuntimeError, EOFError,
    # KeyError, zipfile.BadZipFile, SafetensorError...); any failure to parse means the file is
    # unusable, and the refusals are told apart by their message.
    except Exception as error:
        reason = _refusal(error)
        if reason is not None:
            raise ConfigError(
                f"refused to load {file}: {reason}, and code from a weights file is never executed; "
                f"re-save only the weights, e.g. torch.save(model.state_dict(), path) or as .safetensors"
            ) from None
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"cannot read pretrained weights {file} ({type(error).__name__}: {detail}): the file is damaged "
            f"or truncated, download or copy it again"
        ) from error
    return _unwrap(obj, source=str(file))


# ---------------------------------------------------------------------------------------------
# Adapting converted weights to the model at hand.


def _is_square(count: int) -> bool:
    return count >= 0 and math.isqrt(count) ** 2 == count


def resample_position_embeddings(
    position_embeddings: Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> Tensor:
    """Resample the patch part of (B, prefix + g*g, D) position embeddings to `new_grid`
    bicubically (align_corners=False, no antialiasing, as timm does; the original JAX code zooms
    bilinearly) for fine-tuning at another resolution; the `num_prefix_tokens` class-token rows
    are kept as they are. Returns the input itself when the grid already matches."""
    prefix = position_embeddings[:, :num_prefix_tokens]
    grid = position_embeddings[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ConfigError(
            f"the pretrained position embeddings hold {grid.shape[1]} patch positions, not a square grid: "
            f"only checkpoints trained on square images can be resized"
        )
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if (old, old) == new_grid:
        return position_embeddings
    batch, _, dim = grid.shape
    image = grid.reshape(batch, old, old, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    grid = image.permute(0, 2, 3, 1).reshape(batch, new_grid[0] * new_grid[1], dim).to(grid.dtype)
    return torch.cat([prefix, grid], dim=1)


def _adapt_input_channels(state_dict: dict[str, Tensor], model: VisionTransformer) -> None:
    """Colour weights for a grayscale model: summing the patch kernel over its input channels
    gives, on a one-channel image, what the colour model gives on that image repeated over its
    channels (timm's `adapt_input_conv` does the same)."""
    weight = state_dict.get(_PATCH)
    channels = model.embeddings.patch_embeddings.in_channels
    if weight is not None and weight.ndim == 4 and channels == 1 and weight.shape[1] > 1:
        state_dict[_PATCH] = weight.sum(dim=1, keepdim=True)
        logger.info(
            "pretrained patch embedding summed over its %d input channels for 1-channel images",
            weight.shape[1],
        )


def _adapt_position_embeddings(
    state_dict: dict[str, Tensor], model: VisionTransformer, target: Mapping[str, Tensor]
) -> None:
    """Fit the position embeddings (and class token) to the model's grid and classifier."""
    pos = state_dict.get(_POS)
    if pos is None or pos.ndim != 3 or pos.shape[-1] != target[_POS].shape[-1]:
        return  # absent or another width: the strict load names the mismatch
    embeddings = model.embeddings
    has_cls = _CLS in state_dict
    # timm's no_embed_class checkpoints have a class token but no position for it; adding a zero
    # position is the same computation.
    prefix_tokens = 1 if has_cls and _is_square(pos.shape[1] - 1) else 0
    prefix = (
        pos[:, :prefix_tokens] if prefix_tokens else pos.new_zeros(pos.shape[0], int(has_cls), pos.shape[2])
    )
    grid = resample_position_embeddings(pos[:, prefix_tokens:], embeddings.grid_size, num_prefix_tokens=0)
    if grid.shape[1] != pos.shape[1] - prefix_tokens:
        logger.info(
            "pretrained position embeddings resampled bicubically from a %dx%d to a %dx%d patch grid",
            math.isqrt(pos.shape[1] - prefix_tokens),
            math.isqrt(pos.shape[1] - prefix_tokens),
            *embeddings.grid_size,
        )
    if embeddings.num_prefix_tokens == 0 and has_cls:
        # classifier='gap' pools the patch tokens: the class token and its position have no use.
        del state_dict[_CLS]
        prefix = prefix[:, :0]
        logger.info("pretrained class token dropped: the model pools its patch tokens (classifier='gap')")
    elif embeddings.num_prefix_tokens == 1 and not has_cls:
        # The file comes from a pooling model: the new class token and its position start from
        # the model's own initialisation and are learned while fine-tuning.
        state_dict[_CLS] = target[_CLS].detach().clone()
        prefix = target[_POS][:, :1].detach().clone().to(pos.dtype)
        logger.info("the pretrained weights have no class token: the model's freshly initialised one is kept")
    state_dict[_POS] = torch.cat([prefix, grid], dim=1)


def _group(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key: value for key, value in state_dict.items() if key.startswith(prefix)}


def _same_shapes(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[key].shape == b[key].shape for key in a)


def _describe_classifier(pre_logits: Mapping[str, Tensor], head: Mapping[str, Tensor]) -> str:
    pre = pre_logits.get("pre_logits.0.weight")
    parts = [f"a {pre.shape[0]}-wide pre-logits layer"] if pre is not None else []
    weight = head.get("head.weight")
    parts.append(f"a head for {weight.shape[0]} classes" if weight is not None else "no head")
    return " and ".join(parts)


def _adapt_classifier(state_dict: dict[str, Tensor], target: Mapping[str, Tensor]) -> None:
    """Keep the checkpoint's pre-logits layer and head only when they fit the model exactly;
    otherwise (other classes, e.g. a 21k head fine-tuned on 10) use the model's freshly
    initialised ones. A head is never kept on top of a replaced pre-logits layer, since it was
    trained on that layer's outputs."""
    source_pre, target_pre = _group(state_dict, "pre_logits."), _group(target, "pre_logits.")
    source_head, target_head = _group(state_dict, "head."), _group(target, "head.")
    pre_fits = _same_shapes(source_pre, target_pre)
    head_fits = pre_fits and _same_shapes(source_head, target_head)
    if head_fits:
        return
    replaced = ([] if pre_fits else [(source_pre, target_pre)]) + [(source_head, target_head)]
    for source, fresh in replaced:
        for key in source:
            del state_dict[key]
        for key, value in fresh.items():
            state_dict[key] = value.detach().clone()
    fresh = [name for name, part in (("pre-logits layer", target_pre), ("head", target_head)) if part]
    logger.info(
        "pretrained classifier not loaded: the file has %s, the model %s; %s",
        _describe_classifier(source_pre, source_head),
        _describe_classifier(target_pre, target_head),
        f"the model's freshly initialised {' and '.join(fresh)} will be trained"
        if fresh
        else "none is needed",
    )


def adapt_to_model(state_dict: Mapping[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Fit converted weights (our key names) to `model`: RGB patch kernel summed for 1-channel
    input, position embeddings resampled to the model's patch grid, class token dropped for
    classifier='gap' (or taken from the model when the file has none), and the file's
    pre-logits layer/head replaced by the model's own when they do not fit. Returns a new dict;
    everything else is left for the strict load to check."""
    adapted = dict(state_dict)
    target = model.state_dict()
    _adapt_input_channels(adapted, model)
    _adapt_position_embeddings(adapted, model, target)
    _adapt_classifier(adapted, target)
    return adapted


# ---------------------------------------------------------------------------------------------
# Loading.


def _config_dirs() -> tuple[Path, ...]:
    package = Path(__file__).resolve().parents[2]
    # The wheel carries the configs as vitexp/_conf, a checkout has them at the top.
    return package / "_conf" / "model", package.parent / "conf" / "model"


def _hint(state_dict: Mapping[str, Tensor]) -> str:
    """Which model config the weights call for, read off their shapes."""
    patch = state_dict.get(_PATCH)
    fc1 = state_dict.get("encoder.layer.0.ffn.fc1.weight")
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", key))}
    if patch is None or patch.ndim != 4 or fc1 is None or not layers:
        return "pick the model config that matches the checkpoint"
    hidden, patch_size, num_layers, mlp_dim = patch.shape[0], patch.shape[-1], max(layers) + 1, fc1.shape[0]
    sizes = f"patch_size={patch_size} hidden_size={hidden} mlp_dim={mlp_dim} num_layers={num_layers}"
    size = _PAPER_SIZES.get((hidden, num_layers, mlp_dim))
    name = f"vit_{size}{patch_size}" if size else None
    if name and any((directory / f"{name}.yaml").is_file() for directory in _config_dirs()):
        return f"pick the model config that matches the checkpoint (model={name}, i.e. {sizes})"
    return f"pick a model config that matches the checkpoint ({sizes})"


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def _check_fits(state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor], source: str) -> None:
    """Raise a one-line ConfigError for the first weight whose shape differs, else for missing
    and unexpected names."""
    wrong = [
        key for key, value in target.items() if key in state_dict and state_dict[key].shape != value.shape
    ]
    if wrong:
        # A layer's weight says more than the class token or the position table of another width.
        key = next((key for key in wrong if key not in (_CLS, _POS)), wrong[0])
        raise ConfigError(
            f"pretrained weights {source} do not fit the model: {key} is {_shape(state_dict[key])} "
            f"in the file but {_shape(target[key])} in the model; {_hint(state_dict)}"
        )
    missing = [key for key in target if key not in state_dict]
    unexpected = [key for key in state_dict if key not in target]
    if missing or unexpected:
        problems = ([f"missing from the file: {_first(missing)}"] if missing else []) + (
            [f"not in the model: {_first(unexpected)}"] if unexpected else []
        )
        raise ConfigError(
            f"pretrained weights {source} do not fit the model ({'; '.join(problems)}); {_hint(state_dict)}"
        )


def load_converted(model: VisionTransformer, state_dict: Mapping[str, Tensor], source: str = "") -> None:
    """Adapt converted weights (our key names) to `model` and load them strictly; `source` names
    them in error messages. Raises ConfigError, naming the key and both shapes, on any mismatch."""
    adapted = adapt_to_model(state_dict, model)
    _check_fits(adapted, model.state_dict(), source or "(in memory)")
    try:
        model.load_state_dict(adapted, strict=True)
    except RuntimeError as error:  # pragma: no cover - _check_fits sees every mismatch first
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"pretrained weights {source} do not fit the model: {first_line}") from error


def _npz_num_heads(state_dict: Mapping[str, Tensor]) -> int | None:
    """Flax stores query kernels as (D, heads, head_dim): the only layout that records the head
    count. Fused or flattened weights load into any head count, silently computing something else."""
    for key, value in state_dict.items():
        if key.endswith("MultiHeadDotProductAttention_1/query/kernel") and value.ndim == 3:
            return int(value.shape[1])
    return None


def load_pretrained(model: VisionTransformer, path: str | os.PathLike[str], fmt: str = "auto") -> None:
    """Import the weights in `path` into `model` (in place).

    `fmt` is one of "auto" (detect from the key names) or `FORMATS`; an explicit format that the
    file contradicts raises ConfigError. The weights are converted to our names, adapted to the
    model (`adapt_to_model`) and loaded strictly: any remaining mismatch raises a one-line
    ConfigError that names the key and both shapes, or the missing/unexpected names.

    The convolutional families (R50 hybrid, CvT, CCT) have layouts of their own and are loaded by
    `vitexp.models.weights.conv.load_pretrained_conv`."""
    from vitexp.models.weights import (
        conv as convert_conv,  # here, not at the top: convert_conv builds on this module
    )

    if convert_conv.handles(model):
        convert_conv.load_pretrained_conv(model, path, fmt)
        return
    fmt = str(fmt).lower()
    if fmt not in ("auto", *FORMATS):
        raise ConfigError(f"model.pretrained_format={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    raw = read_weights(path)
    detected = _detect(raw)
    if fmt == "auto":
        if detected is None:
            raise ConfigError(
                f"cannot tell which ViT layout {path} uses (keys such as {_first(raw)}): "
                f"set model.pretrained_format to one of {', '.join(FORMATS)}"
            )
        fmt = detected
    elif detected is not None and detected != fmt:
        raise ConfigError(
            f"model.pretrained_format={fmt} but {path} holds {detected} weights: "
            f"set model.pretrained_format={detected} (or auto)"
        )
    heads = _npz_num_heads(raw) if fmt == "npz" else None
    model_heads = model.encoder.layer[0].attn.num_heads if len(model.encoder.layer) else None
    if heads is not None and model_heads is not None and heads != model_heads:
        raise ConfigError(
            f"pretrained weights {path} have {heads} attention heads but the model {model_heads}: "
            f"set model.num_heads={heads}"
        )
    load_converted(model, CONVERTERS[fmt](raw), source=str(path))
    logger.info("loaded %s weights from %s", fmt, path)


def check_state_dict_fits(state_dict: Mapping[str, Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise a one-line ConfigError naming the first key whose shape differs (with both shapes),
    or the missing/unexpected keys, when `state_dict` cannot load strictly into `model`."""
    _check_fits(state_dict, model.state_dict(), source)
