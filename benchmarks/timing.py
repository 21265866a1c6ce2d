"""Timing shared by the GPU benchmarks: device-side milliseconds of a callable."""

from __future__ import annotations

import statistics
import time

import torch


def timed_ms(fn, device: torch.device, repeat: int, warmup: int = 1) -> dict:
    """Median / min milliseconds of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones:
    CUDA events on a GPU (device time of the call), the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}
