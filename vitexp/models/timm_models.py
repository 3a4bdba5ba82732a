"""Any timm model by name (`model=timm`, `model.name=...`): built by `timm.create_model`, its
pretrained weights fetched through vitexp's sources (`model.pretrained=true`: the Hub id timm
names for the model, through huggingface_hub's cache, locks and offline mode, with one-line
errors) and loaded and adapted by timm itself (its checkpoint filter, a new head for another
class count, position embeddings resampled to another image size, other input channels).

What the model expects of its inputs (mean, std, interpolation, size) comes from timm's
pretrained config of the name, unless `model.mean`/`std`/`interpolation`/`img_size` say
otherwise; the overrides are written into the model's `pretrained_cfg`, which is what
`timm_inputs` reads.

timm is an optional dependency (the `timm` extra): it is imported when a timm model is built or
grouped, and its absence is one line naming the extra.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypedDict

from torch import Tensor, nn
from typing_extensions import Unpack

from vitexp.errors import ConfigError, first_line
from vitexp.models.weights import resolve_weights
from vitexp.models.weights.io import HF_WEIGHT_FILES

TIMM_EXTRA = "pip install -e '.[timm]'"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def require_timm() -> ModuleType:
    """The timm package, or a one-line ConfigError saying how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ConfigError(f"model=timm needs the timm package, which is not installed: {TIMM_EXTRA}") from e


