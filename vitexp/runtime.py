"""What training and the commands both need from the machine: the device, the autocast
context, seeding, and the plain module under `torch.compile`/DDP wrappers."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
from torch import nn

from vitexp.config import DEVICES, PRECISIONS, Choices, check_value
from vitexp.errors import ConfigError


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
    """Decided once per run: bf16/fp16 autocast, or nothing for fp32. The name is checked
    against the declared choices (`vitexp.config.PRECISIONS`), as `validate` checks
    `trainer.precision`; here, whether the device computes it."""
    check_value(setting, precision, Choices(PRECISIONS))
    check_precision(device, precision, setting)
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


def check_precision(device: torch.device, precision: str, setting: str = "precision") -> None:
    """bf16 on a GPU without bf16 tensor cores (T4, V100) runs emulated, several times slower
    than fp16: `torch.cuda.is_bf16_supported()` counts emulation as support by default."""
    emulated = device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" and emulated:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"{setting}=bf16 but {name} has no bf16 tensor cores (it would run emulated, several times "
            f"slower); use {setting}=fp16 (with its GradScaler) or fp32"
        )


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
