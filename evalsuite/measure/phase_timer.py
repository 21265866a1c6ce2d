"""Where a stage's device time goes: seconds per labelled phase, for ``details.<stage>.seconds``.

On CUDA each span is a pair of timing events recorded on the current stream, so the host never
waits while the stage runs (a synchronisation per forward would expose the host's launch time);
the totals are read once, at the end. On other devices work is synchronous and spans are wall time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self._spans: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._spans.append((label, start, end))

    def totals(self) -> dict[str, float]:
        """Seconds per label, summed over its spans, rounded to the millisecond."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for label, start, end in self._spans:
            s = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[label] = out.get(label, 0.0) + s
        return {k: round(v, 3) for k, v in out.items()}
