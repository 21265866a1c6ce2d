"""Baselines: versioned expected values, one file per model × device/dtype × variant.

Layout: ``reports/baselines/<model>/<device>-<dtype>/<variant>.json``; the ``fp`` file also holds the
noise-floor records (``fp@noise``). A file is a results subset plus identity::

    {"schema": "evalsuite.baseline/1", "model": {"name", "sha256"}, "variant": "int8-wo",
     "device_type": "cuda", "dtype": "bf16", "partial": false, "limit": null,
     "source": {"results", "git_revision", "started"}, "updated": "...",
     "metrics": [{stage, task, variant, metric, value, unit, n, higher_is_better, stderr, ci95,
                  extra, "tolerance": {"sigma"|"rel_floor"|"abs_floor": x}  (optional, hand-edited)}]}

Each metric's direction comes from its record; a hand-written ``tolerance`` survives
``evalsuite baseline update``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalsuite.errors import EvalsuiteError
from evalsuite.judge.checks import FAIL, IMPROVED, SKIPPED, Check, drift_verdict, metric_stderr
from evalsuite.judge.config import GateConfig
from evalsuite.results import SCHEMA as RESULTS_SCHEMA
from evalsuite.results import Metric, Results, write_json_atomic

BASELINE_SCHEMA = "evalsuite.baseline/1"
DEFAULT_DIR = Path("reports") / "baselines"


@dataclass
class Baseline:
    model: dict[str, Any]
    variant: str
    device_type: str | None
    dtype: str | None
    metrics: list[Metric]
    tolerances: dict[tuple[str, str, str, str], dict[str, float]] = field(default_factory=dict)
    partial: bool = False
    limit: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    updated: str | None = None
    path: Path | None = None
    device_name: str | None = None  # the card: speed is only comparable on the same one

    def get(self, key: tuple[str, str, str, str]) -> Metric | None:
        return next((m for m in self.metrics if m.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        metrics = []
        for m in self.metrics:
            d = m.to_dict()
            if m.key in self.tolerances:
                d["tolerance"] = self.tolerances[m.key]
            metrics.append(d)
        return {"schema": BASELINE_SCHEMA, "model": self.model, "variant": self.variant,
                "device_type": self.device_type, "device_name": self.device_name, "dtype": self.dtype, "partial": self.partial, "limit": self.limit,
                "source": self.source, "updated": self.updated, "metrics": metrics}

    def save(self, path: Path) -> Path:
        write_json_atomic(path, self.to_dict())
        self.path = path
        return path


def variant_group(variant: str) -> str:
    """The baseline file a variant belongs to: ``fp@noise`` lives with ``fp``."""
    return variant.split("@", 1)[0]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def model_identity(results: Results) -> dict[str, Any]:
    model = results.run.get("model") or {}
    return {"name": model.get("name"), "sha256": model.get("sha256")}


def baseline_path(directory: Path, results: Results, variant: str) -> Path:
    model = model_identity(results)["name"] or "unknown-model"
    device = (results.run.get("device") or {}).get("type", "unknown")
    return Path(directory) / slug(model) / f"{device}-{results.run.get('dtype', 'unknown')}" / f"{slug(variant)}.json"


def from_results(results: Results, variant: str, source: str | None = None) -> Baseline:
    """The baseline of one variant group taken from a results file (all its records)."""
    metrics = [m for m in results.records if variant_group(m.variant) == variant and m.value is not None]
    if not metrics:
        raise EvalsuiteError(f"{source or 'results'}: no records for variant {variant!r} "
                             f"(it has {', '.join(sorted({variant_group(v) for v in results.variants})) or 'none'})")
    return Baseline(model=model_identity(results), variant=variant,
                    device_type=(results.run.get("device") or {}).get("type"), dtype=results.run.get("dtype"),
                    device_name=(results.run.get("device") or {}).get("name"),
                    metrics=metrics, partial=results.partial, limit=results.run.get("limit"),
                    source={"results": source, "git_revision": results.run.get("git_revision"),
                            "started": results.run.get("started")},
                    updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def load_baselines(path: str | os.PathLike) -> list[Baseline]:
    """Baselines from a baseline file, or one per variant group of a results file."""
    path = Path(path)
    if not path.is_file():
        raise EvalsuiteError(f"{path}: no such baseline file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalsuiteError(f"{path}: truncated or corrupt baseline file ({getattr(e, 'msg', e)})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if isinstance(schema, str) and schema.startswith("evalsuite.results/"):
        results = Results.from_dict(data, source=str(path))
        groups = dict.fromkeys(variant_group(v) for v in results.variants)
        return [from_results(results, g, source=str(path)) for g in groups]
    if schema != BASELINE_SCHEMA:
        raise EvalsuiteError(f"{path}: baseline schema {schema!r} is not supported (this evalsuite reads "
                             f"{BASELINE_SCHEMA} baselines and {RESULTS_SCHEMA} results)")
    try:
        metrics, tolerances = [], {}
        for d in data["metrics"]:
            m = Metric.from_dict(d)
            metrics.append(m)
            if isinstance(d.get("tolerance"), dict):
                tolerances[m.key] = {k: float(v) for k, v in d["tolerance"].items()}
        b = Baseline(model=dict(data["model"]), variant=str(data["variant"]), device_type=data.get("device_type"),
                     dtype=data.get("dtype"), metrics=metrics, tolerances=tolerances,
                     partial=bool(data.get("partial")), limit=data.get("limit"), source=data.get("source") or {},
                     updated=data.get("updated"), path=path, device_name=data.get("device_name"))
    except (KeyError, TypeError, ValueError) as e:
        raise EvalsuiteError(f"{path}: malformed baseline file ({type(e).__name__}: {e})") from None
    return [b]


def check_identity(baseline: Baseline, results: Results, where: str) -> None:
    """A baseline of another model or another dtype is a usage error, not a regression."""
    cand = model_identity(results)
    bsha, csha = baseline.model.get("sha256"), cand.get("sha256")
    if (bsha and csha and bsha != csha) or (not (bsha and csha) and baseline.model.get("name") != cand.get("name")):
        raise EvalsuiteError(
            f"{where}: baseline is for model {baseline.model.get('name')} (sha256 {str(bsha)[:12]}), the candidate is "
            f"{cand.get('name')} (sha256 {str(csha)[:12]}); use that model's baseline or run 'evalsuite baseline update'")
    if baseline.dtype and results.run.get("dtype") and baseline.dtype != results.run.get("dtype"):
        raise EvalsuiteError(f"{where}: baseline was measured in {baseline.dtype}, the candidate in "
                             f"{results.run.get('dtype')}; compare like with like")


def update_command(results_path: str | Path | None, variant: str, directory: Path | None,
                   partial: bool = False) -> str:
    """The command that makes this run the variant's baseline, exactly as it must be typed (a
    partial run needs --allow-partial; ``baseline update`` refuses it otherwise)."""
    parts = ["evalsuite", "baseline", "update", str(results_path or "RESULTS.json"), "--variant", variant]
    if directory is not None and Path(directory) != DEFAULT_DIR:
        parts += ["--baselines", str(directory)]
    if partial:
        parts.append("--allow-partial")
    return shlex.join(parts)


def metric_key(m: Metric) -> str:
    return f"{m.stage}/{m.task}/{m.variant}/{m.metric}"


def compare_metric(base: Metric, cand: Metric, config: GateConfig,
                   tolerance: dict[str, float] | None = None) -> tuple[str, str, float]:
    """Verdict of one metric's move from baseline to candidate (see ``drift_verdict``)."""
    tolerance = tolerance or {}
    key = metric_key(base)
    sigma = tolerance.get("sigma", config.sigma)
    rel = tolerance.get("rel_floor", config.rel_floor(key))
    floor = max(tolerance.get("abs_floor", config.abs_floor), rel * abs(base.value or 0.0))
    se_b, se_c = metric_stderr(base), metric_stderr(cand)
    ses = [s for s in (se_b, se_c) if s is not None]
    # one side without an uncertainty: assume it is as noisy as the other
    se = math.sqrt(2 * ses[0] ** 2) if len(ses) == 1 else (math.hypot(*ses) if ses else None)
    verdict, reason, tol = drift_verdict(float(base.value), float(cand.value) if cand.value is not None else math.nan,
                                         se, sigma, floor, bool(base.higher_is_better))
    if base.n and cand.n and base.n != cand.n:
        reason += f"; n {base.n} vs {cand.n}"
    return verdict, reason, tol


