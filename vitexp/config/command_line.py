"""The check of a command line before Hydra runs: `check_command_line`.

It composes the config as Hydra is about to (Hydra's compose API, about 0.1 s; every value
of a sweep too) and turns what fails into one ConfigError line that says what to change: an
unknown key or option with the one probably meant (did-you-mean, drawn from the composed config
and the options of its groups), a value of the wrong type naming the type, an override Hydra's
grammar cannot read with the quoted form to type instead. Hydra's own messages span several
lines; `translate` reads the ones it knows (`hydra_format` names them, and the tests feed Hydra's
real exceptions for each, so an upgrade that changes one fails a test, not a user).

Nothing here imports torch, the models, the data or the training code: a typo costs no more
than composing the config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import io
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from vitexp.config.files import conf_dir, group_options, is_group, register_experiments, register_resolvers
from vitexp.config.nodes import flat_keys
from vitexp.config.settings import describe_type
from vitexp.errors import ConfigError

# --------------------------------------------------------------------------- did you mean


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate `word` is most likely a typo of, or None when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return match[0] if match else None


def _likeness(key: str, candidate: str) -> float:
    """How likely `candidate` is the key meant by `key`, 0..1 (0.75 and up: close). Within one
    section only what follows it counts (`trainer.foo` is not close to `trainer.monitor`); a
    key with the same last part scores at least 0.9: the setting is one level up or down
    (`logger.mode` -> `logger.wandb.mode`)."""
    if key.split(".")[0] == candidate.split(".")[0] and "." in key and "." in candidate:
        ratio = difflib.SequenceMatcher(None, key.split(".", 1)[1], candidate.split(".", 1)[1]).ratio()
    else:
        ratio = difflib.SequenceMatcher(None, key, candidate).ratio()
    return max(ratio, 0.9) if key.rsplit(".", 1)[-1] == candidate.rsplit(".", 1)[-1] else ratio


def _best_key(key: str, candidates: Iterable[str]) -> tuple[float, str] | None:
    # Never a section the key is in: `trainer.foo` is not a typo of `trainer`.
    scored = [(_likeness(key, c), c) for c in candidates if not key.startswith(c + ".")]
    best = max(scored, default=None)
    return best if best is not None and best[0] >= 0.75 else None


def suggest_key(
    key: str, cfg: Any, option_config: Callable[[str, str], Any] | None = None
) -> tuple[str, list[str]] | None:
    """What the user probably meant by the unknown dotted `key`: `(key meant, options)`.

    The key meant is one of the composed `cfg` in the same section (`model.hiden_size` ->
    `model.hidden_size`, options `[]`), or, when the section is a config group, a key of its
    other options, with the options (`group=option`) that have it (`logger.mode` ->
    `logger.wandb.mode`, `["logger=wandb"]`). `option_config(group, option)` gives an option's
    config (composed with Hydra); None: the composed config alone. None when nothing is close.
    """
    section = key.split(".")[0]
    keys = flat_keys(cfg)
    if section in keys:
        keys = [k for k in keys if k.split(".")[0] == section]
    here = _best_key(key, keys)
    if (here and here[0] >= 0.85) or option_config is None or "." not in key or not is_group(section):
        return (here[1], []) if here else None
    found: dict[str, tuple[float, list[str]]] = {}
    for option in group_options(section):
        best = _best_key(key, flat_keys(option_config(section, option)))
        if best:
            score, other = best
            found.setdefault(other, (score, []))[1].append(f"{section}={option}")
    elsewhere = max(((score, other, options) for other, (score, options) in found.items()), default=None)
    # The chosen option's own keys win a tie: a typo there is likelier than a change of option.
    if elsewhere and (here is None or elsewhere[0] - 0.05 > here[0]):
        return elsewhere[1], elsewhere[2]
    return (here[1], []) if here else None


def unknown_key_line(key: str, hint: tuple[str, list[str]] | None, addable: bool = True) -> str:
    """The one line for an unknown `key`, given `suggest_key`'s `hint`. `addable`: the key's
    section has no schema, so `+KEY=VALUE` would add it."""
    if hint is None or hint == (key, []):
        add = f"; +{key}=VALUE adds a new one" if addable else ""
        return f"unknown key {key}: there is no such setting (--cfg job lists them{add})"
    meant, options = hint
    if meant == key and len(options) == 1:
        return f"{key} is a setting of {options[0]}: add {options[0]} to the command"
    if meant == key:
        some = ", ".join(options[:3]) + (", ..." if len(options) > 3 else "")
        return f"{key} is a setting of other options ({some}), not of the one chosen"
    return f"unknown key {key}: did you mean {meant}" + (f" (with {options[0]})" if options else "") + "?"


def check_option(group: str, option: str, where: str = "", choices: list[str] | None = None) -> None:
    """Raise the one-line error for an unknown option (`choices`: the group's, by default)."""
    choices = group_options(group) if choices is None else choices
    if option in choices:
        return
    hint = closest(option, choices)
    raise ConfigError(
        f"unknown {group} {option!r}{where}: choose one of {', '.join(choices) or 'none installed'}"
        + (f"; did you mean {hint}?" if hint else "")
    )


# --------------------------------------------------------------------------- Hydra's messages

# The messages of Hydra's exceptions that `translate` reads. Each has a test with Hydra's real
# exception (tests/test_command_line.py).
IN_FILE = re.compile(r"In '([^']+)': \w+ raised while composing config")  # a config file's error
NAMED_IN = re.compile(r"In '([^']+)'")  # the file whose defaults list names a missing option
ALREADY_SET = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
DELETE_OVERRIDE = re.compile(r"Error merging override (~.+)")
NO_DELETION = "does not support deletion"  # OmegaConf's, for a key of a structured config


def _cause(e: Exception) -> OmegaConfBaseException | None:
    """OmegaConf's error behind a failed composition: Hydra chains it as the cause of an
    override's failure and as the context of a config file's."""
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__ or e.__context__
    return cause if isinstance(cause, OmegaConfBaseException) else None


def _message(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def hydra_format(e: Exception) -> str:
    """Which of the failures `translate` knows `e` is: `unknown option`, `unknown key`,
    `wrong type`, `already set`, `fixed section`; "" for any other (shown as Hydra says it)."""
    cause, message = _cause(e), _message(e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        return "unknown option"
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        return "unknown key"
    if isinstance(cause, ValidationError) and cause.full_key:
        return "wrong type"
    if ALREADY_SET.match(message):
        return "already set"
    if DELETE_OVERRIDE.match(message) and cause is not None and NO_DELETION in str(cause):
        return "fixed section"
    return ""


def translate(e: Exception, config_name: str, overrides: list[str]) -> str:
    """What a failed composition of `config_name` with `overrides` means, in one line naming
    the key, option or override, with what was probably meant."""
    cause, message, kind = _cause(e), _message(e), hydra_format(e)
    in_file = IN_FILE.match(message)
    source = f" (in {in_file[1]})" if in_file else ""
    if kind == "unknown option" and isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        where = NAMED_IN.match(message)
        named_in = (
            f" (named in {where[1]})" if where and where[1] not in (config_name, "hydra/config") else ""
        )
        try:
            check_option(group, option, named_in, None if is_group(group) else list(e.options or []))
        except ConfigError as problem:
            plugin = group.startswith("hydra/") and "did you mean" not in str(problem)
            return str(problem) + (
                "; is its Hydra plugin installed? (pip install -e '.[sweep]')" if plugin else ""
            )
    if kind == "unknown key" and isinstance(cause, ConfigAttributeError | ConfigKeyError):
        assert cause.full_key is not None
        # Hydra names the first part that is missing (`logger.wandb` of `logger.wandb.mode`).
        typed = [o.lstrip("+~").split("=")[0] for o in overrides]
        key = next(
            (k for k in typed if k == cause.full_key or k.startswith(cause.full_key + ".")), cause.full_key
        )
        schema = cause.object_type is not None and dataclasses.is_dataclass(cause.object_type)
        return _unknown_key(key, config_name, overrides, addable=not schema) + source
    if kind == "wrong type" and isinstance(cause, ValidationError):
        assert cause.full_key is not None
        value = _typed_value(cause.full_key, overrides, cause.value)
        expected = describe_type(cause.object_type, str(cause.key)) if cause.object_type else None
        if expected:
            return f"{cause.full_key}={value} must be {expected}{source}"
        return f"{cause.full_key}={value}{source}: {(cause.msg or str(cause)).splitlines()[0]}"
    already_set, deleted = ALREADY_SET.match(message), DELETE_OVERRIDE.match(message)
    if kind == "already set" and already_set:
        return f"+{already_set[1]}: {already_set[1]} is set already; drop the + to change it"
    if kind == "fixed section" and deleted:
        key = deleted[1][1:].split("=")[0]
        return f"{deleted[1]}: {key.rsplit('.', 1)[0]} has a fixed set of settings; set {key}=... instead"
    if cause is not None and cause is not e:
        message += ": " + (cause.msg or str(cause)).splitlines()[0]
    return message


def _typed_value(key: str, overrides: list[str], value: Any) -> str:
    """The value as the command line typed it, else as the config file held it."""
    for line in overrides:
        name, _, typed = line.lstrip("+~").partition("=")
        if name == key:
            return typed
    return "null" if value is None else str(value)


def _unknown_key(key: str, config_name: str, overrides: list[str], addable: bool = True) -> str:
    """`unknown key K: did you mean ...?`, drawn from the config as composed with the command
    line's group choices and from the options of K's config group."""
    choices = [o for o in overrides if "=" in o and is_group(o.lstrip("+~").split("=")[0].split("@")[0])]
    cfg: Any = {}
    for attempt in (choices, []):  # without the choices when one of them is what fails
        try:
            cfg = OmegaConf.to_container(compose(config_name, attempt), resolve=False)
            break
        except (HydraException, OmegaConfBaseException):
            continue
    if "." not in key:  # a config group is a top-level name too (`experiment=...`)
        stored = [name for name, node in ConfigStore.instance().repo.items() if isinstance(node, dict)]
        groups = [p.name for p in conf_dir().iterdir() if p.is_dir()] + stored
        cfg = {**{g: None for g in groups}, **cfg}

    def option_config(group: str, option: str) -> Any:
        try:
            return compose(f"{group}/{option}")
        except (HydraException, OmegaConfBaseException):
            return {}

    return unknown_key_line(key, suggest_key(key, cfg, option_config), addable)


# --------------------------------------------------------------------------- reading overrides

# What Hydra's grammar takes in an unquoted value; anything else needs quotes.
_UNQUOTED = re.compile(r"[\w/\-\\+.$%*@?|: ]")


def quoted(line: str) -> str | None:
    """`line` (`key=value`) with its value quoted so that Hydra reads it as the string typed,
    written as a shell takes it: `key=/a/{0..9}.tar` -> `'key="/a/{0..9}.tar"'`. None when
    quoting would not give the value typed, or the value looks like a list, dict or sweep."""
    key, sep, value = line.partition("=")
    if not sep or not value or value[0] in "[{('\"":
        return None
    for quote in ('"', "'"):
        candidate = f"{key}={quote}{value}{quote}"
        try:
            (override,) = OverridesParser.create().parse_overrides([candidate])
            if override.value() == value:
                return shlex.quote(candidate)
        except HydraException:
            continue
    return None


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Hydra's reading of the overrides; one that its grammar rejects is a ConfigError that
    shows the quoted form to type when quoting fixes it, else Hydra's reason."""
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        fix = quoted(e.override)
        if fix is not None:
            value = e.override.partition("=")[2]
            reserved = " or ".join(dict.fromkeys(c for c in value if not _UNQUOTED.fullmatch(c)))
            raise ConfigError(
                f"{e.override}: Hydra's override grammar takes no {reserved} in an unquoted value; "
                f"quote it: {fix}"
            ) from e
        detail = e.message.splitlines()[0] if e.message else "not an override"
        raise ConfigError(
            f"cannot read {e.override!r}: {detail}; write key=value "
            f"(see https://hydra.cc/docs/advanced/override_grammar/basic/)"
        ) from e


def _several_values(override: Override) -> ConfigError:
    """A sweep (`key=a,b`) in a single run."""
    line = _line(override)
    key = line.split("=", 1)[0]
    fix = f"add -m to run one job for each, or write {key}=[...] for a list"
    try:
        values = list(override.sweep_string_iterator())
    except HydraException:
        values = []
    words = [v for v in values if not re.fullmatch(r"[-+.\deE]+|true|false|null", v)]
    fix_quoted = quoted(line) if words and not is_group(key.lstrip("+~").split("@")[0]) else None
    if fix_quoted is not None:  # a path or name with a comma in it
        fix = f"add -m to run one job for each, write {key}=[...] for a list, or quote it: {fix_quoted}"
    return ConfigError(f"{line} gives several values: {fix}")


# --------------------------------------------------------------------------- the check


def hydra_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """Hydra's own reading of the command line; None when Hydra itself should handle it
    (a malformed command line, --version, --info, shell completion, another config dir)."""
    from hydra._internal.utils import get_args_parser

    if any(a == "--version" or a.startswith(("--info", "--shell-completion", "-sc")) for a in argv):
        return None
    parser = get_args_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(list(argv))
    except SystemExit:
        return None
    if args.config_path or args.config_dir or args.experimental_rerun:
        return None
    return args


def check_group_choices(overrides: Sequence[str]) -> None:
    """Every `group=option` (and every option of a sweep) names an existing option; else a
    ConfigError listing the choices, with the closest one."""
    candidates = [a for a in overrides if "=" in a and not a.startswith(("-", "hydra", "~"))]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
        extra_dirs = _searchpath_dirs(overrides)
    except HydraException:
        return  # reported by check_command_line
    if extra_dirs is None:
        return  # a search path this check cannot list (pkg://...): Hydra reports unknown options
    for override in parsed:
        group = override.key_or_group
        if "." in group or not is_group(group) or override.is_delete():
            continue
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except HydraException:
            continue  # a sweep only a sweeper plugin understands (interval, tag)
        choices = sorted(
            {*group_options(group), *(p.stem for d in extra_dirs for p in (d / group).glob("*.yaml"))}
        )
        for value in values:
            if isinstance(value, str):
                check_option(group, value, choices=choices)


def _searchpath_dirs(overrides: Sequence[str]) -> list[Path] | None:
    """The folders a `hydra.searchpath=[file://DIR, ...]` override adds, whose config groups
    offer options too; None when it names a search path other than a folder."""
    dirs: list[Path] = []
    for override in OverridesParser.create().parse_overrides(
        [a for a in overrides if a.startswith("hydra.searchpath=")]
    ):
        value = override.value()
        for entry in value if isinstance(value, list) else [value]:
            if not (isinstance(entry, str) and entry.startswith("file://")):
                return None
            dirs.append(Path(entry.removeprefix("file://")))
    return dirs


def _prefix(override: Override) -> str:
    return {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(override.type, "")


def _line(override: Override) -> str:
    """The override as it was typed, which the parser records on every override it returns."""
    assert override.input_line is not None
    return override.input_line


def _jobs(overrides: list[Override]) -> list[list[str]]:
    """The override lists to compose for a command line: itself, or for a sweep its first job
    and, for every other value of each swept key, that job with this one value changed (a
    bad value is found without composing the whole product). Sweeps only a sweeper plugin
    understands (interval, tag) are left to it."""
    fixed: list[str] = []
    swept: list[list[str]] = []
    for override in overrides:
        if not override.is_sweep_override():
            fixed.append(_line(override))
            continue
        try:
            key = _prefix(override) + override.get_key_element()
            swept.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        except HydraException:
            continue
    first = [values[0] for values in swept if values]
    jobs = [fixed + first]
    for i, values in enumerate(swept):
        for value in values[1:]:
            jobs.append(fixed + first[:i] + [value] + first[i + 1 :])
    return jobs


# What the launchers vitexp ships (hydra_plugins/vitexp_sweeps) import when a sweep starts,
# beyond vitexp's own dependencies: launcher class -> (its option, module, extra).
LAUNCHER_NEEDS = {
    "hydra_plugins.vitexp_sweeps.local_gpus.LocalGPUsLauncher": ("local_gpus", "ray", "ray"),
}


def check_launcher_installed(cfg: DictConfig) -> None:
    """The sweep's launcher can start: else one line naming the extra to install, rather than
    the traceback it would end with once the sweep has begun."""
    need = LAUNCHER_NEEDS.get(str(OmegaConf.select(cfg, "hydra.launcher._target_")))
    if need is not None and importlib.util.find_spec(need[1]) is None:
        raise ConfigError(f"hydra/launcher={need[0]} needs {need[1]}: pip install -e '.[{need[2]}]'")


def check_command_line(
    config_name: str, argv: Sequence[str], check: Callable[[DictConfig], Any] | None = None
) -> None:
    """Compose `config_name` with the command line's overrides, as Hydra is about to (every
    value of a sweep too), and raise one ConfigError line for what fails: an unknown key or
    option (with the closest one), a value of the wrong type for a schema (naming the type),
    an override Hydra cannot parse (with its quoted form when that is the fix). For a single
    run `check(cfg)` (e.g. `config.validate`) then judges the values, before Hydra makes a run
    directory; in a sweep each job does, so that one bad value fails its own job only, and
    the sweep's launcher must be installed. Does nothing for a command line only Hydra can
    judge (--info, another config dir). Needs no registration step: the `experiment` presets
    and the resolvers are registered here, as the command registers them for Hydra."""
    args = hydra_args(argv)
    if args is None:
        return
    register_experiments()
    register_resolvers()
    config_name = args.config_name or config_name
    check_group_choices(args.overrides)
    parsed = parse_overrides(args.overrides)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for i, job in enumerate(_jobs(parsed)):
            try:
                cfg = compose(config_name, job, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(translate(e, config_name, job)) from e
            if i > 0:
                continue
            multirun = args.multirun or cfg.hydra.mode == RunMode.MULTIRUN
            if multirun:
                check_launcher_installed(cfg)
            if sweeps and not multirun:
                raise _several_values(sweeps[0])
            showing = args.help or args.hydra_help or args.cfg or args.info
            if check is not None and not multirun and not showing:
                with open_dict(cfg):
                    del cfg["hydra"]
                check(cfg)
