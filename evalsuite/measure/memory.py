"""Batch sizes from a memory budget: what the device has free once the models are on it.

The ppl and tasks stages size their forwards so that the transient tensors of one batch (logits,
MLP activations) fit in a fixed share of the free device memory, under the caps that already keep
a batch large enough to keep the device busy. Results are rounded down to a power of two so that
small changes in free memory between runs give the same batch plan (it is part of the fp cache's
key, and batch shapes change bf16 rounding in the last bits).
"""

from __future__ import annotations

import torch

# share of free memory one batch's transient tensors may take (the allocator's fragmentation, the
# kernels' workspaces and the other variants' batches need the rest)
BUDGET_FRACTION = 0.5


def free_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device in bytes (None on other devices)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def fit(per_item_bytes: float, free: int | None, cap: int, minimum: int = 1) -> int:
    """Items per batch: ``cap``, or fewer so that items x per_item_bytes stays within the budget;
    a power of two when the budget decides; never below ``minimum``."""
    if free is None or per_item_bytes <= 0:
        return max(minimum, cap)
    n = int(BUDGET_FRACTION * free // per_item_bytes)
    if n < cap:
        n = 1 << (n.bit_length() - 1) if n >= 1 else 0
    return max(minimum, min(cap, n))


def activation_bytes_per_token(config, element_bytes: int = 4) -> int:
    """Transient bytes per token of one decoder layer's forward: the MLP's three width-sized tensors
    and a handful of hidden-sized ones (``element_bytes`` 4: the float32 reference's worst case)."""
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 4096)
    width = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return element_bytes * (3 * width + 6 * hidden)
