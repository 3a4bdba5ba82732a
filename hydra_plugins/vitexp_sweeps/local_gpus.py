"""`hydra/launcher=local_gpus`: run a sweep's jobs at once, one GPU each, through Ray.

Ray does the scheduling: each job is a Ray task asking for `gpus_per_job` GPUs, so Ray runs
as many at once as there are GPUs, sets CUDA_VISIBLE_DEVICES in the job's process before
anything touches CUDA (the job sees only its GPU), and queues the rest. Without GPUs,
`jobs` jobs run at once (default 1), each with cores / jobs torch threads. A job whose process
dies (a crash, the OOM killer) is recorded in its job folder's error.txt and the sweep goes
on. `ray.init.address` reaches a running Ray cluster instead of starting one on this machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class LocalGPUsLauncher(Launcher):
    def __init__(self, jobs: int | None = None, gpus_per_job: int = 1, ray: Any = None) -> None:
        self.jobs = jobs
        self.gpus_per_job = gpus_per_job
        self.ray: Any = ray or {}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.vitexp_sweeps._ray_jobs import launch

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return launch(
            config=self.config,
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            jobs=self.jobs,
            gpus_per_job=self.gpus_per_job,
            ray_settings=self.ray,
            job_overrides=job_overrides,
            initial_job_idx=initial_job_idx,
        )
