"""State-dict key handling that every converter shares: rule-based renaming, telling a layout
from its key names, and short key listings for one-line messages."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

__all__ = [
    "CLS_TOKEN",
    "PATCH_WEIGHT",
    "POSITION_EMBEDDINGS",
    "Converter",
    "Markers",
    "Rules",
    "detect_layout",
    "first_keys",
    "rename",
    "rules",
    "strip_prefix",
]

# A layout's translation to our names: a pure function, state dict in, state dict out.
Converter = Callable[[Mapping[str, Any]], dict[str, Tensor]]
Rules = tuple[tuple[re.Pattern[str], str], ...]
# (format, a key pattern only that format has), in order: the first format with a match wins.
Markers = tuple[tuple[str, re.Pattern[str]], ...]


def rules(*pairs: tuple[str, str]) -> Rules:
    """Compile (pattern, replacement) pairs; a pattern must match a whole key."""
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


def rename(state_dict: Mapping[str, Tensor], rename_rules: Rules) -> dict[str, Tensor]:
    """Rename every key by the first rule that matches all of it; keep unknown keys as they are,
    so that the strict load names them instead of silently dropping weights."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, replacement in rename_rules:
            match = pattern.fullmatch(key)
            if match:
                key = match.expand(replacement)
                break
        out[key] = value
    return out


def strip_prefix(state_dict: Mapping[str, Tensor], prefixes: Iterable[str], marker: str) -> dict[str, Tensor]:
    """Keep only the keys under the first of `prefixes` that holds `marker`, without the prefix
    (Flax optimizer checkpoints nest the parameters under `opt/target/`, newer ones `params/`);
    the state dict as it is when none does."""
    for prefix in prefixes:
        if f"{prefix}{marker}" in state_dict:
            return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return dict(state_dict)


def detect_layout(state_dict: Mapping[str, Any], markers: Markers) -> str | None:
    """The first format among `markers` that one of the keys belongs to, or None."""
    for fmt, marker in markers:
        if any(marker.fullmatch(key) for key in state_dict):
            return fmt
    return None


def first_keys(keys: Iterable[Any], count: int = 3) -> str:
    """`a, b, c (+N more)`: enough of a key list to recognise it in a one-line message."""
    names = [str(key) for key in keys]
    shown = ", ".join(names[:count])
    return shown + (f" (+{len(names) - count} more)" if len(names) > count else "")


# Our own names of the parts the adapters fit to a model (`vitexp.models.vit.Embeddings`).
CLS_TOKEN = "embeddings.cls_token"
POSITION_EMBEDDINGS = "embeddings.position_embeddings"
PATCH_WEIGHT = "embeddings.patch_embeddings.weight"
