"""Data-parallel training over several processes: which process this is, and the few
collectives the training loop needs.

Two launchers start a group of processes: `torchrun` (it sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) and a SLURM job with several tasks started by submitit (the
`hydra/launcher=slurm` preset with `tasks_per_node` > 1), whose SLURM variables submitit's
`TorchDistributedEnvironment` turns into the same ones. A plain `python -m vitexp` is a world
of one, and every function here is then a no-op that returns its input.

The backend follows the device: NCCL for CUDA tensors, gloo for CPU ones ("cpu:gloo,cuda:nccl"
when CUDA is present, so CPU-side collectives such as gathering RNG states work too).
"""

from __future__ import annotations

import datetime
import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vitexp.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the group: rank 0 of 1 when not launched as a group."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run dir, checkpoints, metrics and W&B."""
        return self.rank == 0


SINGLE_PROCESS = World()


def _launched_by_submitit() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def launch_world() -> World:
    """Read the launcher's environment. Under submitit (SLURM), first export the torchrun-style
    variables from the SLURM ones: the first node of the job is the rendezvous host and the
    port is derived from the job id, so every task agrees without talking."""
    if _launched_by_submitit() and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    try:
        return World(
            rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size
        )
    except KeyError as e:
        raise ConfigError(f"WORLD_SIZE={size} but {e.args[0]} is not set: start the run with torchrun") from e


def init(world: World, timeout_s: float = 1800) -> None:
    """Join the process group (once per process; a second call is a no-op)."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and world.local_rank < torch.cuda.device_count():
        # Each process drives one GPU; NCCL needs it chosen before the first collective. (With
        # more processes than GPUs, `device_for` refuses a CUDA run; a CPU run needs no GPU.)
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.debug("rank %d of %d joined the %s process group", world.rank, world.size, backend)


def device_for(world: World, name: str) -> torch.device:
    """`trainer.device` for this rank: a CUDA device means this rank's GPU (LOCAL_RANK). Two
    processes on one GPU would fail at NCCL's first collective, so more processes on a node
    than it has GPUs are refused."""
    device = torch.device(name)
    if not world.distributed or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", f"at least {world.local_rank + 1}")
        raise ConfigError(
            f"{per_node} processes on this node but {count} GPU(s) visible: each process needs a GPU of "
            f"its own; start torchrun with --nproc_per_node={count}, or set trainer.device=cpu"
        )
    return torch.device("cuda", world.local_rank)


def agree(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (any picklable object): decisions that must be the same
    everywhere, such as whether to stop, are taken once."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's `value` (tensors and plain containers, as in a checkpoint), in rank order,
    on every rank. Sent as `torch.save` bytes and read back with `weights_only=True`: the
    object collectives' own pickling of tensors does not load back under torch's safe loader."""
    if not world.distributed:
        return [value]
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payloads: list[Any] = [None] * world.size
    dist.all_gather_object(payloads, buffer.getvalue())
    return [torch.load(io.BytesIO(payload), weights_only=True) for payload in payloads]


def sum_(tensor: Tensor, world: World) -> Tensor:
    """Sum of `tensor` over the ranks (in place; returned for chaining)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: Tensor, world: World) -> Tensor:
    """Whether `flag` (a bool tensor) holds on every rank."""
    if not world.distributed:
        return flag
    as_int = flag.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN)
    return as_int.bool()


def any_rank(flag: bool, world: World) -> bool:
    """Whether `flag` holds on any rank: one small all-reduce, no pickling."""
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)  # a CPU tensor: gloo carries it
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
