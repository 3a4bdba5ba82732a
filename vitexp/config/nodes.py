"""Reading config nodes: the one walk over nested keys, and a node as plain Python data."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every `(dotted key, value)` of a nested config, sections before what they hold. Lists
    are values, not sections; a DictConfig is read unresolved (`${...}` as written)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if not isinstance(node, Mapping):
        return
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        yield full, value
        yield from walk(value, full)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """The settings of a nested config by dotted key: every value that is not a section."""
    return {key: value for key, value in walk(node, prefix) if not isinstance(value, Mapping)}


def flat_keys(node: Any) -> list[str]:
    """Every dotted key of a config, sections included."""
    return [key for key, _ in walk(node)]


def missing_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys whose value is `???`, sorted (`hydra` aside). Read unresolved:
    OmegaConf.missing_keys raises on an interpolation that points at a missing value."""
    return sorted(k for k, v in leaves(cfg).items() if v == "???" and k.split(".")[0] != "hydra")


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain dict with string keys, interpolations resolved."""
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
