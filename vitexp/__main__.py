"""`python -m vitexp [overrides]`: compose the config with Hydra and train.

Thin on purpose: all work happens in the importable `vitexp.train.train(cfg)`.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vitexp.config import conf_dir, register_experiments
from vitexp.errors import ConfigError

log = logging.getLogger("vitexp")

register_experiments()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one job; returns the monitored metric so sweepers can optimise it."""
    from vitexp.train import train

    try:
        return train(cfg)
    except ConfigError as e:
        log.error("error: %s", e)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # Hydra records the failed job; the sweep goes on with the others.
        sys.exit(2)


if __name__ == "__main__":
    main()
