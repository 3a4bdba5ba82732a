"""Any timm model by name (`model=timm`, `model.name=...`): built by `timm.create_model`, its
pretrained weights fetched through vitexp's Hugging Face source (the Hub cache, its locks and
offline mode, one-line errors) and loaded by timm itself.

timm is an optional dependency (the `timm` extra): it is imported when a timm model is built or
grouped, and its absence is one line naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from vitexp.errors import ConfigError

TIMM_EXTRA = "pip install -e '.[timm]'"


def require_timm() -> ModuleType:
    """The timm package, or a one-line ConfigError saying how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ConfigError(f"model=timm needs the timm package, which is not installed: {TIMM_EXTRA}") from e


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
