"""Vision Transformer models. The named sizes are the configs in `conf/model/`.

`VisionTransformer` (ViT), and the convolutional families: `HybridVisionTransformer` (the ViT
paper's R50+ViT), `CvT` (Wu et al. 2021) and `CCT` (Hassani et al. 2021). `build_model` builds
one from a user's config, `build_stored_model` from a config stored in a checkpoint (through an
allow-list); `weights.load_pretrained` imports foreign weights into any of them. `timm_model`
builds any timm model by name (`model=timm`)."""

from __future__ import annotations

from vitexp.models.build import StoredModel, build_model, build_stored_model, class_count, input_size
from vitexp.models.cct import CCT
from vitexp.models.cvt import CvT
from vitexp.models.hybrid import HybridVisionTransformer
from vitexp.models.timm_models import timm_model
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
    "StoredModel",
    "VisionTransformer",
    "build_model",
    "build_stored_model",
    "class_count",
    "input_size",
    "timm_model",
]
