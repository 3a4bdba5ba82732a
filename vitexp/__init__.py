"""vitexp: Vision Transformer experiments in PyTorch, configured with Hydra.

The command line is `python -m vitexp [key=value ...]` (README.md, docs/). From Python, a
script or a notebook, the same run is:

    import vitexp

    cfg = vitexp.compose(["experiment=digits", "trainer.max_epochs=3"])
    best = vitexp.train(cfg, run_dir="outputs/notebook")

`compose` checks the overrides as the command line does (one-line `vitexp.errors.ConfigError`s);
`train` logs its progress to the console when logging is not set up, writes the run directory
and returns the best value of `trainer.monitor`. Importing vitexp imports neither torch nor
Hydra: `train` loads them when called.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

try:
    __version__ = version("vitexp")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"


def compose(overrides: list[str] | tuple[str, ...] = (), *, config_name: str = "config") -> DictConfig:
    """The config `python -m vitexp OVERRIDES` would run (see `vitexp.config.compose`)."""
    from vitexp.config import compose as compose_config

    return compose_config(overrides, config_name=config_name)


def train(cfg: DictConfig, run_dir: str | Path | None = None, **kwargs: Any) -> float:
    """Train `cfg` into `run_dir`; the best value of `trainer.monitor` (see `vitexp.training.train`)."""
    from vitexp.training import train as train_run

    return train_run(cfg, run_dir=run_dir, **kwargs)


__all__ = ["__version__", "compose", "train"]
