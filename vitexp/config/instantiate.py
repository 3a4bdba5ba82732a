"""Building what a config names with Hydra's `instantiate`, with one-line errors: an argument
the target does not take is the user's typo, and a vitexp error raised while building is
reported with the config it came from."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from vitexp.errors import ConfigError, VitexpError, first_line, with_context
from vitexp.registry import HYDRA_KEYS, unknown_argument


def check_target_arguments(what: str, node: Mapping[str, Any]) -> None:
    """An argument the target does not take is the user's typo, not a TypeError to trace."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return
    try:
        fn = get_object(target)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{what}._target_={target} cannot be imported ({first_line(e)})") from e
    problem = unknown_argument(fn, [k for k in node if k not in HYDRA_KEYS])
    if problem is not None:
        key, names = problem
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {what}.{close[0]}?" if close else f" (it takes {', '.join(names)})"
        raise ConfigError(f"{what}.{key} is not an argument of {target.rsplit('.', 1)[-1]}{hint}")


def instantiate_group(key: str, node: Any, *args: Any, label: str | None = None, **kwargs: Any) -> Any:
    """Hydra's `instantiate` for the config at `key`: a vitexp error raised while building is
    reported as one line starting with `label` (default: `key`), of the same kind (so the same
    exit status); any other exception is a bug and keeps its traceback."""
    if isinstance(node, DictConfig | Mapping):
        check_target_arguments(key, node)
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, VitexpError):
            raise with_context(e.__cause__, label or key) from e.__cause__
        raise
