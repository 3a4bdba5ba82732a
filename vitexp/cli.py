"""What every command-line entry shares: one way to report errors, and where the
inspection commands write their files."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vitexp.errors import ConfigError
from vitexp.inference import _missing_keys

log = logging.getLogger("vitexp")


@contextlib.contextmanager
def one_line_errors(cfg: DictConfig) -> Iterator[None]:
    """Turn a ConfigError into one `error: ...` log line and exit status 2, as `python -m
    vitexp` does; in a multirun the error propagates so Hydra records the failed job. A
    required setting left out (`???`, e.g. `checkpoint`) is such an error too."""
    try:
        # Only the command's own settings here; a dataset's are checked when it is built.
        missing = [k for k in _missing_keys(OmegaConf.to_container(cfg, resolve=False)) if "." not in k]
        if missing:
            raise ConfigError(f"{missing[0]} is required: add {missing[0]}=... to the command")
        yield
    except ConfigError as e:
        log.error("error: %s", e)
        if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)


def default_output(checkpoint: Path, suffix: str) -> Path:
    """Where a command writes when no `output=` is given: next to the checkpoint, named
    after it, so inspecting a run adds files to that run's folder and nowhere else."""
    return checkpoint.parent / f"{checkpoint.stem}_{suffix}"
