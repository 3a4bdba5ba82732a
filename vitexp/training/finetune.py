"""Which parameters train: `trainer.freeze` (a linear probe, or glob patterns of parameter names)
and `trainer.train_last_blocks` (the last N blocks and what follows them).

Frozen parameters get `requires_grad=False` before the optimizer is built, so they get no
gradient, no optimizer state and no weight decay (`optim.param_groups` leaves them out), and
DDP and gradient clipping skip them.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from vitexp.errors import ConfigError
from vitexp.training.optim import parameter_layers


def classifier(model: nn.Module) -> nn.Module:
    """The layer that maps features to classes: timm's `get_classifier()`, vitexp's `head`."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(
            f"trainer.freeze=backbone: {type(model).__name__} has no classifier (head) to train"
        )
    return head


def _name_shapes(names: list[str]) -> str:
    """A few parameter names, one per top-level module, for messages: `embeddings.*, head.*`."""
    tops = dict.fromkeys(name.split(".")[0] for name in names)
    return ", ".join(f"{top}.*" if any(n.startswith(f"{top}.") for n in names) else top for top in tops)


def _frozen_by_patterns(names: list[str], patterns: list[str], model: nn.Module) -> set[str]:
    frozen: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ConfigError(
                f"trainer.freeze: {pattern} matches no parameter of {type(model).__name__}; its parameters "
                f"are {_name_shapes(names)}"
            )
        frozen.update(matched)
    return frozen


def _frozen_below_last_blocks(model: nn.Module, names: list[str], count: int) -> set[str]:
    """Everything below the last `count` blocks: the layers (`parameter_layers`) under the
    lowest layer of those blocks, or, for count 0, every block and below."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, list | nn.ModuleList | nn.Sequential) or not len(blocks):
        raise ConfigError(
            f"trainer.train_last_blocks: {type(model).__name__} has no list of blocks (model.blocks) to "
            f"count; use trainer.freeze=[PATTERN,...]"
        )
    if count > len(blocks):
        raise ConfigError(
            f"trainer.train_last_blocks={count} but the model has {len(blocks)} blocks; give at most "
            f"{len(blocks)}"
        )
    name_of = {id(param): name for name, param in model.named_parameters()}
    layers = parameter_layers(model)

    def block_layers(chosen: list[Any]) -> list[int]:
        return [layers[name_of[id(p)]] for block in chosen for p in block.parameters()]

    lowest_trained = (
        min(block_layers(list(blocks)[-count:])) if count else max(block_layers(list(blocks))) + 1
    )
    return {name for name in names if layers[name] < lowest_trained}


def freeze(model: nn.Module, spec: Any, train_last_blocks: int | None) -> None:
    """Freeze what `trainer.freeze` (`spec`) and `trainer.train_last_blocks` say. ConfigError,
    one line, for a pattern that matches nothing, a count of blocks the model does not have, or
    both settings at once."""
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    if spec is not None and train_last_blocks is not None:
        raise ConfigError(
            "trainer.freeze and trainer.train_last_blocks both choose what trains: give one of them"
        )
    if spec == "backbone":
        head = {id(p) for p in classifier(model).parameters()}
        if not head:
            raise ConfigError(
                "trainer.freeze=backbone: the model's classifier has no weights (num_classes=0?)"
            )
        frozen = {name for name, param in model.named_parameters() if id(param) not in head}
    elif spec is not None:
        frozen = _frozen_by_patterns(names, [spec] if isinstance(spec, str) else list(spec), model)
    elif train_last_blocks is not None:
        frozen = _frozen_below_last_blocks(model, names, train_last_blocks)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
