"""The Ray side of `LocalGPUsLauncher`, imported when a sweep starts (Ray takes seconds to
import; Hydra's plugin scan must not pay that on every command).

Ray places each job (a task asking for GPUs and CPUs) and starts a fresh process for it
(`max_calls=1`: no job inherits another's CUDA context, threads or module state); this module
only decides what each job asks for, keeps `slots` jobs in flight, and turns a job whose
process died into a failed job of the sweep (error.txt, NaN) instead of a failed sweep.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.vitexp_sweeps.local_gpus import cluster_address
from vitexp.config import closest
from vitexp.errors import ConfigError

log = logging.getLogger(__name__)

# Ray's default object store takes 30% of memory (/dev/shm); the jobs pass only configs.
OBJECT_STORE_BYTES = 100 * 2**20

# Ray's environment settings, read once as Ray is imported (ray._private.ray_constants), so set
# before that; a value the user exported wins. RAY_DEDUP_LOGS: Ray folds lines that look alike
# from different processes into one ("repeated 2x across cluster"): in a sweep those are
# different jobs' records.
RAY_ENVIRONMENT = {"RAY_DEDUP_LOGS": "0"}


def import_ray() -> ModuleType:
    """Ray, imported after its environment settings are made."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError as e:
        raise ConfigError("hydra/launcher=local_gpus needs Ray: pip install -e '.[ray]'") from e
    return ray


@dataclass(frozen=True)
class Plan:
    """What each job asks Ray for, and how many run at once."""

    slots: int  # jobs in flight at once
    gpus: int  # GPUs per job (Ray sets CUDA_VISIBLE_DEVICES to them)
    cpus: int  # Ray CPUs per job
    threads: int  # torch threads per job


def plan(jobs: int | None, gpus_per_job: int, resources: dict[str, float]) -> Plan:
    """Share out the cluster's `resources` (Ray's `cluster_resources()`): with GPUs, one job
    per `gpus_per_job` of them (at most `jobs`); without, `jobs` at once (default 1). Each job
    gets an equal share of the CPUs as its torch threads."""
    if jobs is not None and jobs < 1:
        raise ConfigError(f"hydra.launcher.jobs={jobs} must be at least 1 (or null: one job per GPU)")
    gpus_total = int(resources.get("GPU", 0))
    cpus_total = max(1, int(resources.get("CPU", 1)))
    if gpus_total and gpus_per_job > 0:
        if gpus_per_job > gpus_total:
            raise ConfigError(
                f"hydra.launcher.gpus_per_job={gpus_per_job} but Ray sees {gpus_total} GPU(s): "
                f"ask for at most {gpus_total}"
            )
        slots = gpus_total // gpus_per_job if jobs is None else min(jobs, gpus_total // gpus_per_job)
        gpus = gpus_per_job
    else:
        slots, gpus = jobs or 1, 0
    share = max(1, cpus_total // slots)
    return Plan(slots=slots, gpus=gpus, cpus=share, threads=share)


def check_init_arguments(ray: ModuleType, init: dict[str, Any]) -> None:
    """Every key of `hydra.launcher.ray.init` is an argument of this Ray's `ray.init` (its
    underscored ones pass through **kwargs unchecked, as Ray's own)."""
    named = [p for p in inspect.signature(ray.init).parameters if p not in ("kwargs",)]
    for key in init:
        if key not in named and not str(key).startswith("_"):
            hint = closest(str(key), named)
            raise ConfigError(
                f"unknown key hydra.launcher.ray.init.{key}: not an argument of ray.init"
                + (f"; did you mean {hint}?" if hint else "")
            )


def start_ray(ray: ModuleType, init: dict[str, Any], jobs: int | None) -> None:
    """Join the cluster at `init["address"]` (or RAY_ADDRESS, as Ray reads it), or start Ray
    on this machine with enough CPU slots for `jobs` (Ray counts one CPU per job at least)."""
    if ray.is_initialized():
        return
    init = {key: value for key, value in init.items() if value is not None}  # null: Ray's default
    check_init_arguments(ray, init)
    address = cluster_address(init.get("address"), os.environ)
    if address is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        init.setdefault("num_cpus", max(cpus, jobs or 1))
        init.setdefault("object_store_memory", OBJECT_STORE_BYTES)
        log.info("starting Ray: %s", init)
    else:
        log.info("joining the Ray cluster at %s: %s", address, init)
    try:
        ray.init(**init)
    except ray.exceptions.AuthenticationError as e:
        raise ConfigError(
            f"the Ray cluster at {address} refused this machine's token: set RAY_AUTH_TOKEN (or copy "
            f"~/.ray/auth_token) to the token of the cluster's head (`ray get-auth-token` there)"
        ) from e
    except ConnectionError as e:
        if address is None:
            raise
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address}: is it running there (ray status)? A cluster "
            f"started with token authentication (its `ray start` says so) also needs RAY_AUTH_MODE=token "
            f"and its token here (~/.ray/auth_token or RAY_AUTH_TOKEN)"
        ) from e


def _job_dir(sweep_config: DictConfig) -> Path | None:
    try:
        return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
    except Exception:  # an unusual subdir pattern that only resolves inside the job
        return None


