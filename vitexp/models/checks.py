"""Checks of the settings every model family takes, each a one-line ConfigError naming the setting.

Each module runs these on the arguments it reads, before building anything with them (`Encoder`
on the transformer encoder's, which `VisionTransformer`, the hybrid and `CCT` pass on to it; each
family on its own), so a bad value (`drop_path_rate=1.5`, `hidden_size=0`, `model.hidden_size=abc`
on the command line) is reported as the setting it is, not as a shape error or a TypeError from
deep inside torch. Each returns the value it accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vitexp.errors import ConfigError

__all__ = [
    "check_choice",
    "check_layer_scale",
    "check_non_negative",
    "check_norm_eps",
    "check_positive",
    "check_positive_number",
    "check_positive_or_none",
    "check_rate",
    "head_dim",
    "image_size",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> int:
    """A size or count: an integer above zero."""
    if not _is_int(value):
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    if value <= 0:
        raise ConfigError(f"{name}={value} must be positive")
    return value


def check_positive_number(name: str, value: Any) -> float:
    """A ratio or scale: any number above zero."""
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be a positive number")
    return float(value)


def check_non_negative(name: str, value: Any) -> int:
    """A count that may be zero (`num_classes=0`: no head, a feature extractor; a padding)."""
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{name}={value!r} must be an integer >= 0")
    return value


def check_positive_or_none(name: str, value: Any) -> int | None:
    """An optional size: null, or an integer above zero."""
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer or null")
    return value


def check_rate(name: str, value: Any) -> float:
    """A dropout or stochastic-depth probability: 1 would drop everything."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"{name}={value!r} must be in [0, 1)")
    return float(value)


def check_norm_eps(value: Any, name: str = "norm_eps") -> float:
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be > 0")
    return float(value)


def check_layer_scale(value: Any, name: str = "layer_scale_init") -> float | None:
    """LayerScale's initial value (CaiT starts at 0.1 to 1e-6, smaller for deeper models); null,
    not 0, turns LayerScale off."""
    if value is None:
        return None
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be > 0 or null (no LayerScale)")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def image_size(value: Any, name: str = "img_size") -> tuple[int, int]:
    """An image size as (height, width): one positive integer for square images, or a pair."""
    if _is_int(value):
        return check_positive(name, value), value
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    if pair and all(_is_int(side) and side > 0 for side in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{name}={value!r} must be a positive integer or a [height, width] pair of them")


def head_dim(hidden_size: int, num_heads: int) -> int:
    """The width of each attention head; a width the heads do not divide is a ConfigError."""
    if hidden_size % num_heads:
        raise ConfigError(
            f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: "
            f"choose num_heads among the divisors of hidden_size"
        )
    return hidden_size // num_heads
