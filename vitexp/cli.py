"""What every command-line entry shares: one check of the command line before Hydra runs, one
way to report errors, and where the inspection commands write their files.

The error policy, for `python -m vitexp` and every inspection command:

- a `VitexpError` (ConfigError 2, DataError 3, TrainingDiverged 4) is the user's to fix: one
  `error: ...` line and its exit status; in a multirun the job writes that line to
  `error.txt` in its job dir, returns NaN (a failed trial for sweepers) and the sweep goes on;
- `Preempted` stops the whole process with status 75 after passing the signal on (submitit's
  handler then requeues the job);
- anything else is a bug in vitexp and keeps its traceback: re-raised in a single run; in a
  multirun logged with its traceback into the job's log, its first line in `error.txt`;
- `VITEXP_DEBUG=1` (or `HYDRA_FULL_ERROR=1`) shows the full traceback for every error.

Hydra's own messages for a mistyped key, a value of the wrong type or an unknown option span
several lines; `check_command_line` composes the config first (Hydra's compose API, about
0.1 s) and turns what fails into one line with a suggestion drawn from the config and the
options of its groups.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import (
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from vitexp.config import (
    closest,
    conf_dir,
    describe_type,
    group_options,
    is_group,
    missing_keys,
    suggest_key,
)
from vitexp.errors import ConfigError, VitexpError

log = logging.getLogger("vitexp")

T = TypeVar("T")

# Jobs of this process that failed in a multirun (the inspection commands exit 1 after them).
_failed_jobs: list[str] = []


def debug() -> bool:
    """Whether every error shows its full traceback (VITEXP_DEBUG=1 or HYDRA_FULL_ERROR=1)."""
    return os.environ.get("VITEXP_DEBUG", "0") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"


# --------------------------------------------------------------------------- error handling


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Outside a Hydra job (before Hydra runs, or a command without Hydra): a VitexpError is
    one `error: ...` line on stderr and its exit status. Anything else propagates."""
    try:
        yield
    except VitexpError as e:
        if debug():
            traceback.print_exception(e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


@contextlib.contextmanager
def job_errors() -> Iterator[None]:
    """Inside a Hydra job: the error policy of the module docstring. In a multirun a failed
    job's exception is swallowed once recorded, so code after the `with` runs (`run_job`
    returns NaN there)."""
    # Here, not at the top: importing vitexp.training imports torch, which the check of the
    # command line (and `python -m vitexp.report`) does not need.
    from vitexp.training.preemption import EXIT_PREEMPTED, Preempted, pass_on

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        yield
    except Preempted as e:
        # Stop the whole process (a sweep too): the scheduler wants the machine back. Under
        # submitit its own handler then requeues the job, which resumes from the checkpoint.
        log.warning("%s", e)
        pass_on(e.signal_name)
        sys.exit(EXIT_PREEMPTED)
    except VitexpError as e:
        log.error("error: %s", e, exc_info=e if debug() else None)
        if not multirun:
            sys.exit(e.exit_code)
        _record_failure(f"error: {e}")
    except Exception as e:
        if not multirun:
            raise
        log.exception("job failed")  # a bug, not a setting: keep the traceback in the job's log
        _record_failure(f"{type(e).__name__}: {e}".splitlines()[0])


def run_job(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | float:
    """`fn(*args, **kwargs)` under the error policy; NaN when it failed in a multirun (a
    failed trial for sweepers such as Optuna)."""
    with job_errors():
        return fn(*args, **kwargs)
    return math.nan


def _record_failure(message: str) -> None:
    """In a sweep a failed job is recorded (error.txt, listed by the sweep summary) and the
    sweep goes on. A command that keeps no Hydra record (the inspection commands: no run
    directory) writes no error.txt either."""
    _failed_jobs.append(message)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        (Path(hydra_cfg.runtime.output_dir) / "error.txt").write_text(message + "\n")


def require_settings(cfg: DictConfig) -> None:
    """An inspection command's own required settings (`checkpoint: ???`) are given; a
    dataset's are checked when it is built."""
    missing = [key for key in missing_keys(cfg) if "." not in key]
    if missing:
        raise ConfigError(f"{missing[0]} is required: add {missing[0]}=... to the command")


@contextlib.contextmanager
def one_line_errors(cfg: DictConfig) -> Iterator[None]:
    """`require_settings`, then the body under `job_errors`: the context-manager form of
    `run_job` (which the commands use), for a single run. A context manager cannot skip its
    body, so in a multirun a missing setting propagates to Hydra instead."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        require_settings(cfg)
    with job_errors():
        require_settings(cfg)
        yield


def check_command_line_or_exit(config_name: str, check: Callable[[DictConfig], Any] | None = None) -> None:
    """The start of every Hydra command: `check_command_line` on `sys.argv`, exiting with one
    line (status 2) when it fails. With VITEXP_DEBUG=1 Hydra shows full tracebacks too."""
    if debug():
        os.environ["HYDRA_FULL_ERROR"] = "1"
    with exit_on_error():
        check_command_line(config_name, sys.argv[1:], check)


def run_command(hydra_main: Callable[[], Any], config_name: str) -> Any:
    """`python -m vitexp.COMMAND`: check the command line, run the `@hydra.main` function, and
    exit 1 when a job of a multirun failed (each said why in its `error: ...` line)."""
    check_command_line_or_exit(config_name)
    result = hydra_main()
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} job(s) failed", file=sys.stderr)
        sys.exit(1)
    return result


# --------------------------------------------------------------------------- the command line


def _hydra_args(argv: Sequence[str]) -> argparse.Namespace | None:
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
                _check_option(group, value, choices=choices)


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


def _check_option(group: str, option: str, where: str = "", choices: list[str] | None = None) -> None:
    """Raise the one-line error for an unknown option (`choices`: the group's, by default)."""
    choices = group_options(group) if choices is None else choices
    if option in choices:
        return
    hint = closest(option, choices)
    raise ConfigError(
        f"unknown {group} {option!r}{where}: choose one of {', '.join(choices) or 'none installed'}"
        + (f"; did you mean {hint}?" if hint else "")
    )


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


def check_command_line(
    config_name: str, argv: Sequence[str], check: Callable[[DictConfig], Any] | None = None
) -> None:
    """Compose `config_name` with the command line's overrides, as Hydra is about to (every
    value of a sweep too), and raise one ConfigError line for what fails: an unknown key or
    option (with the closest one), a value of the wrong type for a schema (naming the type),
    an override Hydra cannot parse. For a single run `check(cfg)` (e.g. `config.validate`)
    then judges the values, before Hydra makes a run directory; in a sweep each job does, so
    that one bad value fails its own job only. Does nothing for a command line only Hydra can
    judge (--info, another config dir)."""
    args = _hydra_args(argv)
    if args is None:
        return
    config_name = args.config_name or config_name
    check_group_choices(args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        detail = e.message.splitlines()[0] if e.message else "not an override"
        raise ConfigError(
            f"cannot read {e.override!r}: {detail}; write key=value "
            f"(see https://hydra.cc/docs/advanced/override_grammar/basic/)"
        ) from e
    sweeps = [_line(o) for o in parsed if o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for i, job in enumerate(_jobs(parsed)):
            try:
                cfg = compose(config_name, job, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(_one_line(e, config_name, job)) from e
            if i > 0:
                continue
            multirun = args.multirun or cfg.hydra.mode == RunMode.MULTIRUN
            if multirun:
                check_launcher_installed(cfg)
            if sweeps and not multirun:
                raise ConfigError(
                    f"{sweeps[0]} gives several values: add -m to run one job for each, or write "
                    f"{sweeps[0].split('=', 1)[0]}=[...] for a list"
                )
            showing = args.help or args.hydra_help or args.cfg or args.info
            if check is not None and not multirun and not showing:
                with open_dict(cfg):
                    del cfg["hydra"]
                check(cfg)


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


def _one_line(e: Exception, config_name: str, overrides: list[str]) -> str:
    """What a failed composition means, in one line naming the key, option or override."""
    # Hydra chains OmegaConf's error as the cause of an override's failure, and as the context
    # of a config file's ("In 'experiment/x': ValidationError raised while composing config").
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__ or e.__context__
    cause = cause if isinstance(cause, OmegaConfBaseException) else None
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    in_file = re.match(r"In '([^']+)': \w+ raised while composing config", message)
    source = f" (in {in_file[1]})" if in_file else ""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        where = re.match(r"In '([^']+)'", message)
        named_in = (
            f" (named in {where[1]})" if where and where[1] not in (config_name, "hydra/config") else ""
        )
        try:
            _check_option(group, option, named_in, None if is_group(group) else list(e.options or []))
        except ConfigError as problem:
            plugin = group.startswith("hydra/") and "did you mean" not in str(problem)
            return str(problem) + (
                "; is its Hydra plugin installed? (pip install -e '.[sweep]')" if plugin else ""
            )
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        # Hydra names the first part that is missing (`logger.wandb` of `logger.wandb.mode`).
        typed = [o.lstrip("+~").split("=")[0] for o in overrides]
        key = next(
            (k for k in typed if k == cause.full_key or k.startswith(cause.full_key + ".")), cause.full_key
        )
        schema = cause.object_type is not None and dataclasses.is_dataclass(cause.object_type)
        return _unknown_key(key, config_name, overrides, addable=not schema) + source
    if isinstance(cause, ValidationError) and cause.full_key:
        value = _typed_value(cause.full_key, overrides, cause.value)
        expected = describe_type(cause.object_type, str(cause.key)) if cause.object_type else None
        if expected:
            return f"{cause.full_key}={value} must be {expected}{source}"
        return f"{cause.full_key}={value}{source}: {(cause.msg or str(cause)).splitlines()[0]}"
    exists = re.match(r"Could not append to config\. An item is already at '([^']+)'", message)
    if exists:
        return f"+{exists[1]}: {exists[1]} is set already; drop the + to change it"
    merging = re.match(r"Error merging override (~.+)", message)
    if merging and cause is not None and "does not support deletion" in str(cause):
        key = merging[1][1:].split("=")[0]
        return f"{merging[1]}: {key.rsplit('.', 1)[0]} has a fixed set of settings; set {key}=... instead"
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
    line's group choices and from the options of K's config group. `addable`: K's section has
    no schema, so `+K=VALUE` would add it."""
    choices = [o for o in overrides if "=" in o and is_group(o.lstrip("+~").split("=")[0].split("@")[0])]
    cfg: Any = {}
    for attempt in (choices, []):  # without the choices when one of them is what fails
        try:
            cfg = OmegaConf.to_container(compose(config_name, attempt), resolve=False)
            break
        except (HydraException, OmegaConfBaseException):
            continue
    if "." not in key:  # a config group is a top-level name too (`experiment=...`)
        groups = [p.name for p in conf_dir().iterdir() if p.is_dir()] + ["experiment"]
        cfg = {**{g: None for g in groups}, **cfg}

    def option_config(group: str, option: str) -> Any:
        try:
            return compose(f"{group}/{option}")
        except (HydraException, OmegaConfBaseException):
            return {}

    hint = suggest_key(key, cfg, option_config)
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


def default_output(checkpoint: Path, suffix: str) -> Path:
    """Where a command writes when no `output=` is given: next to the checkpoint, named
    after it, so inspecting a run adds files to that run's folder and nowhere else."""
    return checkpoint.parent / f"{checkpoint.stem}_{suffix}"
