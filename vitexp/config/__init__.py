"""Settings: where the configs live, each setting declared once, checked once, and the check of
the command line. Nothing here imports torch: the command line is checked before the heavy
imports.

files         conf/ and experiments/, the resolvers, the options of each config group
settings      the declarations: `TrainerConfig` (type, default, doc, domain and resume policy
              of every trainer setting) and the domains of the other groups' settings
validation    `validate(cfg)`: every setting against its declaration, before anything is built
command_line  `check_command_line`: composition, did-you-mean, Hydra's messages in one line
nodes         the one walk over nested keys (`walk`, `leaves`), `plain`
instantiate   `instantiate_group`: Hydra's instantiate with one-line errors
compose       `compose(overrides)`: the checked config of a command line, from Python
"""

from vitexp.config.command_line import check_command_line, closest, suggest_key
from vitexp.config.compose import compose
from vitexp.config.files import (
    conf_dir,
    experiments_dir,
    group_options,
    is_group,
    register_experiments,
    register_resolvers,
    set_launch_time,
)
from vitexp.config.instantiate import check_target_arguments, instantiate_group
from vitexp.config.nodes import flat_keys, leaves, missing_keys, plain, walk
from vitexp.config.settings import (
    DEVICES,
    GROUP_SETTINGS,
    ON_RESUME,
    PRECISIONS,
    Choices,
    Declared,
    Pattern,
    Range,
    TrainerConfig,
    declared,
    describe_type,
    setting,
    settings_help,
    trainer_keys,
    trainer_settings,
)
from vitexp.config.validation import check_batch_split, check_value, validate

__all__ = [
    "DEVICES",
    "GROUP_SETTINGS",
    "ON_RESUME",
    "PRECISIONS",
    "Choices",
    "Declared",
    "Pattern",
    "Range",
    "TrainerConfig",
    "check_batch_split",
    "check_command_line",
    "check_target_arguments",
    "check_value",
    "closest",
    "compose",
    "conf_dir",
    "declared",
    "describe_type",
    "experiments_dir",
    "flat_keys",
    "group_options",
    "instantiate_group",
    "is_group",
    "leaves",
    "missing_keys",
    "plain",
    "register_experiments",
    "register_resolvers",
    "set_launch_time",
    "setting",
    "settings_help",
    "suggest_key",
    "trainer_keys",
    "trainer_settings",
    "validate",
    "walk",
]
