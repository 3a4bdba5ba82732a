"""`compose`: the config a command line would run, for use from Python (a script, a notebook)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from vitexp.config.command_line import check_group_choices, parse_overrides, translate
from vitexp.config.files import conf_dir, register_experiments, register_resolvers
from vitexp.config.validation import validate
from vitexp.errors import ConfigError

log = logging.getLogger(__name__)


def compose(overrides: Sequence[str] = (), *, config_name: str = "config") -> DictConfig:
    """The config `python -m vitexp OVERRIDES` would run, composed and checked as the command
    line is: one ConfigError line for an unknown key or option, an override Hydra cannot parse or
    a value outside its domain; legal but doubtful values are logged as warnings. Needs no
    registration step (the `experiment` presets and the resolvers are registered here). The
    config holds no `hydra` section: give `vitexp.train` a `run_dir`."""
    register_experiments()
    register_resolvers()
    overrides = list(overrides)
    check_group_choices(overrides)
    parse_overrides(overrides)  # one line, with the quoted form, for what Hydra cannot parse
    with hydra.initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = hydra.compose(config_name, overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(translate(e, config_name, overrides)) from e
    for warning in validate(cfg):
        log.warning("%s", warning)
    return cfg
