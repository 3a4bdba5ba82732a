"""`python -m vitexp [overrides]`: compose the config with Hydra and train.

Thin on purpose: all work happens in the importable `vitexp.training.train(cfg)`; the command
line is checked and errors are reported by `vitexp.cli`, as for every command.
"""

from __future__ import annotations

import datetime
import sys

import hydra
from omegaconf import DictConfig

from vitexp.cli import check_command_line_or_exit, run_job
from vitexp.config import conf_dir, register_experiments, register_resolvers, set_launch_time, validate
from vitexp.training import distributed

register_experiments()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from vitexp.training import train

    return run_job(train, cfg)


def main() -> float | None:
    """Train one job (or a sweep with -m); returns the monitored metric for sweepers."""
    check_command_line_or_exit("config", validate)
    world = distributed.launch_world()
    if world.distributed:
        # Under torchrun every process runs Hydra: they must name the same run dir (rank 0's
        # clock), and only rank 0 writes Hydra's .hydra/ record into it.
        distributed.init(world)
        set_launch_time(distributed.agree(datetime.datetime.now(), world))
        if not world.is_main:
            sys.argv.append("hydra.output_subdir=null")
    try:
        return _hydra_main()
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