def run_in_worker(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    threads: int,
    cwd: str,
) -> tuple[JobReturn, dict[str, Any]]:
    """One job, in the fresh process Ray started for it: the threads and working directory of
    the sweep, then Hydra's own `run_job` (as Hydra's Ray launcher does)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    from vitexp.config import register_resolvers

    torch.set_num_threads(threads)
    register_resolvers()  # the job's config uses vitexp's resolvers (`launch_time`)
    if Path(cwd).is_dir():  # relative paths mean what they meant where the sweep started
        os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    started = time.time()
    result = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    placement = {
        "pid": os.getpid(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": torch.get_num_threads(),
        "started": started,
        "ended": time.time(),
    }
    return result, placement


def _failure(error: Exception) -> str:
    """The one line error.txt holds for a job whose process Ray lost."""
    import ray.exceptions as rex

    if isinstance(error, rex.OutOfMemoryError):
        return (
            "error: out of memory: Ray stopped the job as its machine ran out of memory; "
            "run fewer jobs at once (hydra.launcher.jobs=N) or smaller ones"
        )
    if isinstance(error, rex.RayTaskError):
        cause = error.cause if isinstance(error.cause, BaseException) else error
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return (
        f"error: the job's process died ({type(error).__name__}: killed by a signal, the kernel's OOM "
        "killer or a crash); its log is in the job folder"
    )


def _failed_job(sweep_config: DictConfig, overrides: Sequence[str], error: Exception) -> JobReturn:
    """What the sweep sees of a job that never returned: a completed job worth NaN (as
    `vitexp.cli.run_job` returns for a job that failed in-process), after error.txt."""
    message = _failure(error)
    job_dir = _job_dir(sweep_config)
    log.error("job %s failed: %s", sweep_config.hydra.job.num, message)
    if job_dir is not None:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "error.txt").write_text(message + "\n")
    result = JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=sweep_config)
    result.working_dir = str(job_dir) if job_dir else None
    result.status = JobStatus.COMPLETED
    result.return_value = math.nan
    return result


def launch(
    *,
    config: DictConfig,
    hydra_context: HydraContext,
    task_function: TaskFunction,
    jobs: int | None,
    gpus_per_job: int,
    ray_settings: Any,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
) -> Sequence[JobReturn]:
    """`LocalGPUsLauncher.launch`: its settings (`jobs`, `gpus_per_job`, `ray`) and Hydra's."""
    ray = import_ray()
    setup_globals()
    ray_cfg = OmegaConf.to_container(OmegaConf.create(ray_settings), resolve=True)
    assert isinstance(ray_cfg, dict)
    base: dict[str, Any] = {"max_retries": 0, "max_calls": 1}
    try:  # the jobs' options, before Ray starts (building a remote function starts nothing)
        ray.remote(**{**base, **dict(ray_cfg.get("remote") or {})})(run_in_worker)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"hydra.launcher.ray.remote: {str(e).splitlines()[0]}") from e
    start_ray(ray, dict(ray_cfg.get("init") or {}), jobs)
    the_plan = plan(jobs, gpus_per_job, ray.cluster_resources())
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "Ray launcher: %d jobs, %d at once, each with %d GPU(s) and %d torch thread(s); sweep dir %s",
        len(job_overrides),
        the_plan.slots,
        the_plan.gpus,
        the_plan.threads,
        sweep_dir,
    )
    options: dict[str, Any] = {"num_gpus": the_plan.gpus, "num_cpus": the_plan.cpus, **base}
    options.update(dict(ray_cfg.get("remote") or {}))
    remote: Any = ray.remote(**options)(run_in_worker)

    queue: list[tuple[int, Sequence[str], DictConfig]] = []
    for offset, overrides in enumerate(job_overrides):
        idx = initial_job_idx + offset
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"job_id_for_{idx}"
            sweep_config.hydra.job.num = idx
            # Absolute: a job's process on another node of a cluster (shared filesystem) or in
            # another working directory writes into the same sweep.
            sweep_config.hydra.sweep.dir = str(sweep_dir)
        queue.append((idx, overrides, sweep_config))

    results: dict[int, JobReturn] = {}
    running: dict[Any, tuple[int, Sequence[str], DictConfig]] = {}
    state = Singleton.get_state()
    while queue or running:
        while queue and len(running) < the_plan.slots:
            job = queue.pop(0)
            ref = remote.remote(hydra_context, job[2], task_function, state, the_plan.threads, os.getcwd())
            running[ref] = job
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            idx, overrides, sweep_config = running.pop(ref)
            try:
                result, placement = ray.get(ref)
            except ray.exceptions.RayError as e:
                results[idx] = _failed_job(sweep_config, overrides, e)
                continue
            log.info(
                "job %d done in %.1f s: CUDA_VISIBLE_DEVICES=%s, %d torch thread(s)",
                idx,
                placement["ended"] - placement["started"],
                placement["CUDA_VISIBLE_DEVICES"],
                placement["threads"],
            )
            results[idx] = result
    return [results[initial_job_idx + i] for i in range(len(job_overrides))]
