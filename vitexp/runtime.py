"""What training and the commands both need from the machine: the device, the precision and
its autocast context, the CPU threads, seeding, and the plain module under `torch.compile`/DDP
wrappers."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitexp.config import DEVICES, PRECISIONS, Choices, check_value
from vitexp.errors import ConfigError

log = logging.getLogger(__name__)


def pick_device(name: str, setting: str = "device") -> torch.device:
    """`auto` (CUDA when present, else CPU), or a device name that must exist; `setting` is
    the config key that named it, for the error message. The name is checked against the
    declared domain of device names (`vitexp.config.DEVICES`), as `validate` checks
    `trainer.device`; here, whether that device exists."""
    check_value(setting, name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but no CUDA GPU is visible; use {setting}=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{setting}={name} but only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def autocast_context(
    device: torch.device, precision: str, setting: str = "precision"
) -> contextlib.AbstractContextManager:
    """Decided once per run (`resolve_precision`): bf16/fp16 autocast, or nothing for fp32."""
    precision = resolve_precision(device, precision, setting)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"{setting}=fp16 needs a CUDA GPU; use {setting}=bf16 on the CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def configure_backends(device: torch.device, *, deterministic: bool = False) -> None:
    """Decided once per run, before the first CUDA kernel. On a GPU: TF32 matmuls and
    convolutions (fp32-like accuracy at tensor-core speed), cuDNN's autotuner for the
    convolution stems, and this run's GPU as the current device (so no stray context opens on
    GPU 0). `deterministic`: torch's deterministic algorithms (cuBLAS needs its workspace
    fixed for that, before CUDA starts), no autotuning: a resumed GPU run can then be bitwise."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set either way: a process that trains twice (a sweep in one process, the tests) must not
    # inherit the previous run's choice.
    torch.use_deterministic_algorithms(deterministic)
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic
    if device.index is not None:
        torch.cuda.set_device(device)


def cpu_bf16(capabilities: Mapping[str, Any]) -> str | None:
    """The CPU feature that computes bf16 natively (AMX or AVX-512-BF16), from
    `torch.cpu.get_capabilities()`; None where oneDNN would emulate it (each op converting to
    fp32 and back: ViT-Ti/4 trained 26x slower than in fp32 on an AVX2 CPU)."""
    if capabilities.get("amx_bf16"):
        return "AMX-BF16"
    if capabilities.get("avx512_bf16"):
        return "AVX-512-BF16"
    return None


def resolve_precision(device: torch.device, precision: str, setting: str = "precision") -> str:
    """The precision a run computes in, decided once per run. `auto`: bf16 where the device
    computes it natively (a GPU of compute capability 8.0 or newer; a CPU with AMX or
    AVX-512-BF16), else fp32; the choice is logged. An explicit bf16 the device would emulate is
    refused on a GPU (T4, V100: several times slower than fp16, which they have) and warned
    about on a CPU (it runs, many times slower than fp32)."""
    check_value(setting, precision, Choices(PRECISIONS))
    if precision not in ("auto", "bf16"):
        return precision
    if device.type == "cuda":
        # `is_bf16_supported()` counts emulation as support by default.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        because = f"{name} {'has' if native else 'has no'} bf16 tensor cores"
    else:
        capabilities = torch.cpu.get_capabilities()
        feature = cpu_bf16(capabilities)
        native = feature is not None
        cpu = (
            f"this CPU ({capabilities.get('cpu_name', 'unknown')}, {torch.backends.cpu.get_cpu_capability()})"
        )
        because = f"{cpu} computes bf16 with {feature}" if native else f"{cpu} has no native bf16"
    if precision == "auto":
        chosen = "bf16" if native else "fp32"
        log.info("%s=auto: %s, as %s", setting, chosen, because)
        return chosen
    if not native and device.type == "cuda":
        raise ConfigError(
            f"{setting}=bf16 but {because} (it would run emulated, several times slower); use "
            f"{setting}=fp16 (with its GradScaler) or fp32"
        )
    if not native:
        log.warning(
            "%s=bf16 but %s (neither AMX nor AVX-512-BF16): it runs emulated, many times slower than "
            "fp32; use %s=auto or fp32",
            setting, because, setting,
        )  # fmt: skip
    return precision


# --------------------------------------------------------------------------- CPU threads


