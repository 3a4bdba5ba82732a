"""Importing weights from other layouts (timm, Hugging Face, the official `.npz` files, the
article's checkpoints, our own) into vitexp's models.

Where the file comes from (a path, a name such as `ViT-B_16`, `hf-hub:ORG/NAME`, a URL) is
`sources.resolve_weights`'s business: it returns a local file, downloaded and cached if need be.

One entry point: `load_pretrained(model, path, fmt="auto")` reads the file without running code
(`io`), tells its layout from the key names unless `fmt` names it, converts it to our names with
the converter of the model's family and that layout (`vit`, `conv`), fits it to the model
(`adapt`: image channels, patch grid, class token, classifier) and loads it strictly. A file that
cannot be read raises DataError; weights that do not fit the chosen model config, or a format the
file contradicts, raise ConfigError; each in one line.

`FAMILIES` is the table that dispatch reads: per model class, its formats and converters, the
keys that give each format away, and the name of its first convolution (the one that sees the
image's channels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from vitexp.errors import ConfigError
from vitexp.models.cct import CCT
from vitexp.models.cvt import CvT
from vitexp.models.hybrid import HybridVisionTransformer
from vitexp.models.vit import VisionTransformer
from vitexp.models.weights import conv, vit
from vitexp.models.weights.adapt import adapt_to_model, check_state_dict_fits, resample_position_embeddings
from vitexp.models.weights.io import read_weights
from vitexp.models.weights.keys import Converter, Markers, detect_layout, first_keys
from vitexp.models.weights.sources import resolve_weights

__all__ = [
    "FAMILIES",
    "Family",
    "check_state_dict_fits",
    "family_of",
    "load_converted",
    "load_pretrained",
    "read_weights",
    "resample_position_embeddings",
    "resolve_weights",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """How weights are imported into one model class (and its subclasses)."""

    name: str  # in messages: "ViT", "CvT"...
    model_type: type[nn.Module]
    converters: Mapping[str, Converter]  # format -> converter, in the order messages list them
    markers: Markers
    stem: str  # our name of the weight of the first convolution
    examples: str  # what model.pretrained can point at, for messages

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.converters)


# Subclasses before their base class: the hybrid is a VisionTransformer too.
FAMILIES: tuple[Family, ...] = (
    Family(
        name="R50+ViT hybrid",
        model_type=HybridVisionTransformer,
        converters=conv.HYBRID_CONVERTERS,
        markers=conv.HYBRID_MARKERS,
        stem="embeddings.backbone.root.conv.weight",
        examples="timm's vit_base_r50_s16_224, R50+ViT-B_16.npz or a vitexp checkpoint of model=vit_r50_b16",
    ),
    Family(
        name="CvT",
        model_type=CvT,
        converters=conv.CVT_CONVERTERS,
        markers=conv.CVT_MARKERS,
        stem="stages.0.embeddings.projection.weight",
        examples="Hugging Face microsoft/cvt-13 or a vitexp checkpoint of model=cvt_13",
    ),
    Family(
        name="CCT",
        model_type=CCT,
        converters=conv.CCT_CONVERTERS,
        markers=conv.CCT_MARKERS,
        stem="embeddings.tokenizer.0.conv.weight",
        examples="a vitexp checkpoint of a cct_* model",
    ),
    Family(
        name="ViT",
        model_type=VisionTransformer,
        converters=vit.CONVERTERS,
        markers=vit.MARKERS,
        stem="embeddings.patch_embeddings.weight",
        examples="timm, Hugging Face, .npz or article ViT weights, or a vitexp checkpoint of a vit_* model",
    ),
)
_ALL_FORMATS = {fmt for family in FAMILIES for fmt in family.formats}


def family_of(model: nn.Module) -> Family:
    """The row of `FAMILIES` that imports weights into `model`; ConfigError for other models."""
    for family in FAMILIES:
        if isinstance(model, family.model_type):
            return family
    raise ConfigError(
        f"cannot import pretrained weights into a {type(model).__name__}: vitexp imports them into "
        f"{', '.join(family.model_type.__name__ for family in FAMILIES)}"
    )


def _checked_format(fmt: str, family: Family) -> str:
    fmt = str(fmt).lower()
    if fmt == "auto" or fmt in family.formats:
        return fmt
    if fmt not in _ALL_FORMATS:
        raise ConfigError(f"model.pretrained_format={fmt!r} is not one of auto, {', '.join(family.formats)}")
    raise ConfigError(
        f"model.pretrained_format={fmt!r} cannot be imported into a {family.name}: "
        f"use one of auto, {', '.join(family.formats)}"
    )


def _what_it_holds(state_dict: Mapping[str, Tensor], family: Family) -> str | None:
    """Which other family's weights these are, in words, or None when none recognises them."""
    for other in FAMILIES:
        fmt = detect_layout(state_dict, other.markers) if other is not family else None
        if fmt is not None:
            return (
                f"{fmt} weights of a plain ViT"
                if other.model_type is VisionTransformer
                else f"{other.name} weights"
            )
    return None


def _resolve_format(state_dict: Mapping[str, Tensor], fmt: str, family: Family, path: str) -> str:
    """The layout to convert from: the detected one for "auto", else `fmt` unless the file
    contradicts it."""
    detected = detect_layout(state_dict, family.markers)
    if fmt == "auto" and detected is None:
        held = _what_it_holds(state_dict, family)
        if held is None and family.model_type is VisionTransformer:
            raise ConfigError(
                f"cannot tell which ViT layout {path} uses (keys such as {first_keys(state_dict)}): "
                f"set model.pretrained_format to one of {', '.join(family.formats)}"
            )
        held = held or f"weights of an unknown layout (keys such as {first_keys(state_dict)})"
        raise ConfigError(
            f"{path} holds {held}, not {family.name} weights: point model.pretrained at {family.examples}, "
            f"or pick the model config those weights belong to"
        )
    if fmt == "auto":
        return str(detected)
    if detected is not None and detected != fmt:
        raise ConfigError(
            f"model.pretrained_format={fmt} but {path} holds {detected} weights: "
            f"set model.pretrained_format={detected} (or auto)"
        )
    return fmt


def load_converted(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "") -> None:
    """Fit converted weights (our key names) to `model` (`adapt.adapt_to_model`) and load them
    strictly, in place; `source` names them in messages. Raises a one-line ConfigError naming
    the key and both shapes, or the missing/unexpected names, on any remaining mismatch."""
    adapted = adapt_to_model(state_dict, model, family_of(model).stem)
    check_state_dict_fits(adapted, model, source or "(in memory)")
    model.load_state_dict(adapted, strict=True)


def load_pretrained(model: nn.Module, path: str | os.PathLike[str], fmt: str = "auto") -> None:
    """Import the weights in `path` into `model` (in place): see the module's docstring.

    `fmt` is "auto" (detect from the key names) or one of the model family's formats
    (`family_of(model).formats`)."""
    family = family_of(model)
    fmt = _checked_format(fmt, family)
    raw = read_weights(path)
    fmt = _resolve_format(raw, fmt, family, str(path))
    if fmt == "npz" and isinstance(model, VisionTransformer):
        vit.check_npz_heads(raw, model, str(path))
    load_converted(model, family.converters[fmt](raw), source=str(path))
    logger.info("loaded %s %s weights from %s", fmt, family.name, path)
