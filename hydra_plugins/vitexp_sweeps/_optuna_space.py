"""The search space: Hydra's sweep grammar (and its older `search_space:` form) as Optuna
distributions, and distributions written back in that grammar for messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from vitexp.errors import ConfigError


def _choices(override: Override) -> CategoricalDistribution:
    values: list[str | int | float | bool | None] = []
    for value in override.sweep_iterator(transformer=Transformer.encode):
        if not isinstance(value, str | int | float | bool | type(None)):
            raise ConfigError(f"{override.input_line}: a choice takes str, int, float, bool or null values")
        values.append(value)
    return CategoricalDistribution(values)


def distribution(override: Override) -> BaseDistribution | str:
    """The distribution of a sweep override (`x=interval(0, 1)`), or a fixed one's value as
    text (`x=5`). As Hydra's Optuna sweeper maps them: `range(a, b)` is an integer
    distribution from a to b, b included; a float bound or step makes it a float one."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        return _choices(override)
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep) and value.start is not None and value.stop is not None
        if value.shuffle:
            return _choices(override)
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            step = float(value.step) if value.step else None
            return FloatDistribution(float(value.start), float(value.stop), step=step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep) and value.start is not None and value.end is not None
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ConfigError(f"{override.input_line}: this sweep is not one Optuna can draw from")


def params_from_overrides(
    arguments: list[str],
) -> tuple[dict[str, BaseDistribution], dict[str, str], list[str]]:
    """The drawn parameters, the fixed ones, and the overrides passed on as they are (`~key`)."""
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except Exception as e:  # Hydra's override grammar
        raise ConfigError(f"hydra.sweeper.params: {str(e).splitlines()[0]}") from e
    drawn: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    passed: list[str] = []
    for override in parsed:
        if override.is_delete():
            assert override.input_line is not None
            passed.append(override.input_line)
            continue
        value = distribution(override)
        key = override.get_key_element()
        if isinstance(value, BaseDistribution):
            drawn[key] = value
        else:
            fixed[key] = value
    return drawn, fixed, passed


def distribution_from_config(name: str, node: Mapping[str, Any]) -> BaseDistribution:
    """Hydra's older `search_space:` form: `{type: int|float|categorical, low, high, step, log,
    choices}`."""
    kind, low, high = node.get("type"), node.get("low"), node.get("high")
    step, log = node.get("step"), bool(node.get("log", False))
    if kind == "categorical" and node.get("choices") is not None:
        return CategoricalDistribution(list(node["choices"]))
    if kind in ("int", "float") and low is not None and high is not None:
        if kind == "int":
            return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    raise ConfigError(
        f"hydra.sweeper.search_space.{name}={dict(node)}: give type: int or float with low and high, "
        "or type: categorical with choices (or use hydra.sweeper.params)"
    )


def grid_choices(name: str, d: BaseDistribution) -> list[Any]:
    """The values a grid search tries (as Hydra's sweeper lists them: `range`'s stop excluded)."""
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution | FloatDistribution) and d.step is not None and not d.log:
        n = int((d.high - d.low) // d.step)
        return [d.low + i * d.step for i in range(n)]
    raise ConfigError(f"hydra.sweeper.params.{name}: a grid search takes choice(...) or range(...) only")


def describe(d: BaseDistribution) -> str:
    """A distribution as the sweep grammar writes it (`tag(log, interval(0.0001, 0.01))`)."""
    if isinstance(d, CategoricalDistribution):
        return f"choice({', '.join(map(str, d.choices))})"
    assert isinstance(d, IntDistribution | FloatDistribution)
    if isinstance(d, IntDistribution):
        text = f"range({d.low}, {d.high})" if d.step == 1 else f"range({d.low}, {d.high}, step={d.step})"
    else:
        text = (
            f"interval({d.low}, {d.high})" if d.step is None else f"range({d.low}, {d.high}, step={d.step})"
        )
    return f"tag(log, {text})" if d.log else text


def space_difference(stored: dict[str, BaseDistribution], new: dict[str, BaseDistribution]) -> str | None:
    """The first difference between a stored search space and this command's, in words."""
    for name in sorted(stored.keys() | new.keys()):
        if name not in new:
            return f"searched {name} over {describe(stored[name])}, which this command does not search"
        if name not in stored:
            return f"did not search {name}, which this command searches over {describe(new[name])}"
        if stored[name] != new[name]:
            return f"searched {name} over {describe(stored[name])}, this command over {describe(new[name])}"
    return None
