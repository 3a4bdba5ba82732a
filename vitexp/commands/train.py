"""`python -m vitexp [overrides]` (vitexp/__main__.py hands over here): compose the config
with Hydra and train.

Thin on purpose: all work happens in the importable `vitexp.training.train(cfg, ctx)`; the
command builds the run context (run dir, names, world) from Hydra's job, and errors are
reported by `vitexp.cli`, as for every command. `vitexp.commands.run` has checked the command
line before this module is imported, and torch and the training code are imported only
inside the functions below: a typo costs no more than composing the config.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vitexp.cli import run_job
from vitexp.config import conf_dir, register_experiments, register_resolvers, set_launch_time

if TYPE_CHECKING:
    from vitexp.training.context import RunContext
    from vitexp.training.distributed import World

register_experiments()
register_resolvers()


def run_context(world: World) -> RunContext:
    """What Hydra decided about this job: its run dir, a readable name (the job's overrides),
    the sweep as group in a multirun, and the command that continues the run."""
    from vitexp.training.context import RunContext

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or f"{hc.runtime.choices.get('model')}-{hc.runtime.choices.get('dataset')}"
    group = None
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        group = f"{sweep.parent.name}/{sweep.name}"
    replaced = ("trainer.resume=", "hydra.run.dir=", "hydra.sweep.")
    overrides = [o for o in hc.overrides.task if not o.startswith(replaced)]
    args = [*overrides, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    launcher = "python -m vitexp"
    if world.distributed:
        launcher = "torchrun [the same torchrun options] -m vitexp"
        if os.environ.get("LOCAL_WORLD_SIZE") == str(world.size):  # a single node
            launcher = f"torchrun --nproc_per_node={world.size} -m vitexp"
    resume = f"{launcher} " + " ".join(shlex.quote(a) for a in args)
    return RunContext(run_dir=run_dir, name=name, group=group, world=world, resume_command=resume)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from vitexp.training import distributed, train

    return run_job(train, cfg, run_context(distributed.launch_world()))


def main() -> None:
    """Train one job (or a sweep with -m) on `sys.argv`, checked by `vitexp.commands.run`.
    Sweepers get each job's monitored metric from `_hydra_main`."""
    from vitexp.training import distributed

    world = distributed.launch_world()
    if world.distributed:
        # Under torchrun every process runs Hydra: they must name the same run dir (rank 0's
        # clock), and only rank 0 writes Hydra's .hydra/ record into it.
        distributed.init(world)
        set_launch_time(distributed.agree(datetime.datetime.now(), world))
        if not world.is_main:
            sys.argv.append("hydra.output_subdir=null")
    try:
        _hydra_main()
    finally:
        distributed.destroy()
