"""`python -m vitexp [overrides]`: compose the config with Hydra and train.

Thin on purpose: all work happens in the importable `vitexp.training.train(cfg)`.
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from vitexp.config import conf_dir, register_experiments, register_resolvers, set_launch_time
from vitexp.errors import VitexpError
from vitexp.training import distributed
from vitexp.training.context import RunContext
from vitexp.training.preemption import EXIT_PREEMPTED, Preempted, pass_on

log = logging.getLogger("vitexp")

register_experiments()
register_resolvers()


def group_options(group: str) -> list[str]:
    """The options of a config group: YAML files in conf/GROUP, or ConfigStore entries."""
    files = [p.stem for p in (conf_dir() / group).glob("*.yaml")]
    stored = ConfigStore.instance().repo.get(group, {})
    return sorted({*files, *(name.removesuffix(".yaml") for name in stored)})


def check_group_choices(args: list[str]) -> str | None:
    """Hydra's own message for an unknown option spans several lines and a hint about
    HYDRA_FULL_ERROR; give one line listing the choices instead. Returns the message, or
    None when every `group=option` (and every option of a sweep) exists."""
    candidates = [a for a in args if "=" in a and not a.startswith(("-", "hydra", "+", "~"))]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return None  # not ours to judge: Hydra reports syntax errors itself
    for override in overrides:
        group = override.key_or_group
        is_group = (conf_dir() / group).is_dir() or group == "experiment"
        if "." in group or "/" in group or not is_group:
            continue
        choices = group_options(group)
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if isinstance(value, str) and value not in choices:
                return f"unknown {group} {value!r}: choose one of {', '.join(choices)}"
    return None


def run_context(world: distributed.World) -> RunContext:
    """What Hydra decided about this job: its run dir, a readable name (the job's overrides),
    the sweep as group in a multirun, and the command that continues the run."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or f"{hc.runtime.choices.get('model')}-{hc.runtime.choices.get('dataset')}"
    group = None
    if hc.mode.name == "MULTIRUN":
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
    from vitexp.training import train

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        return train(cfg, run_context(distributed.launch_world()))
    except VitexpError as e:
        log.error("error: %s", e)
        if not multirun:
            sys.exit(e.exit_code)
        return _failed_job(f"error: {e}")
    except Preempted as e:
        # Stop the whole process (a sweep too): the scheduler wants the machine back. Under
        # submitit its own handler then requeues the job, which resumes from the checkpoint.
        log.warning("%s", e)
        pass_on(e.signal_name)
        sys.exit(EXIT_PREEMPTED)
    except Exception as e:
        if not multirun:
            raise
        log.exception("job failed")  # a bug, not a setting: keep the traceback in the job's log
        return _failed_job(f"{type(e).__name__}: {e}".splitlines()[0])


def _failed_job(message: str) -> float:
    """In a sweep a failed job is recorded (error.txt, listed by the sweep summary) and the
    sweep goes on; NaN tells sweepers such as Optuna that the trial failed."""
    (Path(HydraConfig.get().runtime.output_dir) / "error.txt").write_text(message + "\n")
    return float("nan")


def main() -> float | None:
    """Train one job (or a sweep with -m); returns the monitored metric for sweepers."""
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
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
