"""The contract every declared setting keeps (vitexp.config.settings), a new one included: it is
declared once, with a doc, and a value of the wrong type or outside its domain is one line
naming it, from the check of the command line."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_cfg
from vitexp.cli import check_command_line
from vitexp.config import (
    ON_RESUME,
    Choices,
    Declared,
    Pattern,
    Range,
    TrainerConfig,
    conf_dir,
    declared,
    group_options,
    leaves,
    missing_keys,
    validate,
)
from vitexp.errors import ConfigError

SETTINGS = list(declared().values())


@functools.cache
def _route(key: str) -> tuple[str, ...]:
    """The overrides under which `key` is in the composed config: none when the defaults have
    it, else the first option of its group that does, with that option's required (???)
    settings given."""
    if key in _leaves_and_missing(())[0]:
        return ()
    group = key.split(".")[0]
    for option in group_options(group):
        keys, missing = _leaves_and_missing((f"{group}={option}",))
        if key in keys:
            return (f"{group}={option}", *(f"{k}=x" for k in missing))
    raise AssertionError(f"{key} is declared but no option of {group} has it")


@functools.cache
def _leaves_and_missing(overrides: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The keys of the config composed with `overrides`, and its required (???) ones: each
    option composed once for all the settings routed through it."""
    cfg = compose_cfg(list(overrides))
    return frozenset(leaves(cfg)), tuple(missing_keys(cfg))


def _wrong_type(setting: Declared) -> str | None:
    """A value of another type; None for a setting typed `Any` (its domain says it all)."""
    return {int: "abc", float: "abc", bool: "maybe", str: "[1,2]"}.get(setting.kinds[0])


def _number(value: float, setting: Declared) -> str:
    return str(int(value)) if int in setting.kinds else str(value)


def _outside(setting: Declared) -> list[str]:
    """Values of the right type outside the setting's domain (each finite bound, passed)."""
    domain = setting.domain
    if isinstance(domain, Choices):
        return ["not_a_choice"]
    if isinstance(domain, Pattern):
        return [next(v for v in ("notaname", "false") if not domain.holds(v))]
    assert isinstance(domain, Range)
    low, high = domain.bounds()
    values = []
    if math.isfinite(low):
        values.append(_number(low if domain.interval[0] == "(" else low - 1, setting))
    if math.isfinite(high):
        values.append(_number(high if domain.interval[-1] == ")" else high + 1, setting))
    return values


CASES = [(s, _wrong_type(s)) for s in SETTINGS if _wrong_type(s) is not None] + [
    (s, value) for s in SETTINGS if s.domain is not None for value in _outside(s)
]


@pytest.mark.parametrize(("setting", "value"), CASES, ids=[f"{s.key}={v}" for s, v in CASES])
def test_a_wrong_type_or_a_value_outside_the_domain_is_one_line_naming_the_key(setting, value):
    with pytest.raises(ConfigError) as err:
        check_command_line("config", [*_route(setting.key), f"{setting.key}={value}"], validate)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{setting.key}="), message


def test_each_setting_declares_a_doc_and_a_default_of_its_type():
    for setting in SETTINGS:
        assert setting.type_error(setting.default) is None or setting.on_resume is None, setting
        if setting.on_resume is not None:  # a trainer setting
            assert setting.on_resume in ON_RESUME and setting.doc and "\n" not in setting.doc, setting
            assert setting.domain is None or setting.default is None or setting.domain.holds(setting.default)


def test_the_trainer_settings_come_from_their_declarations_alone():
    """No YAML repeats a default: `trainer=default` is the dataclass itself."""
    trainer = compose_cfg().trainer
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    assert OmegaConf.to_container(trainer) == defaults
    assert not (conf_dir() / "trainer").exists()
