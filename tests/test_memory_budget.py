"""Batch sizes from a memory budget (the free device memory), with a fake budget on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evalsuite.measure import memory
from evalsuite.measure.batch_plan import gpu_batch_tokens, gpu_scored_rows
from evalsuite.measure.perplexity import gpu_windows_per_batch

GiB = 1 << 30
LLAMA2_7B = SimpleNamespace(hidden_size=4096, intermediate_size=11008, vocab_size=32000)
SMOLLM2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, vocab_size=49152)


def test_fit_is_the_cap_when_memory_is_plenty_and_a_power_of_two_when_it_is_not():
    assert memory.fit(100, None, 16) == 16
    assert memory.fit(100, 10**9, 16) == 16
    assert memory.fit(GiB, 10 * GiB, 16) == 4  # 5 fit in half of 10 GiB → 4
    assert memory.fit(GiB, 11 * GiB, 16) == 4 and memory.fit(GiB, 17 * GiB, 16) == 8
    assert memory.fit(GiB, GiB, 16) == 1  # never below the minimum, even when nothing fits


@pytest.mark.parametrize("free_gib, want", [(None, 16), (80, 16), (8, 4), (2, 1)])
def test_ppl_windows_per_batch_shrink_with_free_memory(free_gib, want):
    free = None if free_gib is None else free_gib * GiB
    got = gpu_windows_per_batch(2048, LLAMA2_7B.vocab_size, True, free, LLAMA2_7B, noise_floor=True)
    assert got == want
    # what was chosen fits the budget share by the stated per-window cost
    per_window = 2048 * (32000 * 8 + memory.activation_bytes_per_token(LLAMA2_7B))
    assert free is None or got == 1 or got * per_window <= memory.BUDGET_FRACTION * free


def test_ppl_budget_is_smaller_without_fused_statistics():
    free = 10 * GiB
    assert gpu_windows_per_batch(2048, 32000, False, free, LLAMA2_7B) < gpu_windows_per_batch(2048, 32000, True, free, LLAMA2_7B)


def test_task_batch_tokens_and_scored_rows_shrink_with_free_memory():
    assert gpu_batch_tokens(SMOLLM2, 100 * GiB) == gpu_batch_tokens(SMOLLM2) == 262_144
    full = gpu_batch_tokens(LLAMA2_7B)
    assert gpu_batch_tokens(LLAMA2_7B, 100 * GiB) == full
    small = gpu_batch_tokens(LLAMA2_7B, 2 * GiB)
    assert small % 1024 == 0 and 1024 <= small < full
    assert small * memory.activation_bytes_per_token(LLAMA2_7B, 2) <= memory.BUDGET_FRACTION * 2 * GiB
    assert gpu_batch_tokens(LLAMA2_7B, 1) == 1024  # at least one block of 1,024 tokens
    assert gpu_scored_rows(32000, 100 * GiB) == gpu_scored_rows(32000)
    assert 1024 <= gpu_scored_rows(32000, GiB // 2) < gpu_scored_rows(32000)


@pytest.mark.gpu
def test_free_memory_is_read_from_the_gpu_and_the_cpu_has_none():
    import torch

    free = memory.free_bytes("cuda")
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
    assert memory.free_bytes("cpu") is None
