"""Shared by the GPU benchmarks: device-side milliseconds of a callable, and the JSON each one
writes to ``$OUT`` (the folder the device machine sends back)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ~1 ms of device spin at Hopper's ~1.7 GHz (torch.cuda._sleep counts clock cycles)
HOST_COVER_CYCLES = 2_000_000


def timed_ms(fn, device: torch.device, repeat: int, warmup: int = 1, before=None) -> dict:
    """Median / min milliseconds of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones:
    CUDA events on a GPU (device time of the call), the wall clock elsewhere. ``before()``, if given,
    runs ahead of every call, untimed (e.g. an L2 flush: on a GPU it is queued before the start event)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # keep the device busy while the host queues the call: otherwise the start event fires
            # when ``before`` ends and the host's launch time of ``fn`` (a CUDA-graph replay's
            # bookkeeping, ~0.1-0.2 ms) is counted as device time (H100, 2026-12-07: a 32 MiB bf16
            # GEMV read 216 us, ~20x its copy-bandwidth time)
            torch.cuda._sleep(HOST_COVER_CYCLES)
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


def write_out(name: str, payload: dict) -> Path | None:
    """Write ``payload`` as ``$OUT/<name>.json`` when $OUT is set (and say so); the path, else None."""
    if not os.environ.get("OUT"):
        return None
    path = Path(os.environ["OUT"]) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}", flush=True)
    return path
