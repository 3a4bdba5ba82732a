"""Building a model from its config: a user's (`build_model`) or one stored in a checkpoint
(`build_stored_model`).

A model config is a `_target_` (the model class) and its keyword arguments, plus `pretrained` and
`pretrained_format`, which say how to initialise the model rather than what to build. A user's
config may name any importable class; its keys are compared with the class's arguments before the
call (`vitexp.registry.check_arguments`, which reads named parameters and a family's shared
`**kwargs: Unpack[...]` alike), so a misspelt setting is a one-line ConfigError with a did-you-mean
rather than a TypeError.
A config read from a checkpoint is not trusted: it is built only through the registry of vitexp's
own model classes (`vitexp.registry.build_registered`), which refuses anything else before
calling it.
"""

from __future__ import annotations

import pydoc
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitexp.errors import ConfigError, DataError
from vitexp.models.cct import CCT
from vitexp.models.cvt import CvT
from vitexp.models.hybrid import HybridVisionTransformer
from vitexp.models.timm_models import create_timm_model, timm_model
from vitexp.models.vit import VisionTransformer
from vitexp.models.weights import load_pretrained as load_pretrained_weights
from vitexp.models.weights import resolve_weights
from vitexp.registry import build_registered, check_arguments

__all__ = [
    "LOAD_KEYS",
    "MODEL_REGISTRY",
    "StoredModel",
    "build_model",
    "build_stored_model",
    "class_count",
    "input_size",
]

# Keys of a model config that say how to initialise the model rather than what to build.
LOAD_KEYS = ("pretrained", "pretrained_format")

_MODEL_CLASSES: tuple[type[nn.Module], ...] = (VisionTransformer, HybridVisionTransformer, CvT, CCT)
# What `build_stored_model` returns: one of those classes (the hybrid is a VisionTransformer), or
# a timm model (`model=timm`), which has the same `num_classes` and `img_size`.
StoredModel: TypeAlias = VisionTransformer | CvT | CCT | nn.Module
# Every path a stored config may name a model constructor by: the public one that `conf/` writes
# (`vitexp.models.CvT`) and the defining module's (`vitexp.models.cvt.CvT`). timm's models are
# built by name through `timm_model`, which refuses arguments that would read files.
_CONSTRUCTORS: tuple[Callable[..., nn.Module], ...] = (*_MODEL_CLASSES, timm_model)
MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    path: fn
    for fn in _CONSTRUCTORS
    for path in (f"vitexp.models.{fn.__name__}", f"{fn.__module__}.{fn.__qualname__}")
}


def _plain_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(model_cfg, DictConfig):
        container = OmegaConf.to_container(model_cfg, resolve=True)
        assert isinstance(container, dict)
        return {str(key): value for key, value in container.items()}
    return dict(model_cfg)


def _target(path: Any) -> Callable[..., Any]:
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"model._target_={path!r} must name the model class, e.g. vitexp.models.VisionTransformer"
        )
    target = pydoc.locate(path)  # None when no module has that name; an import that fails raises
    if target is None:
        raise ConfigError(
            f"model._target_={path} cannot be imported: name a model class such as "
            f"vitexp.models.VisionTransformer"
        )
    if not callable(target):
        raise ConfigError(f"model._target_={path} is a {type(target).__name__}, not a model class")
    return target


def _instantiate_nested(value: Any) -> Any:
    """Arguments that are configs of their own (`{_target_: ...}`) are built by Hydra, as before."""
    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value, _convert_="all")
    return value


def build_model(model_cfg: Mapping[str, Any], *, load_pretrained: bool = True) -> nn.Module:
    """Build the model a user's config describes (`_target_` plus keyword arguments) and, when
    `pretrained` names weights and `load_pretrained`, import them (format detected unless
    `pretrained_format` names it). `pretrained` is a file, a name, `hf-hub:ORG/NAME` or a URL
    (`weights.resolve_weights`), downloaded and cached if need be; the model is built first, so
    a bad value stops the run before a long download. Raises ConfigError for a target that
    cannot be imported or an argument it does not take, before calling anything; the
    constructor's own ConfigErrors (bad values) pass through, and anything else it raises is a
    bug and keeps its traceback."""
    config = _plain_config(model_cfg)
    target = _target(config.get("_target_"))
    kwargs = {key: value for key, value in config.items() if key != "_target_" and key not in LOAD_KEYS}
    directives = [key for key in kwargs if key.startswith("_") and key.endswith("_")]
    if directives:
        raise ConfigError(
            f"model.{directives[0]} is not supported: a model config is its _target_ and keyword arguments"
        )
    check_arguments(target, kwargs, "model")
    source = config.get("pretrained")
    if target is timm_model:  # timm fetches nothing itself but loads and adapts its own weights
        return create_timm_model(**kwargs, pretrained=source if load_pretrained else None)
    model = target(**{key: _instantiate_nested(value) for key, value in kwargs.items()})
    if load_pretrained and source:
        weights = resolve_weights(str(source))
        load_pretrained_weights(model, weights, fmt=str(config.get("pretrained_format") or "auto"))
    return model


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) a model takes: every vitexp model, and a timm model built by
    `timm_model`, has it as `img_size`."""
    size = getattr(model, "img_size", None)
    if not (isinstance(size, tuple) and len(size) == 2):
        raise ConfigError(f"model: {type(model).__name__} has no img_size (height, width) to feed it at")
    return int(size[0]), int(size[1])


def class_count(model: nn.Module) -> int:
    """The number of classes a model scores (its `num_classes`, as vitexp's and timm's models have)."""
    count = getattr(model, "num_classes", None)
    if not isinstance(count, int):
        raise ConfigError(f"model: {type(model).__name__} has no num_classes")
    return count


def build_stored_model(model_cfg: Mapping[str, Any], *, source: str) -> StoredModel:
    """Rebuild the model of a config read from a file (`source`, named in messages) through
    `MODEL_REGISTRY` only: any other `_target_`, a nested `_target_`, a value that is not plain
    data or an argument the class does not take is refused with a one-line DataError before
    anything is called. `pretrained`/`pretrained_format` are ignored (the checkpoint's own weights
    replace them; no weights file is read here), and a stored value the class refuses (a
    ConfigError) becomes a DataError naming `source`."""
    try:
        return build_registered(model_cfg, MODEL_REGISTRY, what="model", source=source, ignore=LOAD_KEYS)
    except DataError as e:
        # The registry names the file in its refusals of targets and keys, not in those of values.
        if str(e).startswith(f"{source}:"):
            raise
        raise DataError(f"{source}: its stored {e}") from None
    except ConfigError as e:
        raise DataError(
            f"{source}: its stored model config cannot be built ({e}); the checkpoint is "
            f"damaged or was edited"
        ) from e
