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


NO_IDLE_ON_CPU = "not applicable: on a CPU the host is the device"


class DeviceBusy:
    """How much of a stage's wall time the device spent inside model forwards, for the run's idle
    fraction per stage (``idle = 1 - busy / wall``).

    On CUDA each outermost forward of the given models is bracketed by a pair of timing events on the
    current stream (forward hooks on the models and on their decoder blocks, the first ``ModuleList`` of
    more than one module: a path that runs the blocks itself, as the tasks stage's packed forwards
    do, is timed block by block; inside a model's own forward the blocks' hooks record nothing; two
    events an outermost span, no synchronisation while the stage runs); ``busy`` is the sum of those
    spans (``forwards`` in the record: their number), read once at the end. A span counts the device's gaps inside a forward (a launch-bound decode) as busy, and
    work outside a forward (a model reloaded by the stage, the statistics) as idle: it says how much of
    the stage the models' forwards left the device waiting on the host. Elsewhere there is no number.
    """

    def __init__(self, models, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.models = list({id(m): m for m in models if isinstance(m, torch.nn.Module)}.values())
        self._spans: list[tuple[object, object]] = []
        self._handles: list = []
        self._open: list = []  # start events of forwards under way, outermost first
        self.wall = 0.0

    def _pre(self, module, args):
        start = None
        if not self._open:  # inside an outermost span nothing is recorded
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        self._open.append(start)

    def _post(self, module, args, output):
        start = self._open.pop()
        if not self._open:  # the outermost forward: a model calling another is counted once
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((start, end))

    def _timed_modules(self) -> list[torch.nn.Module]:
        out = []
        for m in self.models:
            out.append(m)
            blocks = next((c for c in m.modules() if isinstance(c, torch.nn.ModuleList) and len(c) > 1), None)
            out += list(blocks or ())
        return list({id(m): m for m in out}.values())

    def __enter__(self) -> "DeviceBusy":
        if self.cuda:
            for m in self._timed_modules():
                self._handles += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._open.clear()

    def record(self) -> dict:
        """``{"fraction": idle fraction, "busy_s", "wall_s"}``, or ``{"fraction": None, "reason"}``."""
        if not self.cuda:
            return {"fraction": None, "reason": NO_IDLE_ON_CPU}
        if self._spans:
            torch.cuda.synchronize()
        busy = sum(s.elapsed_time(e) for s, e in self._spans) / 1e3
        idle = max(0.0, 1.0 - busy / self.wall) if self.wall > 0 else None
        return {"fraction": None if idle is None else round(idle, 3), "busy_s": round(busy, 3),
                "wall_s": round(self.wall, 3), "forwards": len(self._spans)}