def cpu_share(
    *, affinity: Collection[int] | None, cpu_max: Iterable[str], env: Mapping[str, str], cpu_count: int
) -> tuple[int, str]:
    """The CPUs one process of this run may use, and the limit that decided it: the fewest of
    its affinity mask (taskset, a Slurm task's binding), its cgroup's CPU quota (`cpu.max` of
    each cgroup level, "QUOTA PERIOD" or "max PERIOD": a container's --cpus, Slurm's cgroup,
    rounded down) and SLURM_CPUS_PER_TASK (else `cpu_count`); shared by the processes of this
    run on the node (LOCAL_WORLD_SIZE, torchrun's ranks), unless each is a Slurm task of its
    own (the Slurm launcher's ranks: their affinity and SLURM_CPUS_PER_TASK are their own)."""
    limits: list[tuple[int, str]] = []
    if affinity:
        limits.append((len(affinity), "the affinity mask"))
    for text in cpu_max:
        quota, _, period = text.strip().partition(" ")
        if quota.isdigit() and period.strip().isdigit() and int(period) > 0:
            limits.append((max(1, int(quota) // int(period)), f"the cgroup CPU quota ({text.strip()})"))
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits.append((int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"))
    cpus, source = min(limits, default=(max(1, cpu_count), "the CPU count"))
    own_task = env.get("SUBMITIT_EXECUTOR") == "slurm" and int(env.get("SLURM_NTASKS") or 1) > 1
    ranks = 1 if own_task else max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    if ranks > 1:
        return max(1, cpus // ranks), f"{cpus} CPUs ({source}) shared by {ranks} processes"
    return cpus, f"{cpus} CPU(s): {source}"


def _levels(mount: Path, path: str) -> list[Path]:
    """The folders of cgroup `path` and of each level above it, up to the hierarchy's `mount`,
    that exist here (inside a container the mount may be the container's own cgroup, its path
    in /proc/self/cgroup then naming a folder this mount does not have)."""
    level = mount / path.strip().lstrip("/")
    return [folder for folder in [level, *level.parents] if folder.is_relative_to(mount) and folder.is_dir()]


def cgroup_cpu_max(
    cgroup_file: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> list[str]:
    """The CPU quotas of this process's cgroup and of each level above it, as "QUOTA PERIOD"
    (or "max PERIOD"): `cpu.max` under cgroup v2; `cpu.cfs_quota_us` and `cpu.cfs_period_us`
    of the cpu controller's hierarchy under v1 (mounted as cpu, or cpu,cpuacct), where -1 means
    no quota. `cgroup_file` lists this process's cgroups (`N:CONTROLLERS:PATH`)."""
    texts = []
    try:
        for line in cgroup_file.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if not controllers:  # "0::PATH": the v2 hierarchy, mounted at the root
                levels = _levels(root, path)
                texts += [(f / "cpu.max").read_text() for f in levels if (f / "cpu.max").is_file()]
            elif "cpu" in controllers.split(","):
                names = (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")
                mount = next((root / name for name in names if (root / name).is_dir()), None)
                for folder in _levels(mount, path) if mount is not None else []:
                    if (folder / "cpu.cfs_quota_us").is_file():
                        quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                        texts.append(f"{quota} {(folder / 'cpu.cfs_period_us').read_text().strip()}")
    except (OSError, ValueError):  # no cgroup filesystem (macOS, a restricted container): no quota known
        pass
    return texts


def machine_cpu_share() -> tuple[int, str]:
    """`cpu_share` of this process, read from the machine."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return cpu_share(
        affinity=affinity, cpu_max=cgroup_cpu_max(), env=os.environ, cpu_count=os.cpu_count() or 1
    )


def pick_threads(setting: Any, share: tuple[int, str], env: Mapping[str, str]) -> tuple[int, str]:
    """`trainer.num_threads`: a positive integer, or `auto`: OMP_NUM_THREADS where set (by
    hand, torchrun, or the Ray launcher's share of the machine), else this process's CPUs."""
    if setting == "auto":
        omp = env.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and int(omp) > 0:
            return int(omp), f"OMP_NUM_THREADS={omp}"
        return share
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"trainer.num_threads={setting!r} must be auto or a positive integer")
    return setting, "trainer.num_threads"


def set_threads(setting: Any) -> int:
    """Apply `trainer.num_threads` to torch (once per run, before any work) and log it."""
    threads, why = pick_threads(setting, machine_cpu_share(), os.environ)
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%s)", threads, why)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(*parts: int) -> int:
    """A seed for one stream of one rank (e.g. seed, rank, stream), well mixed by numpy's
    SeedSequence: nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers, so
    saved keys carry no wrapper prefixes."""
    while True:
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, nn.Module):
            model = compiled
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