def baseline_checks(results: Results, baseline: Baseline, config: GateConfig,
                    results_path: str | Path | None = None, directory: Path | None = None,
                    gated_only: bool = True) -> list[Check]:
    """This run's records of the baseline's variant group against the baseline's expected values."""
    check_identity(baseline, results, str(baseline.path or "baseline"))
    command = update_command(results_path, baseline.variant, directory, results.partial)
    stages = results.run.get("stages")
    device = (results.run.get("device") or {}).get("type")
    device_name = (results.run.get("device") or {}).get("name")
    sample_differs = bool(baseline.partial) != results.partial or (
        (baseline.partial or results.partial) and baseline.limit != results.run.get("limit"))
    checks = []
    for b in baseline.metrics:
        key = metric_key(b)
        if b.higher_is_better is None or b.value is None or (gated_only and config.excluded(key)):
            continue
        name = f"baseline:{key}"
        common = dict(stage=b.stage, task=b.task, variant=b.variant, metric=b.metric, baseline=b.value)
        c = results.get(*b.key)
        if c is None or c.value is None:
            ran = stages is None or b.stage in stages
            why = f"stage {b.stage} was not run" if not ran else f"no {b.metric} record in this run (partial or failed stage)"
            checks.append(Check(name, "baseline", SKIPPED, why, **common))
            continue
        common["value"] = c.value
        if b.stage == "speed" and baseline.device_type and device != baseline.device_type:
            checks.append(Check(name, "baseline", SKIPPED, f"baseline timed on {baseline.device_type}, this run on {device}", **common))
            continue
        if b.stage == "speed" and baseline.device_name and device_name and device_name != baseline.device_name:
            checks.append(Check(name, "baseline", SKIPPED,
                                f"baseline timed on {baseline.device_name}, this run on {device_name}", **common))
            continue
        if sample_differs and b.stage in ("ppl", "tasks"):
            checks.append(Check(name, "baseline", SKIPPED,
                                f"different samples: baseline limit {baseline.limit}, this run limit {results.run.get('limit')}", **common))
            continue
        verdict, reason, tol = compare_metric(b, c, config, baseline.tolerances.get(b.key))
        checks.append(Check(name, "baseline", verdict, reason, tolerance=tol, interval=c.ci95,
                            command=command if verdict in (FAIL, IMPROVED) else None, **common))
    return checks


def find_baselines(directory: Path, results: Results,
                   results_path: str | Path | None = None) -> tuple[list[Baseline], list[Check]]:
    """The stored baselines for every variant group of this run; a SKIPPED check for each missing one."""
    found, missing = [], []
    groups = dict.fromkeys(variant_group(v) for v in ["fp", *results.run.get("schemes", []), *results.variants])
    for g in groups:
        if not results.find(variant=g) and not any(variant_group(v) == g for v in results.variants):
            continue
        path = baseline_path(directory, results, g)
        if path.is_file():
            found.extend(load_baselines(path))
        else:
            # the command goes on a line of its own (printed whole, never wrapped with the reason)
            missing.append(Check(f"baseline:{g}", "baseline", SKIPPED,
                                 f"no baseline at {path}; the command below creates it"
                                 + (" (from a partial run; a full run makes a better baseline)" if results.partial else ""),
                                 variant=g, command=update_command(results_path, g, directory, results.partial)))
    return found, missing
