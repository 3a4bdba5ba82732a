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

The check of the command line itself (did-you-mean, Hydra's messages in one line) is
`vitexp.config.command_line`; it imports no torch, and neither does this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vitexp.config import missing_keys
from vitexp.config.command_line import LAUNCHER_NEEDS, check_command_line
from vitexp.errors import ConfigError, VitexpError

# LAUNCHER_NEEDS and check_command_line come from vitexp.config.command_line: one check for
# every command.
__all__ = [
    "LAUNCHER_NEEDS",
    "check_command_line",
    "check_command_line_or_exit",
    "debug",
    "default_output",
    "exit_on_error",
    "job_errors",
    "one_line_errors",
    "require_settings",
    "run_command",
    "run_job",
]

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


def run_command(hydra_main: Callable[[], Any]) -> Any:
    """`python -m vitexp.COMMAND`, its command line checked (`vitexp.commands.run`): run the
    `@hydra.main` function, and exit 1 when a job of a multirun failed (each said why in its
    `error: ...` line)."""
    result = hydra_main()
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} job(s) failed", file=sys.stderr)
        sys.exit(1)
    return result


def default_output(checkpoint: Path, suffix: str) -> Path:
    """Where a command writes when no `output=` is given: next to the checkpoint, named
    after it, so inspecting a run adds files to that run's folder and nowhere else."""
    return checkpoint.parent / f"{checkpoint.stem}_{suffix}"
