"""Per-layer facts read from the ``layers`` stage's records: which layer is worst, which are under
a threshold, and SQNR by depth. Shared by the layer gate and the report; plain records, no torch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from evalsuite.results import Results

_DEPTH = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


def depth_of(name: str) -> int | None:
    """Transformer block index of a module name (``model.layers.3.mlp.down_proj`` → 3,
    ``block.3`` → 3), or None for modules outside the blocks (e.g. ``lm_head``)."""
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


@dataclass
class LayerSummary:
    """SQNR (dB, 10·log10(‖ref‖² / ‖ref − quantized‖²); higher is better) of every quantized linear
    layer of one variant, each view (weight, output) against its floor: the record's own
    ``extra.floor_db`` (the layers stage's threshold file), else ``default_floor_db``.

    A layer's headroom is min over views of (SQNR − floor); the worst layer has the least headroom.
    """

    variant: str
    values: dict[str, dict[str, float]]   # layer → view → SQNR dB
    floors: dict[str, dict[str, float]]   # layer → view → floor dB

    def headroom(self, layer: str) -> float:
        room = [self.values[layer][v] - self.floors[layer][v] for v in self.values[layer]]
        return min((r if math.isfinite(r) else (math.inf if r > 0 else -math.inf)) for r in room) if room else math.inf

    @property
    def worst(self) -> str | None:
        return min(self.values, key=lambda k: (self.headroom(k), k)) if self.values else None

    @property
    def under(self) -> list[str]:
        """Layers with any view below its floor (NaN counts as under), least headroom first."""
        bad = [k for k, views in self.values.items()
               if any(not (math.isfinite(x) and x >= self.floors[k][v]) and not (x == math.inf) for v, x in views.items())]
        return sorted(bad, key=lambda k: (self.headroom(k), k))

    def describe(self, layer: str) -> str:
        return ", ".join(f"{v.removesuffix('_sqnr_db')} {x:.3g} dB (floor {self.floors[layer][v]:.3g})"
                         for v, x in self.values[layer].items())


def _floor(value) -> float | None:
    """A record's ``floor_db``: a number, or ``"inf"`` (JSON has no infinity) for a layer the policy
    keeps in float, which no quantized SQNR can meet."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def layer_summary(results: Results, variant: str, views: list[str], default_floor_db: float) -> LayerSummary | None:
    """Per-module records of ``variant`` (tasks other than ``all`` and ``block.N``) for each of ``views``."""
    values: dict[str, dict[str, float]] = {}
    floors: dict[str, dict[str, float]] = {}
    for view in views:
        for r in results.find(stage="layers", variant=variant, metric=view):
            if r.task == "all" or r.task.startswith("block."):
                continue
            floor = r.extra.get("floor_db") if r.extra else None
            values.setdefault(r.task, {})[view] = r.value if r.value is not None else math.nan
            parsed = _floor(floor)
            floors.setdefault(r.task, {})[view] = default_floor_db if parsed is None else parsed
    return LayerSummary(variant, values, floors) if values else None


def block_sqnr(results: Results, variant: str) -> list[tuple[int, float, float | None]]:
    """(block index, hidden_sqnr_db, floor) of each transformer block, in depth order."""
    out = []
    for r in results.find(stage="layers", variant=variant, metric="hidden_sqnr_db"):
        d = depth_of(r.task)
        if d is not None and r.value is not None:
            floor = r.extra.get("floor_db") if r.extra else None
            out.append((d, r.value, _floor(floor)))
    return sorted(out)