def _check_name(timm: ModuleType, name: str) -> None:
    """An unknown name is one line with the closest names timm has."""
    if timm.is_model(name.split(".")[0]):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(name.split(".")[0], known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('*vit*') lists them"
    raise ConfigError(f"model.name={name} is not a timm model{hint}")


def _weights_file(name: str, pretrained: bool | str, pretrained_cfg: Any) -> str:
    """The local file of the weights `model.pretrained` asks for: true is the Hub repo timm's
    pretrained config names (e.g. timm/vit_small_patch14_dinov2.lvd142m); a string is any
    source `resolve_weights` takes (a file, hf-hub:ORG/NAME, a URL)."""
    if pretrained is not True:
        return str(resolve_weights(str(pretrained)))
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if not hub_id:
        raise ConfigError(
            f"model.pretrained=true: timm publishes no Hub weights for {name}; give model.pretrained=PATH "
            f"(a file) or hf-hub:ORG/NAME, or choose a tag that has them (timm.list_pretrained('{name}*'))"
        )
    filename = getattr(pretrained_cfg, "hf_hub_filename", None)
    return str(resolve_weights(f"hf-hub:{hub_id}", hub_files=(filename,) if filename else HF_WEIGHT_FILES))


# Arguments of timm.create_model itself: not model arguments, and ones that would read files
# (checkpoint_path) or replace the pretrained config; refused in model.model_args.
_CREATE_ARGUMENTS = ("model_name", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                     "checkpoint_path", "cache_dir", "scriptable", "exportable", "no_jit")  # fmt: skip


class TimmSettings(TypedDict, total=False):
    """What `model=timm` configures: `create_timm_model`'s arguments but the weights."""

    name: str
    num_classes: int
    in_channels: int
    img_size: int | list[int] | None
    drop_rate: float
    drop_path_rate: float
    mean: list[float] | None
    std: list[float] | None
    interpolation: str | None
    model_args: dict[str, Any] | None


def timm_model(**settings: Unpack[TimmSettings]) -> nn.Module:
    """A timm model by name, randomly initialised: the constructor `model=timm` names (and the
    allow-list of stored configs admits); `build_model` adds `model.pretrained`'s weights."""
    return create_timm_model(**settings)


def create_timm_model(
    *,
    name: str,
    num_classes: int,
    in_channels: int = 3,
    img_size: int | list[int] | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    interpolation: str | None = None,
    model_args: dict[str, Any] | None = None,
    pretrained: bool | str | None = None,
) -> nn.Module:
    """`timm.create_model(name, num_classes=..., in_chans=in_channels, img_size=..., ...)`, with
    timm's pretrained weights when `pretrained` is true (or those of a file, a Hub repo or a URL
    when it is a string), loaded and adapted by timm. `img_size`, `mean`, `std`,
    `interpolation`: null takes the pretrained config's. `model_args`: any other keyword
    argument of the model (e.g. `{reg_tokens: 4}`). The model gets `img_size` (height, width),
    what vitexp's loop and inference read."""
    timm = require_timm()
    _check_name(timm, name)
    extra = dict(model_args or {})
    reserved = [key for key in extra if key in _CREATE_ARGUMENTS or key in TimmSettings.__annotations__]
    if reserved:
        raise ConfigError(
            f"model.model_args.{reserved[0]} is not for model_args: it is a setting of its own or timm's"
        )
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ConfigError(f"model.interpolation={interpolation} is not one of {', '.join(INTERPOLATIONS)}")
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    overlay: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in (("mean", mean), ("std", std), ("interpolation", interpolation))
        if value is not None
    }
    size = (
        None if img_size is None else (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    )
    if size is not None:
        overlay["input_size"] = (in_channels, *size)
        extra["img_size"] = img_size
    for key, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if rate:  # passed only when set: not every timm model takes them
            extra[key] = rate
    if pretrained:
        overlay["file"] = _weights_file(name, pretrained, pretrained_cfg)

    def create(arguments: dict[str, Any]) -> nn.Module:
        return timm.create_model(
            name, pretrained=bool(pretrained), pretrained_cfg_overlay=overlay, num_classes=num_classes,
            in_chans=in_channels, **arguments,
        )  # fmt: skip

    try:
        try:
            model = create(extra)
        except TypeError as e:
            if "img_size" not in extra or "img_size" not in str(e):
                raise
            # A convolutional network has no img_size argument: it takes any size as it is.
            model = create({k: v for k, v in extra.items() if k != "img_size"})
    except TypeError as e:  # an argument the model's constructor does not take
        raise ConfigError(f"model: timm's {name} refuses its arguments ({first_line(e)})") from e
    except RuntimeError as e:  # timm's strict load: weights of another architecture
        if not pretrained:
            raise
        raise ConfigError(
            f"model.pretrained: the weights in {overlay['file']} do not fit timm's {name} "
            f"({first_line(e)[:200]})"
        ) from e
    # What vitexp's loop and inference feed it at (a plain attribute: not in its state dict).
    model.img_size = tuple(int(s) for s in timm_inputs(model).input_size[1:])  # type: ignore[assignment]
    return model


@dataclass(frozen=True)
class Inputs:
    """What a timm model expects of its images: timm's data config of it."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    input_size: tuple[int, int, int]


def timm_inputs(model: nn.Module) -> Inputs:
    """The mean, std, interpolation and input size of a model built by `timm_model`: its
    pretrained config, with the overrides it was built with."""
    require_timm()
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    interpolation = config["interpolation"] if config["interpolation"] in INTERPOLATIONS else "bicubic"
    return Inputs(
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=interpolation,
        input_size=tuple(int(v) for v in config["input_size"]),  # type: ignore[arg-type]
    )


def is_timm_model(model: nn.Module) -> bool:
    """Whether `model` was built by timm (it carries timm's `pretrained_cfg`)."""
    return getattr(model, "pretrained_cfg", None) is not None and not hasattr(model, "parameter_layers")


def timm_parameter_layers(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer as timm's `param_groups_layer_decay` numbers it: from the model's
    `group_matcher` (fine-grained: one layer per block), else timm's fallback grouping."""
    require_timm()
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        layers: dict[str, int] = group_parameters(model, matcher(coarse=False), reverse=True)
        return layers
    fallback: dict[str, int] = auto_group_layers(model)
    return fallback


def _timm_vit_attention(model: nn.Module) -> list[Any] | None:
    """The attention modules of a timm ViT whose probabilities can be read, else None: a model
    of timm's VisionTransformer family whose every block's `attn` computes them explicitly (as
    `softmax(q·kᵀ)` fed to `attn_drop`) when its fused path is off."""
    # timm is imported already when the model is one of its own: no import for other models.
    vision_transformer = sys.modules.get("timm.models.vision_transformer")
    if vision_transformer is None or not isinstance(model, vision_transformer.VisionTransformer):
        return None
    attentions = [getattr(block, "attn", None) for block in getattr(model, "blocks", ())]
    readable = all(
        isinstance(attn, nn.Module)
        and hasattr(attn, "fused_attn")
        and isinstance(getattr(attn, "attn_drop", None), nn.Module)
        for attn in attentions
    )
    return attentions if attentions and readable else None


def readable_timm_attention(model: nn.Module) -> bool:
    """Whether `timm_attention_maps` can read this model's attention (timm's ViT family)."""
    return _timm_vit_attention(model) is not None


def timm_attention_maps(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every block's attention probabilities for the normalised images `x`, in one forward
    pass: (B, heads, tokens, tokens) per block, prefix tokens (class, registers) first."""
    return timm_attention_pass(model, x)[0]


def timm_attention_pass(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """One forward pass of `x`: every block's attention probabilities, and the logits.

    timm computes the probabilities only on its unfused path (`scaled_dot_product_attention`
    never returns them), so the pass turns `fused_attn` off in every block and records what
    each block's `attn_drop` receives; the model is left as it was."""
    attentions = _timm_vit_attention(model)
    if attentions is None:
        raise ConfigError(f"timm's {type(model).__name__} has no attention maps that vitexp can read")
    maps: list[Tensor] = []
    fused = [attn.fused_attn for attn in attentions]
    hooks = [
        attn.attn_drop.register_forward_hook(lambda _module, args, _out: maps.append(args[0].detach()))
        for attn in attentions
    ]
    try:
        for attn in attentions:
            attn.fused_attn = False
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for attn, was_fused in zip(attentions, fused, strict=True):
            attn.fused_attn = was_fused
    return maps, logits
