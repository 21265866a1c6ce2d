"""Baselines: versioned expected values, one file per model × device/dtype × variant.

Schema ``evalsuite.baseline/2`` adds what a paired comparison needs (``evalsuite.judge.paired``):
``"paired": {"file": "<variant>.npz", "sha256": ...}`` (per-window, per-item and per-prompt arrays beside the
JSON), ``"measured"`` (code revision, kernels, batch plan, dtype, card, versions, protocol) and
``"noise"`` (the run-to-run noise its margins were calibrated with, and its source). Schema /1
files still load; they have no paired data, so regressions against them are INCONCLUSIVE.

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
from evalsuite.judge import paired as paired_mod
from evalsuite.judge import speed as speed_mod
from evalsuite.judge.checks import FAIL, IMPROVED, SKIPPED, WORSE, Check, drift_verdict, metric_stderr
from evalsuite.judge.config import GateConfig
from evalsuite.judge.noise import NoiseModel, noise_beside
from evalsuite.results import SCHEMA as RESULTS_SCHEMA
from evalsuite.results import Metric, Results, write_json_atomic

BASELINE_SCHEMA = "evalsuite.baseline/2"
READABLE_SCHEMAS = ("evalsuite.baseline/1", BASELINE_SCHEMA)
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
    schema: str = BASELINE_SCHEMA
    measured: dict[str, Any] | None = None   # how it was measured (paired.measured_how)
    noise: dict[str, Any] | None = None      # the noise model its checks are calibrated with
    paired_info: dict[str, Any] | None = None  # {"file", "sha256"} of the paired arrays
    arrays: dict[str, Any] | None = None     # the paired arrays themselves, once loaded

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
                "source": self.source, "updated": self.updated, "measured": self.measured, "noise": self.noise,
                "paired": self.paired_info, "metrics": metrics}

    def save(self, path: Path) -> Path:
        path = Path(path)
        if self.arrays:
            side = path.with_suffix(paired_mod.PAIRED_SUFFIX)
            self.paired_info = {"file": side.name, "sha256": paired_mod.save_arrays(side, self.arrays),
                                "arrays": len(self.arrays)}
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
                    updated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    measured=paired_mod.measured_how(results),
                    arrays=paired_mod.paired_arrays(results, variant) or None)


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
    if schema not in READABLE_SCHEMAS:
        raise EvalsuiteError(f"{path}: baseline schema {schema!r} is not supported (this evalsuite reads "
                             f"{', '.join(READABLE_SCHEMAS)} baselines and {RESULTS_SCHEMA} results)")
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
                     updated=data.get("updated"), path=path, device_name=data.get("device_name"), schema=schema,
                     measured=data.get("measured"), noise=data.get("noise"), paired_info=data.get("paired"))
    except (KeyError, TypeError, ValueError) as e:
        raise EvalsuiteError(f"{path}: malformed baseline file ({type(e).__name__}: {e})") from None
    if isinstance(b.paired_info, dict) and b.paired_info.get("file"):
        b.arrays = paired_mod.load_arrays(path.parent / str(b.paired_info["file"]), b.paired_info.get("sha256"))
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
                   partial: bool = False, accept: bool = False) -> str:
    """The command that makes this run the variant's baseline, exactly as it must be typed (a
    partial run needs --allow-partial, a failing one --accept-regression; ``baseline update``
    refuses them otherwise)."""
    parts = ["evalsuite", "baseline", "update", str(results_path or "RESULTS.json"), "--variant", variant]
    if directory is not None and Path(directory) != DEFAULT_DIR:
        parts += ["--baselines", str(directory)]
    if partial:
        parts.append("--allow-partial")
    if accept:
        parts.append("--accept-regression")
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


def _speed_gate_allowed(results: Results, config: GateConfig, differences: list[str]) -> str | None:
    """Why speed against this baseline is not gated, or None where it may be: on a GPU (a CPU's
    timings are informational unless ``gate_cpu_speed``), measured with the same kernels (the card is
    checked before). Which statistics then gate: ``evalsuite.judge.speed``."""
    if (results.run.get("device") or {}).get("type") != "cuda" and not config.gate_cpu_speed:
        return "CPU timing (gate it with --gate-cpu-speed)"
    kernels = [d for d in differences if d.startswith("kernels ")]
    return "timed with other kernels (" + "; ".join(kernels) + ")" if kernels else None


def baseline_checks(results: Results, baseline: Baseline, config: GateConfig,
                    results_path: str | Path | None = None, directory: Path | None = None,
                    gated_only: bool = True, noise: NoiseModel | None = None) -> list[Check]:
    """This run's records of the baseline's variant group against the baseline: the paired primary
    statistics (gated), then every stored metric (reported; GPU speed-up and calibrated tokens/s
    gated, see ``evalsuite.judge.speed``)."""
    check_identity(baseline, results, str(baseline.path or "baseline"))
    command = update_command(results_path, baseline.variant, directory, results.partial)
    # a failing check's command accepts a failing run: it needs --accept-regression
    accept = update_command(results_path, baseline.variant, directory, results.partial, accept=True)
    stages = results.run.get("stages")
    device = (results.run.get("device") or {}).get("type")
    device_name = (results.run.get("device") or {}).get("name")
    sample_differs = bool(baseline.partial) != results.partial or (
        (baseline.partial or results.partial) and baseline.limit != results.run.get("limit"))
    differences = paired_mod.path_differences(baseline.measured, paired_mod.measured_how(results))
    if noise is None:
        noise = NoiseModel.from_dict(baseline.noise) if baseline.noise else (noise_beside(baseline.path) or NoiseModel())
    checks = _paired_primary_checks(results, baseline, noise, differences, config, command)
    # the between-process speed spread is the card's, not the baseline's: where the embedded noise
    # has none, a calibration beside the baseline (bench_aa.py --speed-only) supplies it
    speed_noise = noise
    if not any("between_process_sd" in e for e in noise.statistics.values()):
        speed_noise = noise_beside(baseline.path) or noise
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
        if b.stage == "speed" and b.metric in speed_mod.SPEED_STATISTICS and b.value:
            why_not = _speed_gate_allowed(results, config, differences)
            check = speed_mod.speed_check(name, b, c, speed_noise, config.rel_floor(key), config.alpha,
                                          gate_allowed=why_not is None, not_gated_why=why_not)
            if check.verdict in (FAIL, IMPROVED):
                check.command = command
            checks.append(check)
            continue
        verdict, reason, tol = compare_metric(b, c, config, baseline.tolerances.get(b.key))
        check = Check(name, "baseline", verdict, reason, tolerance=tol, interval=c.ci95, **common)
        check.gated = False
        if check.verdict == FAIL:
            check.verdict = WORSE
        kind = "an extreme or a statistic without uncertainty" if metric_stderr(b) is None and \
            metric_stderr(c) is None else "a secondary statistic"
        why_not = _speed_gate_allowed(results, config, differences) if b.stage == "speed" else None
        if why_not is not None:
            kind = why_not
        elif b.variant.endswith("@noise"):
            kind = "the harness's own noise floor"
        check.reason = f"reported, not gated ({kind}): {reason}"
        if check.verdict in (FAIL, IMPROVED):
            check.command = command
        checks.append(check)
    for c in checks:
        if c.command == command and (c.verdict == FAIL or (config.strict and c.verdict == IMPROVED)):
            c.command = accept
    return checks


def _paired_primary_checks(results: Results, baseline: Baseline, noise: NoiseModel, differences: list[str],
                           config: GateConfig, command: str) -> list[Check]:
    expected = paired_mod.primary_keys(baseline.arrays, baseline.metrics, baseline.variant)
    if not baseline.arrays:
        why = (f"the baseline {baseline.path or 'file'} (schema {baseline.schema}) holds no per-window / per-item "
               f"data, and a paired comparison needs them; regenerate it with 'evalsuite baseline update'")
        return paired_mod.unpaired_checks(baseline.variant, expected, why)
    cand = paired_mod.paired_arrays(results, baseline.variant)
    checks = paired_mod.paired_checks(baseline.arrays, cand, baseline.variant, noise, differences, config.alpha)
    seen = {c.check for c in checks}
    stages = results.run.get("stages")
    for k in expected:
        if f"baseline:{k}" not in seen and not any(c.check.startswith(f"baseline:{k.rsplit('/', 1)[0]}/paired")
                                                   for c in checks):
            stage = k.split("/", 1)[0]
            if stages is not None and stage not in stages:
                why = f"stage {stage} was not run"
            elif not any(a.startswith(stage + "/") for a in baseline.arrays):
                why = (f"the baseline {baseline.path or 'file'} holds no per-window / per-item / per-prompt {stage} "
                       f"data (written before they were kept): not judged, never a PASS; regenerate it with "
                       f"'evalsuite baseline update'")
            else:
                why = "this run holds no per-window / per-item / per-prompt data for it"
            checks.append(Check(f"baseline:{k}", "baseline", SKIPPED, why, stage=stage, variant=baseline.variant))
    for c in checks:
        c.extra.setdefault("baseline_measured", baseline.measured)
        if c.verdict in (FAIL, IMPROVED):
            c.command = command
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
