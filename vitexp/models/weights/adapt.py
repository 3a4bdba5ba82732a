"""Fitting converted weights (our key names) to the model at hand, and the strict fit check.

What may differ between the file and the model and is adapted, for every family that has the
part: the image channels (colour weights for a grayscale model: the first convolution summed over
its input channels), the patch grid (position embeddings resampled bicubically), the class token
(dropped for `classifier='gap'`, or the model's own kept when the file has none) and the
classifier (the model's freshly initialised pre-logits layer and head when the file's do not fit).
Anything else that does not fit is a wrong model config: `check_state_dict_fits` names the first
mismatch in one line, with the named config the weights call for when they are a paper-sized ViT.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitexp.errors import ConfigError
from vitexp.models.vit import paper_model_name
from vitexp.models.weights.keys import CLS_TOKEN, PATCH_WEIGHT, POSITION_EMBEDDINGS, first_keys

__all__ = [
    "adapt_classifier",
    "adapt_input_channels",
    "adapt_position_embeddings",
    "adapt_to_model",
    "check_state_dict_fits",
    "resample_position_embeddings",
]

logger = logging.getLogger(__name__)


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


def adapt_input_channels(state_dict: dict[str, Tensor], target: Mapping[str, Tensor], stem: str) -> None:
    """Colour weights for a 1-channel model, in place: summing the first convolution (`stem`) over
    its input channels gives, on a one-channel image, what the colour model gives on that image
    repeated over its channels (timm's `adapt_input_conv` does the same; for the hybrid's
    weight-standardised stem a close approximation, since standardisation follows the sum)."""
    weight, wanted = state_dict.get(stem), target.get(stem)
    if weight is None or wanted is None or weight.ndim != 4:
        return
    if wanted.shape[1] == 1 and weight.shape[1] > 1:
        state_dict[stem] = weight.sum(dim=1, keepdim=True)
        logger.info(
            "pretrained %s summed over its %d input channels for 1-channel images", stem, weight.shape[1]
        )


class _TokenGrid(Protocol):
    """What a model's `embeddings` records about its tokens when it has a learned position table."""

    grid_size: tuple[int, int]
    num_prefix_tokens: int


def adapt_position_embeddings(
    state_dict: dict[str, Tensor], model: nn.Module, target: Mapping[str, Tensor]
) -> None:
    """Fit learned position embeddings (and the class token) to the model's grid and pooling, in
    place. Models with a learned table (`embeddings.position_embeddings`: the ViT, the hybrid,
    CCT) have `embeddings.grid_size` and `embeddings.num_prefix_tokens` too; others (CvT, CCT with
    sine or no position embeddings) are left alone."""
    pos, wanted = state_dict.get(POSITION_EMBEDDINGS), target.get(POSITION_EMBEDDINGS)
    if pos is None or wanted is None or pos.ndim != 3 or pos.shape[-1] != wanted.shape[-1]:
        return  # absent or another width: the strict load names the mismatch
    # The model is any nn.Module (a user's config may name its own class); having a learned
    # table in its state dict is what promises these attributes.
    embeddings = cast(_TokenGrid, model.embeddings)
    has_cls = CLS_TOKEN in state_dict
    if pos.shape == wanted.shape and has_cls == (embeddings.num_prefix_tokens == 1):
        # Already the model's table; the file does not record its grid, which may be rectangular.
        return
    # timm's no_embed_class checkpoints have a class token but no position for it; adding a zero
    # position is the same computation.
    prefix_tokens = 1 if has_cls and _is_square(pos.shape[1] - 1) else 0
    prefix = (
        pos[:, :prefix_tokens] if prefix_tokens else pos.new_zeros(pos.shape[0], int(has_cls), pos.shape[2])
    )
    grid = resample_position_embeddings(pos[:, prefix_tokens:], embeddings.grid_size, num_prefix_tokens=0)
    if grid.shape[1] != pos.shape[1] - prefix_tokens:
        side = math.isqrt(pos.shape[1] - prefix_tokens)
        logger.info(
            "pretrained position embeddings resampled bicubically from a %dx%d to a %dx%d patch grid",
            side,
            side,
            *embeddings.grid_size,
        )
    if embeddings.num_prefix_tokens == 0 and has_cls:
        # Pooling models (classifier='gap', CCT) read the patch tokens: the class token has no use.
        del state_dict[CLS_TOKEN]
        prefix = prefix[:, :0]
        logger.info("pretrained class token dropped: the model pools its patch tokens (classifier='gap')")
    elif embeddings.num_prefix_tokens == 1 and not has_cls:
        # The file comes from a pooling model: the new class token and its position start from
        # the model's own initialisation and are learned while fine-tuning.
        state_dict[CLS_TOKEN] = target[CLS_TOKEN].detach().clone()
        prefix = wanted[:, :1].detach().clone().to(pos.dtype)
        logger.info("the pretrained weights have no class token: the model's freshly initialised one is kept")
    state_dict[POSITION_EMBEDDINGS] = torch.cat([prefix, grid], dim=1)


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


