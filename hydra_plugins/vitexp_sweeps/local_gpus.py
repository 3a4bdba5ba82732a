"""`hydra/launcher=local_gpus`: run a sweep's jobs at once, one GPU each, through Ray.

Ray does the scheduling: each job is a Ray task asking for `gpus_per_job` GPUs, so Ray runs
as many at once as there are GPUs, sets CUDA_VISIBLE_DEVICES in the job's process before
anything touches CUDA (the job sees only its GPU), and queues the rest. Without GPUs,
`jobs` jobs run at once (default 1), each with cores / jobs torch threads. A job whose process
dies (a crash, the OOM killer) is recorded in its job folder's error.txt and the sweep goes
on. `ray.init.address` (or Ray's own RAY_ADDRESS) reaches a running Ray cluster instead of
starting one on this machine.

The settings are checked in `setup`, before Ray is imported or started; a wrong one ends the
command with one line naming it and its domain (exit status 2).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

# ray.init arguments that size a cluster being started: a cluster Ray connects to has its own.
CLUSTER_SIZING = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory")


def cluster_address(address: Any, environ: Mapping[str, str]) -> str | None:
    """The Ray cluster `ray.init(address=address)` connects to, as Ray decides it: RAY_ADDRESS
    when the address is unset or `auto`; None when it starts one on this machine."""
    if address in (None, "", "auto") and environ.get("RAY_ADDRESS"):
        return environ["RAY_ADDRESS"]
    return None if address in (None, "", "local") else str(address)


def _count(value: Any, *, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_settings(jobs: Any, gpus_per_job: Any, ray: Any, environ: Mapping[str, str]) -> None:
    """`hydra.launcher.*` against their domains; raises ConfigError (one line) for the first
    setting outside its domain."""
    from vitexp.errors import ConfigError

    if jobs is not None and not _count(jobs, least=1):
        raise ConfigError(
            f"hydra.launcher.jobs={jobs} must be a positive integer (jobs at once), or null (one per GPU)"
        )
    if not _count(gpus_per_job, least=0):
        raise ConfigError(
            f"hydra.launcher.gpus_per_job={gpus_per_job} must be an integer of at least 0 (GPUs per job; "
            f"0: jobs use none)"
        )
    settings = OmegaConf.to_container(ray, resolve=True) if OmegaConf.is_config(ray) else ray
    if not isinstance(settings, dict):
        raise ConfigError(f"hydra.launcher.ray={settings} must be a mapping (init: ..., remote: ...)")
    extra = sorted(map(str, set(settings) - {"init", "remote"}))
    if extra:
        raise ConfigError(
            f"unknown key hydra.launcher.ray.{extra[0]}: hydra.launcher.ray holds init (ray.init "
            f"arguments) and remote (ray.remote options)"
        )
    for part in ("init", "remote"):
        value = settings.get(part)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"hydra.launcher.ray.{part}={value} must be a mapping (key: value, ...)")
    init = settings.get("init") or {}
    for key in ("num_cpus", "num_gpus"):
        value = init.get(key)
        if value is not None and not _count(value, least=0):
            raise ConfigError(
                f"hydra.launcher.ray.init.{key}={value} must be an integer of at least 0, or null"
            )
    address = cluster_address(init.get("address"), environ)
    sizing = [key for key in CLUSTER_SIZING if init.get(key) is not None]
    if address and sizing:
        via = (
            "RAY_ADDRESS"
            if environ.get("RAY_ADDRESS") and init.get("address") in (None, "auto")
            else "address"
        )
        key = sizing[0]
        raise ConfigError(
            f"hydra.launcher.ray.init.{key}={init[key]}: Ray connects to the cluster at {address} ({via}), "
            f"whose resources its `ray start` set; drop hydra.launcher.ray.init.{key}"
        )


def check_cluster(address: str | None, timeout_s: float = 10.0) -> None:
    """Something answers at the cluster's HOST:PORT (`ray.init` would retry for minutes
    before failing); an address without a port (`auto`) is left to Ray."""
    from vitexp.errors import ConfigError

    host, colon, port = (address or "").split("://", 1)[-1].rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"nothing answers at the Ray cluster's address {address} ({e.strerror or e}): start it there "
            f"(ray start --head --port={port}) or fix RAY_ADDRESS / hydra.launcher.ray.init.address"
        ) from e


class LocalGPUsLauncher(Launcher):
    def __init__(self, jobs: int | None = None, gpus_per_job: int = 1, ray: Any = None) -> None:
        self.jobs = jobs
        self.gpus_per_job = gpus_per_job
        self.ray: Any = ray or {}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from vitexp.cli import exit_on_error

        with exit_on_error():  # one line and exit 2, rather than Hydra's traceback of the launcher
            check_settings(self.jobs, self.gpus_per_job, self.ray, os.environ)
            init = (self.ray or {}).get("init") or {}
            check_cluster(cluster_address(init.get("address"), os.environ))
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.vitexp_sweeps._ray_jobs import launch
        from vitexp.cli import exit_on_error

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        with exit_on_error():
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
