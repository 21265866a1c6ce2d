"""Data-parallel evaluation on PyTorch's own runtime (torchrun + torch.distributed).

Every rank holds the full models; a stage splits its work units (windows, requests, calibration
batches) with ``shard`` and collects per-unit results on every rank with ``gather``, then computes
its statistics from the gathered units in their original order, so the numbers equal one process's.
Only rank 0 writes files.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as (original index, item) pairs, round-robin."""
    return [(i, items[i]) for i in range(rank, len(items), world_size)]


def gather(pairs: list[tuple[int, Any]], world_size: int) -> list[Any]:
    """All ranks' (index, result) pairs, merged back into index order; a no-op on one process."""
    if world_size > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, pairs)
        pairs = [p for part in parts for p in part]
    return [r for _, r in sorted(pairs, key=lambda p: p[0])]