def adapt_classifier(state_dict: dict[str, Tensor], target: Mapping[str, Tensor]) -> None:
    """Keep the checkpoint's pre-logits layer and head only when they fit the model exactly;
    otherwise (other classes, e.g. a 21k head fine-tuned on 10) use the model's freshly
    initialised ones, in place. A head is never kept on top of a replaced pre-logits layer, since
    it was trained on that layer's outputs."""
    source_pre, target_pre = _group(state_dict, "pre_logits."), _group(target, "pre_logits.")
    source_head, target_head = _group(state_dict, "head."), _group(target, "head.")
    pre_fits = _same_shapes(source_pre, target_pre)
    if pre_fits and _same_shapes(source_head, target_head):
        return
    replaced = ([] if pre_fits else [(source_pre, target_pre)]) + [(source_head, target_head)]
    for source, fresh in replaced:
        for key in source:
            del state_dict[key]
        for key, value in fresh.items():
            state_dict[key] = value.detach().clone()
    fresh_parts = [name for name, part in (("pre-logits layer", target_pre), ("head", target_head)) if part]
    logger.info(
        "pretrained classifier not loaded: the file has %s, the model %s; %s",
        _describe_classifier(source_pre, source_head),
        _describe_classifier(target_pre, target_head),
        f"the model's freshly initialised {' and '.join(fresh_parts)} will be trained"
        if fresh_parts
        else "none is needed",
    )


def adapt_to_model(state_dict: Mapping[str, Tensor], model: nn.Module, stem: str) -> dict[str, Tensor]:
    """Fit converted weights (our key names) to `model`, whose first convolution's weight is
    named `stem`: every adaptation of the module's docstring that applies. Returns a new dict;
    everything else is left for `check_state_dict_fits`."""
    adapted = dict(state_dict)
    target = model.state_dict()
    adapt_input_channels(adapted, target, stem)
    adapt_position_embeddings(adapted, model, target)
    adapt_classifier(adapted, target)
    return adapted


def _hint(state_dict: Mapping[str, Tensor]) -> str:
    """Which model config the weights call for, read off their shapes."""
    patch = state_dict.get(PATCH_WEIGHT)
    fc1 = state_dict.get("encoder.layer.0.ffn.fc1.weight")
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", key))}
    if patch is None or patch.ndim != 4 or fc1 is None or not layers:
        return "pick the model config that matches the checkpoint"
    hidden, patch_size, num_layers, mlp_dim = patch.shape[0], patch.shape[-1], max(layers) + 1, fc1.shape[0]
    sizes = f"patch_size={patch_size} hidden_size={hidden} mlp_dim={mlp_dim} num_layers={num_layers}"
    name = paper_model_name(hidden, num_layers, mlp_dim, patch_size)
    if name:
        return f"pick the model config that matches the checkpoint (model={name}, i.e. {sizes})"
    return f"pick a model config that matches the checkpoint ({sizes})"


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def check_state_dict_fits(state_dict: Mapping[str, Tensor], model: nn.Module, source: str) -> None:
    """Raise a one-line ConfigError naming the first key whose shape differs (with both shapes),
    or the missing/unexpected keys, when `state_dict` cannot load strictly into `model`; `source`
    names the weights (a file, or "in checkpoint PATH")."""
    target = model.state_dict()
    wrong = [
        key for key, value in target.items() if key in state_dict and state_dict[key].shape != value.shape
    ]
    if wrong:
        # A layer's weight says more than the class token or the position table of another width.
        key = next((key for key in wrong if key not in (CLS_TOKEN, POSITION_EMBEDDINGS)), wrong[0])
        raise ConfigError(
            f"pretrained weights {source} do not fit the model: {key} is {_shape(state_dict[key])} "
            f"in the file but {_shape(target[key])} in the model; {_hint(state_dict)}"
        )
    missing = [key for key in target if key not in state_dict]
    unexpected = [key for key in state_dict if key not in target]
    if missing or unexpected:
        problems = ([f"missing from the file: {first_keys(missing)}"] if missing else []) + (
            [f"not in the model: {first_keys(unexpected)}"] if unexpected else []
        )
        raise ConfigError(
            f"pretrained weights {source} do not fit the model ({'; '.join(problems)}); {_hint(state_dict)}"
        )
