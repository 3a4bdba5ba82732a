"""Building objects from configs that are not trusted: the config stored inside a checkpoint.

Hydra's `instantiate` calls whatever `_target_` names, which is right for the configs a user
writes and wrong for one read from a file someone else made: a checkpoint whose stored model
config names `builtins.open` would truncate a file while it is being "rebuilt". Here a target is
looked up in an explicit registry of vitexp's own constructors, and everything is checked before
anything is called: the target is known, its arguments are named parameters of that constructor,
and every value is plain data (numbers, strings, booleans, None, lists and dicts of them) with no
nested `_target_`. Anything else is refused in one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from vitexp.errors import DataError

PLAIN = (int, float, str, bool, type(None))


def _plain(value: Any, where: str) -> None:
    if isinstance(value, PLAIN):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DataError(f"{where} has a non-string key {key!r}")
            if key.startswith("_") and key.endswith("_"):
                raise DataError(f"{where}.{key}: a nested Hydra directive ({key}) is not allowed here")
            _plain(item, f"{where}.{key}")
        return
    raise DataError(f"{where} holds a {type(value).__name__}, not plain data")


def build_registered(
    spec: Mapping[str, Any],
    registry: Mapping[str, Callable[..., Any]],
    *,
    what: str,
    source: str,
    ignore: tuple[str, ...] = (),
) -> Any:
    """Call the registered constructor that `spec["_target_"]` names with the rest of `spec`.

    `what` names the config (e.g. "model"), `source` the file it came from; keys in `ignore`
    are dropped before the call (settings of vitexp's own, such as `pretrained`). Raises
    DataError, naming the key, before calling anything when the spec is not allowed."""
    if not isinstance(spec, Mapping):
        raise DataError(f"{source}: its stored {what} config is a {type(spec).__name__}, not a mapping")
    target = spec.get("_target_")
    if not isinstance(target, str) or target not in registry:
        known = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in registry}))
        raise DataError(
            f"{source}: its stored {what} config names _target_={target!r}, which is not one of vitexp's "
            f"own {what} constructors ({known}); refused without calling it"
        )
    kwargs = {k: v for k, v in spec.items() if k != "_target_" and k not in ignore}
    for key, value in kwargs.items():
        if not isinstance(key, str) or key.startswith("_"):
            raise DataError(f"{source}: its stored {what} config has a key {key!r} that vitexp never writes")
        _plain(value, f"{what}.{key}")
    fn = registry[target]
    parameters = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in kwargs if k not in parameters] if not takes_any else []
    if unknown:
        raise DataError(
            f"{source}: its stored {what} config has {unknown[0]}={kwargs[unknown[0]]!r}, which "
            f"{target.rsplit('.', 1)[-1]} does not take; the checkpoint is damaged or was edited"
        )
    return fn(**kwargs)


HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def unknown_argument(fn: Callable[..., Any], keys: list[str]) -> tuple[str, list[str]] | None:
    """The first of `keys` that `fn` does not take as a keyword argument, with the names it
    does take; None when all fit (or `fn` takes **kwargs, or has no inspectable signature)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    names = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in keys:
        if key not in names:
            # Required positional parameters (an optimizer's params, a schedule's step) are
            # filled in by the caller, not by the config: not worth listing.
            settable = [n for n in names if parameters[n].default is not inspect.Parameter.empty]
            return key, settable
    return None
