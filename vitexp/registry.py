"""Building objects from configs that are not trusted: the config stored inside a checkpoint.

Hydra's `instantiate` calls whatever `_target_` names, which is right for the configs a user
writes and wrong for one read from a file someone else made: a checkpoint whose stored model
config names `builtins.open` would truncate a file while it is being "rebuilt". Here a target is
looked up in an explicit registry of vitexp's own constructors, and everything is checked before
anything is called: the target is known, it takes each argument, and every value is plain data
(numbers, strings, booleans, None, lists and dicts of them) with no nested `_target_`. Anything
else is refused in one line.

What a constructor takes is read in one place, `keyword_arguments`, for these stored configs and
for a user's (`check_arguments`, `unknown_argument`: a misspelt key is a one-line ConfigError
before Hydra or `build_model` calls anything).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, get_args, get_origin

from typing_extensions import Unpack, is_typeddict

from vitexp.errors import ConfigError, DataError

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
    takes = keyword_arguments(fn)
    unknown = [k for k in kwargs if k not in takes] if takes is not None else []
    if unknown:
        raise DataError(
            f"{source}: its stored {what} config has {unknown[0]}={kwargs[unknown[0]]!r}, which "
            f"{target.rsplit('.', 1)[-1]} does not take; the checkpoint is damaged or was edited"
        )
    return fn(**kwargs)


HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def keyword_arguments(fn: Callable[..., Any]) -> list[str] | None:
    """The names `fn` takes as keyword arguments, in order; None when it takes any (an untyped
    `**kwargs`) or has no signature to read.

    This is vitexp's one reading of what a constructor accepts, for a user's config
    (`check_arguments`, `unknown_argument`) and a stored one (`build_registered`) alike. Besides
    named parameters it reads `**kwargs: Unpack[SomeTypedDict]`, the typed form of timm's "a base
    and **kwargs": a model family passes the arguments it shares with another on as one
    TypedDict (`vitexp.models.vit.EncoderArguments`), and that TypedDict's keys are arguments of
    the family's class too, checked by mypy at every call as by this function in every config."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return None
    names = [n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return names
    shared = _unpacked_keys(fn)
    return None if shared is None else names + [key for key in shared if key not in names]


def _unpacked_keys(fn: Callable[..., Any]) -> list[str] | None:
    """The keys of the TypedDict that `fn`'s `**kwargs` is annotated with (`Unpack[...]`), or None."""
    try:  # the annotations are strings (`from __future__ import annotations`) until evaluated
        parameters = inspect.signature(fn, eval_str=True).parameters
    except (NameError, TypeError, ValueError):  # a name only a type checker can see: assume any key
        return None
    annotation = next(p.annotation for p in parameters.values() if p.kind is p.VAR_KEYWORD)
    if get_origin(annotation) not in _UNPACK:
        return None
    (shared,) = get_args(annotation)
    return list(shared.__annotations__) if is_typeddict(shared) else None


# typing_extensions' Unpack (what vitexp writes, for Python 3.10) and, from 3.11, typing's.
_UNPACK = {Unpack, getattr(typing, "Unpack", Unpack)}


def unknown_argument(fn: Callable[..., Any], keys: list[str]) -> tuple[str, list[str]] | None:
    """The first of `keys` that `fn` does not take as a keyword argument (`keyword_arguments`),
    with the names a config may set; None when all fit (or `fn` takes any keyword, or has no
    inspectable signature)."""
    names = keyword_arguments(fn)
    if names is None:
        return None
    unknown = [key for key in keys if key not in names]
    if not unknown:
        return None
    # Required parameters (an optimizer's params, a schedule's step) are filled in by the
    # caller, not by the config: not worth listing.
    parameters = inspect.signature(fn).parameters
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    return unknown[0], [n for n in names if n not in required]


def check_arguments(fn: Callable[..., Any], keys: Iterable[str], what: str) -> None:
    """Raise a one-line ConfigError for the first of `keys` that `fn` does not take (see
    `keyword_arguments`), with the closest argument name when one is near (`model.hiden_size`
    -> `model.hidden_size`), else the names it takes. `what` is the config's key (`model`)."""
    names = keyword_arguments(fn)
    if names is None:
        return
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = (
                f"; did you mean {what}.{close[0]}?" if close else f"; its arguments are {', '.join(names)}"
            )
            raise ConfigError(f"{what}.{key} is not an argument of {getattr(fn, '__name__', fn)}{hint}")
