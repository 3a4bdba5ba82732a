"""Vision Transformer models. The named sizes are the configs in `conf/model/`.

`VisionTransformer` (ViT), and the convolutional families: `HybridVisionTransformer` (the ViT
paper's R50+ViT), `CvT` (Wu et al. 2021) and `CCT` (Hassani et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from torch import nn

from vitexp.models.cct import CCT
from vitexp.models.cvt import CvT
from vitexp.models.hybrid import HybridVisionTransformer
from vitexp.models.vit import Attention, Block, Embeddings, Encoder, Mlp, VisionTransformer

__all__ = [
    "CCT",
    "Attention",
    "Block",
    "CvT",
    "Embeddings",
    "Encoder",
    "HybridVisionTransformer",
    "Mlp",
    "VisionTransformer",
    "build_model",
]

# Keys of a model config that say how to initialise the model rather than what to build.
_LOAD_KEYS = ("pretrained", "pretrained_format")


def build_model(model_cfg: Mapping[str, Any], *, load_pretrained: bool = True) -> nn.Module:
    """Instantiate a model config (`_target_` plus keyword arguments) and, when
    `pretrained` names a file, import its weights (format detected unless named)."""
    kwargs = {k: v for k, v in dict(model_cfg).items() if k not in _LOAD_KEYS}
    model = instantiate(kwargs, _convert_="all")
    path = model_cfg.get("pretrained")
    if load_pretrained and path:
        from vitexp.models.weights.vit import load_pretrained as load

        load(model, str(path), fmt=str(model_cfg.get("pretrained_format") or "auto"))
    return model
