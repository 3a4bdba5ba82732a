"""What the command that starts a run decides about it, handed to `train(cfg, ctx)`: the run
directory, the names its loggers show, the process group, and the command that resumes it.
The library knows nothing of Hydra; `python -m vitexp` builds this from Hydra's job config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitexp.training.distributed import SINGLE_PROCESS, World


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    name: str | None = None  # the loggers' run name (the job's overrides)
    group: str | None = None  # the loggers' group (the sweep, in a multirun)
    world: World = SINGLE_PROCESS
    resume_command: str = ""  # how to continue this run; shown when it is preempted
