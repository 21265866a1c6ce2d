"""Run-to-run noise of the gated statistics: the margins a paired baseline check allows.

A candidate and its baseline score the same windows and items, so the data set's sampling error
cancels; what remains between two honest runs is numerics (bf16 rounding under another batch plan,
kernel or library). ``benchmarks/bench_aa.py`` measures that on a GPU, re-running the same model and
data while varying only what should not matter, and writes a calibration file (schema
``evalsuite.noise/1``) beside the baselines::

    {"schema": "evalsuite.noise/1", "model": {...}, "device_name": "NVIDIA H200", "dtype": "bf16",
     "source": "benchmarks/bench_aa.py, 5 runs, git <rev>, <date>", "runs": [{"label", "config"}],
     "statistics": {"ppl/wikitext2/fp/nll_shift": {"same_path": 2e-6, "cross_path": 3e-5,
                                                    "sd": ..., "pairs": 4, "unit": "nats/token"}, ...}}

``same_path`` is the largest |difference| seen between runs measured the same way, ``cross_path``
between runs that differed in batch plan, kernels or packing. A check's margin is
``max(floor, SAFETY x observed)``: the floor is the smallest change worth paging for (a product
choice, below), the observed noise is the card's. Without a calibration file the floors apply and
every reason says the noise is uncalibrated.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalsuite.errors import EvalsuiteError

NOISE_SCHEMA = "evalsuite.noise/1"
NOISE_FILE = "noise.json"
SAFETY = 3.0  # margin = SAFETY x the largest honest difference seen (or the floor, if larger)

# Smallest change each gated statistic pages for, by ``stage/task/variant/statistic`` pattern (first
# match wins). Far above measured bf16 A/A drift (fp token ppl moved 0.0025% between code versions;
# 1-3% of answers flip, symmetrically) and far below the regressions they exist for (+0.5% token
# ppl from a harness bug, +30% KLD from a broken scale, a 1.5-point accuracy drop).
FLOORS: dict[str, float] = {
    "ppl/*/*/nll_shift": 1e-3,          # nats/token: token ppl +0.1%
    "ppl/*/*/kld_mean_rel": 0.10,       # relative change of mean KLD
    "ppl/*/*/kld_top1pct_rel": 0.15,    # relative change of the top-1% KLD tail
    "tasks/pooled/*/acc_shift": 0.005,  # accuracy over all tasks' items: 0.5 points
    "tasks/*/*/acc_shift": 0.02,        # one task's accuracy (reported)
    "tasks/*/*/acc_norm_shift": 0.02,
    "tasks/pooled/*/ll_shift": 0.02,    # nats per choice (reported)
    # gen: greedy generations flip at near-ties, so an honest rerun under another batch plan or
    # kernel flips some prompts both ways; bench_aa.py does not rerun the gen stage yet, so these
    # defaults stand until a noise file has gen/... statistics. A broken scale or cache path
    # collapses the identical fraction by tens of points.
    "gen/*/*/identical_shift": 0.10,    # fraction of prompts identical to fp: 10 points
    "gen/*/*/divergence_shift": 0.10,   # mean tokens to the first divergence, per token budget (reported)
    "*": 0.0,
}


@dataclass
class NoiseModel:
    """Observed run-to-run differences per statistic, and where they were measured."""

    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "uncalibrated: no noise file (benchmarks/bench_aa.py writes one); margins are the floors"
    path: str | None = None
    calibrated: bool = False

    def margin(self, key: str, cross_path: bool) -> tuple[float, str]:
        """The margin of statistic ``key`` and a phrase saying where it comes from."""
        floor = next(v for p, v in FLOORS.items() if fnmatch.fnmatchcase(key, p))
        entry = self._entry(key)
        path = "cross_path" if cross_path else "same_path"
        if entry is None or entry.get(path) is None:
            why = "no calibration for this statistic" if self.calibrated else self.source
            if key.startswith("gen/"):
                why = "default margin: no measured gen noise, bench_aa.py does not rerun the gen stage"
            return floor, f"floor {floor:.3g} ({why})"
        seen = float(entry[path])
        margin = max(floor, SAFETY * seen)
        return margin, (f"max(floor {floor:.3g}, {SAFETY:g} x {path.replace('_', '-')} A/A |Δ| {seen:.3g}) "
                        f"from {self.source}")

    def _entry(self, key: str) -> dict[str, Any] | None:
        if key in self.statistics:
            return self.statistics[key]
        # another variant's calibration of the same statistic: the widest one
        stage, _task, _variant, stat = key.split("/", 3)
        near = [e for k, e in self.statistics.items() if k.startswith(stage + "/") and k.endswith("/" + stat)]
        if not near:
            return None
        return {p: max((e.get(p) or 0.0) for e in near) for p in ("same_path", "cross_path")}

    def between_process(self, key: str) -> dict[str, Any] | None:
        """The measured between-process spread of a speed statistic (``speed/<task>/<variant>/<metric>_rel``:
        ``between_process_sd`` of one process's relative value, over ``processes`` fresh processes), or
        None. Another variant's spread on the same speed task stands in (the widest): machine state
        moves every variant; decode and prefill spread differently, so the task must match."""
        entry = self.statistics.get(key)
        if entry is None:
            stage, task, _variant, stat = key.split("/", 3)
            near = [e for k, e in self.statistics.items()
                    if k.startswith(f"{stage}/{task}/") and k.endswith("/" + stat) and e.get("between_process_sd") is not None]
            entry = max(near, key=lambda e: float(e["between_process_sd"]), default=None)
        if entry is None or entry.get("between_process_sd") is None or int(entry.get("processes") or 0) < 3:
            return None  # fewer than 3 processes give no usable spread
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "calibrated": self.calibrated, "statistics": self.statistics}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "NoiseModel":
        if not d:
            return cls()
        return cls(statistics=dict(d.get("statistics") or {}), source=str(d.get("source") or "unknown"),
                   path=d.get("path"), calibrated=bool(d.get("calibrated", bool(d.get("statistics")))))


def load_noise(path: str | Path) -> NoiseModel:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalsuiteError(f"{path}: unreadable noise calibration file ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != NOISE_SCHEMA:
        raise EvalsuiteError(f"{path}: not a noise calibration file (schema {NOISE_SCHEMA} expected)")
    return NoiseModel(statistics=dict(data.get("statistics") or {}), source=str(data.get("source") or path),
                      path=str(path), calibrated=True)


def noise_beside(baseline_file: Path | None) -> NoiseModel | None:
    """The calibration file in a baseline's folder, if there is one."""
    if baseline_file is None:
        return None
    p = Path(baseline_file).parent / NOISE_FILE
    return load_noise(p) if p.is_file() else None
