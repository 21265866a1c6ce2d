"""Data-parallel evaluation on PyTorch's own runtime (torchrun + torch.distributed).

Every rank holds the full models; a stage splits its work units (windows, requests, calibration
batches) with ``shard`` and collects per-unit results on every rank with ``gather``, then computes
its statistics from the gathered units in their original order, so the numbers equal one process's.
Only rank 0 writes files.

Launch: ``torchrun --standalone --nproc-per-node N -m evalsuite run ...``. ``init`` joins the
process group torchrun describes in the environment (NCCL with one GPU per local rank, gloo on
CPU); ``evalsuite run`` calls it, sets ``ctx.rank``/``ctx.world_size``, and writes only on rank 0.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

from evalsuite.errors import EvalsuiteError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# with --tp the stages gather over the data-parallel replicas only (evalsuite.load.tp sets it)
_DATA_GROUP: Any = None


def set_data_group(group: Any) -> None:
    """The process group ``gather`` runs over; None: the whole torchrun world."""
    global _DATA_GROUP
    _DATA_GROUP = group


def shard(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as (original index, item) pairs, round-robin."""
    return [(i, items[i]) for i in range(rank, len(items), world_size)]


def gather(pairs: list[tuple[int, Any]], world_size: int) -> list[Any]:
    """All ranks' (index, result) pairs, merged back into index order; a no-op on one process."""
    if world_size > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, pairs, group=_DATA_GROUP)
        pairs = [p for part in parts for p in part]
    return [r for _, r in sorted(pairs, key=lambda p: p[0])]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch; (0, 1, 0) for a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes results, reports and history."""
        return self.rank == 0


def launch_env() -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a missing or bad value is a usage error."""
    try:
        env = DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise EvalsuiteError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise EvalsuiteError(f"RANK={env.rank} does not fit WORLD_SIZE={env.world_size}")
    return env


def init(device_type: str) -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1: NCCL on CUDA (one GPU per local rank),
    gloo on CPU. A no-op for one process, and for a group that is already initialised."""
    env = launch_env()
    if env.world_size == 1:
        return env
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device_type == "cuda":
            if env.local_rank >= torch.cuda.device_count():
                raise EvalsuiteError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} CUDA "
                                     "devices are visible; start torchrun with --nproc-per-node <= the GPU count")
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        atexit.register(shutdown)
    return env


def device_for(device: "torch.device", env: DistEnv) -> "torch.device":
    """On CUDA every rank takes its own GPU, ``cuda:LOCAL_RANK``; CPU ranks share the CPU."""
    import torch

    if env.world_size > 1 and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def broadcast(obj: T, world_size: int) -> T:
    """Rank 0's ``obj`` on every rank (an output path, an exit code); a no-op on one process."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(obj: T, world_size: int) -> list[T]:
    """Every rank's ``obj``, in rank order (a per-GPU peak memory); ``[obj]`` on one process."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, obj)
    return parts


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    set_data_group(None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
