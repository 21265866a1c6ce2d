"""Gates within one run: each quantized variant against the fp reference measured beside it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evalsuite import stats
from evalsuite.judge.checks import FAIL, INCOMPLETE, INCONCLUSIVE, PASS, SKIPPED, WORSE, Z95, Check, fmt, limit_test
from evalsuite.judge.config import GateConfig
from evalsuite.judge.generation import generation_checks
from evalsuite.results.layers import block_sqnr, layer_summary
from evalsuite.results import Metric, Results


def quantized_variants(results: Results) -> list[str]:
    """Scheme variants of the run (not ``fp`` nor derived ones such as ``fp@noise``)."""
    names = [*results.run.get("schemes", []), *results.variants]
    return [v for v in dict.fromkeys(names) if v != "fp" and "@" not in v]


def _stage_ran(results: Results, stage: str) -> bool:
    stages = results.run.get("stages")
    return stage in stages if stages is not None else bool(results.find(stage=stage))


def _skipped(results: Results, stage: str, variant: str, metric: str, what: str) -> Check:
    if not _stage_ran(results, stage):
        reason = f"stage {stage} was not run"
    else:
        reason = f"no {metric} record for {variant} (stage {stage} ran; partial or failed data)"
    return Check(f"{stage}/{variant}/{what}", "limit", SKIPPED, reason, stage=stage, variant=variant, metric=metric)


def _limit_check(m: Metric, limit: float, upper: bool, name: str, source: str, note: str = "",
                 gated: bool = True, alpha: float = 0.01, clusters: int | None = None) -> Check:
    """A non-inferiority check of one record against a limit (see ``limit_test``); ``gated`` ones may
    fail the run, the others are reported (FAIL shows as WORSE)."""
    if clusters is None:
        windows = (m.extra or {}).get("windows")
        clusters = int(windows) if isinstance(windows, (int, float)) else (m.n if m.stage == "tasks" else None)
    verdict, reason, p, se = limit_test(m.value if m.value is not None else math.nan, m.ci95, limit, upper,
                                        clusters, alpha)
    if not gated and verdict == FAIL:
        verdict = WORSE
    statistic = f"{m.metric} ({m.definition.split(';')[0]})" if m.definition else m.metric
    reason = f"{statistic}: {reason}{note}; noise: the run's own sampling error (interval over " \
             f"{'windows' if m.stage == 'ppl' else 'items' if m.stage == 'tasks' else 'samples'})"
    if not gated:
        reason = "reported, not gated: " + reason
    return Check(name, "limit", verdict, reason, stage=m.stage, task=m.task, variant=m.variant,
                 metric=m.metric, value=m.value, interval=m.ci95, limit=limit,
                 source=f"gates config: {source}", gated=gated, p_value=p if gated else None,
                 fallback=(INCONCLUSIVE, ""),
                 extra={"se": se, "clusters": clusters} if se is not None else {})


def ppl_checks(results: Results, variant: str, limits: dict, pattern: str, alpha: float = 0.01) -> list[Check]:
    out: list[Check] = []
    kld = results.find(stage="ppl", variant=variant, metric="kld_mean")
    ratio = results.find(stage="ppl", variant=variant, metric="ppl_ratio")
    if not kld:
        out.append(_skipped(results, "ppl", variant, "kld_mean", "kld_mean"))
    for m in kld:
        floor = results.get("ppl", m.task, "fp@noise", "kld_mean")
        note = ""
        if floor is not None and floor.extra.get("trivial"):
            note = f"; noise floor not measured ({results.run.get('dtype', 'the run')} is the reference precision)"
        elif floor is not None and floor.value is not None:
            note = f"; noise floor (fp {results.run.get('dtype', 'run dtype')} vs fp32) {fmt(floor.value)}"
            if m.value is not None and floor.value > 0:
                note += f", {m.value / floor.value:.3g}× smaller" if m.value >= floor.value \
                    else ", larger: the quantization error is below the dtype's own rounding noise"
        out.append(_limit_check(m, limits["kld_mean_max"], True, f"ppl/{m.task}/{variant}/kld_mean",
                                f"schemes.{pattern}.kld_mean_max", note, alpha=alpha))
    if not ratio:
        out.append(_skipped(results, "ppl", variant, "ppl_ratio", "ppl_ratio"))
    for m in ratio:
        out.append(_limit_check(m, limits["ppl_ratio_max"], True, f"ppl/{m.task}/{variant}/ppl_ratio",
                                f"schemes.{pattern}.ppl_ratio_max", alpha=alpha))
    for m in results.find(stage="ppl", variant=variant, metric="nonfinite_tokens"):
        bad = m.value is None or not math.isfinite(m.value) or m.value > 0
        out.append(Check(f"ppl/{m.task}/{variant}/nonfinite_tokens", "limit", FAIL if bad else PASS,
                         f"nonfinite_tokens (a count, exact: no sampling noise) {fmt(m.value)} tokens with NaN/inf "
                         f"logits (must be 0)", stage="ppl", task=m.task,
                         variant=variant, metric="nonfinite_tokens", value=m.value, limit=0.0, gated=True))
    return out


def _nonfinite_items(values: Any) -> int:
    """How many per-item values are not finite numbers (NaN or inf; null in a results file)."""
    if not isinstance(values, list):
        return 0
    return sum(1 for x in values if x is None or x in ("nan", "inf", "-inf")  # the strings: older files
               or (isinstance(x, float) and not math.isfinite(x)))


def nonfinite_item_checks(results: Results, variant: str) -> list[Check]:
    """A task whose per-item scores (fp's or the variant's) hold a NaN or inf cannot be judged on
    accuracy: INCOMPLETE, naming the task, the metric and the count (never a silent skip)."""
    out = []
    for task, entry in (results.details.get("tasks") or {}).items():
        vals = entry.get("values") if isinstance(entry, dict) else None
        if not isinstance(vals, dict):
            continue
        bad = [f"{k} of {len(items)} per-item {metric} values of {v}"
               for v in ("fp", variant) for metric, items in (vals.get(v) or {}).items()
               if (k := _nonfinite_items(items))]
        if bad:
            out.append(Check(f"tasks/{task}/{variant}/nonfinite_items", "limit", INCOMPLETE,
                             f"{task}: {'; '.join(bad)} are not finite (NaN or inf, null in the results file): "
                             f"its accuracy is not judged", stage="tasks", task=task, variant=variant))
    return out


def pooled_accuracy(results: Results, variant: str, reference: str = "fp") -> tuple[np.ndarray, np.ndarray] | None:
    """Per-item correctness (acc) of ``reference`` and ``variant`` over all tasks' items, in order."""
    a, b = [], []
    for entry in (results.details.get("tasks") or {}).values():
        vals = (entry or {}).get("values") or {} if isinstance(entry, dict) else {}
        ra, rb = (vals.get(reference) or {}).get("acc"), (vals.get(variant) or {}).get("acc")
        if ra is not None and rb is not None and len(ra) == len(rb) \
                and not _nonfinite_items(ra) and not _nonfinite_items(rb):  # those: nonfinite_item_checks
            a.append(np.asarray(ra, dtype=np.float64) > 0.5)
            b.append(np.asarray(rb, dtype=np.float64) > 0.5)
    if not a:
        return None
    return np.concatenate(a), np.concatenate(b)


def pooled_task_check(results: Results, variant: str, limits: dict, pattern: str, alpha: float) -> Check | None:
    """The primary accuracy test: acc(variant) - acc(fp) over all tasks' items, non-inferior to
    -max_acc_drop (Newcombe's paired interval; PASS only when all of it is above the limit)."""
    pooled = pooled_accuracy(results, variant)
    if pooled is None:
        return None
    a, b = pooled
    p, r2w, w2r = stats.mcnemar_exact(a, b)
    ci = stats.paired_proportion_diff_ci(a, b)
    tasks = sum(1 for e in (results.details.get("tasks") or {}).values()
                if isinstance(e, dict) and variant in (e.get("values") or {}))
    m = Metric(stage="tasks", task="pooled", variant=variant, metric="delta_acc", value=float(b.mean() - a.mean()),
               unit="fraction", n=int(a.size), higher_is_better=True, ci95=ci,
               definition=f"pooled acc(variant) - acc(fp) over all {a.size} items of {tasks} tasks, Newcombe paired "
                          f"interval")
    note = f"; flips right→wrong {r2w} / wrong→right {w2r}, McNemar exact p={fmt(p, 3)}"
    return _limit_check(m, -float(limits["max_acc_drop"]), False, f"tasks/pooled/{variant}/delta_acc",
                        f"schemes.{pattern}.max_acc_drop", note, gated=True, alpha=alpha, clusters=int(a.size))


def task_checks(results: Results, variant: str, limits: dict, pattern: str, alpha: float = 0.01) -> list[Check]:
    # accuracy, and a generative task's exact match (one per answer filter): the same paired records
    deltas = [m for m in results.find(stage="tasks", variant=variant)
              if m.metric == "delta_acc" or m.metric.startswith("delta_exact_match")]
    out = nonfinite_item_checks(results, variant)
    if not deltas:
        return out or [_skipped(results, "tasks", variant, "delta_acc", "delta_acc")]
    pooled = pooled_task_check(results, variant, limits, pattern, alpha)
    if pooled is not None:
        out.append(pooled)
    for m in deltas:
        suffix = "" if m.metric == "delta_acc" else "_" + m.metric[len("delta_"):]
        p = results.get("tasks", m.task, variant, "mcnemar_p" + suffix)
        r2w = results.get("tasks", m.task, variant, "flips_right_to_wrong" + suffix)
        w2r = results.get("tasks", m.task, variant, "flips_wrong_to_right" + suffix)
        note = f"; n={m.n}"
        if p is not None:
            note += f", McNemar exact p={fmt(p.value, 3)}"
        if r2w is not None and w2r is not None:
            note += f", flips right→wrong {fmt(r2w.value)} / wrong→right {fmt(w2r.value)}"
        # one task's items are few: reported; the pooled check above is the gated accuracy test
        out.append(_limit_check(m, -float(limits["max_acc_drop"]), False, f"tasks/{m.task}/{variant}/{m.metric}",
                                f"schemes.{pattern}.max_acc_drop", note, gated=pooled is None, alpha=alpha))
    return out


def layer_checks(results: Results, variant: str, limits: dict, pattern: str, views: list[str]) -> list[Check]:
    """Every quantized layer's weight and output SQNR against its floor; the worst layer is named."""
    default = float(limits["layer_sqnr_min_db"])
    name = f"layers/{variant}/sqnr"
    summary = layer_summary(results, variant, views, default)
    if summary is None:
        return [_skipped(results, "layers", variant, "output_sqnr_db", "sqnr")]
    worst = summary.worst
    under = summary.under
    total = len(summary.values)
    if under:
        shown = "; ".join(f"{k} ({summary.describe(k)})" for k in under[:3])
        more = f"; and {len(under) - 3} more" if len(under) > 3 else ""
        reason = f"{len(under)} of {total} layers below their SQNR floor, worst first: {shown}{more}"
    else:
        reason = f"all {total} layers at or above their SQNR floor; least headroom {worst}: {summary.describe(worst)}"
    worst_view = min(summary.values[worst], key=lambda v: summary.values[worst][v] - summary.floors[worst][v])
    reason = "reported, not gated (a minimum over layers is an extreme; its effect is gated through KLD): " + reason
    return [Check(name, "limit", WORSE if under else PASS, reason, stage="layers", task=worst, variant=variant, gated=False,
                  metric=worst_view, value=summary.values[worst][worst_view], limit=summary.floors[worst][worst_view],
                  source=f"layer records' floor_db (layers stage thresholds), else gates config: "
                         f"schemes.{pattern}.layer_sqnr_min_db",
                  extra={"worst": worst, "under": under})]


def block_checks(results: Results, variant: str) -> list[Check]:
    """Hidden-state SQNR after each block against its floor: where the error accumulates."""
    blocks = [(d, v, f) for d, v, f in block_sqnr(results, variant) if f is not None]
    if not blocks:
        return []
    under = [(d, v, f) for d, v, f in blocks if not (math.isfinite(v) and v >= f)]
    d, v, f = min(blocks, key=lambda b: b[1] - b[2] if math.isfinite(b[1]) else -math.inf)
    if under:
        reason = f"{len(under)} of {len(blocks)} blocks below their hidden-state SQNR floor: " + ", ".join(
            f"block.{b} {fmt(x, 3)} dB (floor {fmt(fl, 3)})" for b, x, fl in under[:5])
    else:
        reason = f"all {len(blocks)} blocks at or above their hidden-state SQNR floor; lowest block.{d} {fmt(v, 3)} dB (floor {fmt(f, 3)})"
    reason = "reported, not gated (an extreme over blocks): " + reason
    return [Check(f"layers/{variant}/hidden_sqnr", "limit", WORSE if under else PASS, reason, stage="layers", gated=False,
                  task=f"block.{d}", variant=variant, metric="hidden_sqnr_db", value=v, limit=f,
                  extra={"under": [f"block.{b}" for b, _, _ in under]})]


def coverage_words(c: dict, stay: str = "in floating point") -> str:
    """A ``run.quant_coverage`` entry in words: how many of the chosen layers were quantized, which
    shapes stayed ``stay`` (the dtype, where the caller knows it) and why, where known."""
    shapes = ", ".join(f"{n} of {k}" for k, n in (c.get("left_shapes") or {}).items())
    why = f": {c['why']}" if c.get("why") else ""
    return (f"quantized {c['quantized']} of the {c['chosen']} linear layers chosen; {c['left']} stay {stay} "
            f"({shapes}{why})")


def coverage_checks(results: Results, variant: str) -> list[Check]:
    """A handler that left some of the layers it was given as they were (``run.quant_coverage``,
    recorded by the quantize step): the variant's verdicts are for a partly quantized model, which
    its name does not say. Reported (WORSE), not gated: the measurements are true of that model."""
    c = (results.run.get("quant_coverage") or {}).get(variant)
    if not c:
        return []
    return [Check(f"quantize/{variant}/coverage", "limit", WORSE,
                  f"reported, not gated: the handler {coverage_words(c)}, so every verdict of "
                  f"{variant} is for that partly quantized model; --skip-layers makes the choice explicit",
                  stage="quantize", variant=variant, metric="fraction_quantized", value=c.get("fraction_quantized"),
                  limit=1.0, gated=False, extra={"left_examples": c.get("left_examples")})]


# Below this fraction of the measured copy bandwidth the fp decode is not memory-bound (a 135M model
# on an H100 decodes at ~9%; gpt-fast's 7B at ~70%), and the speed-up gate does not apply.
MEMORY_BOUND_FRACTION = 0.3


def speedup_interval(results: Results, m: Metric) -> list[float] | None:
    """95% interval of a speed-up: its own ci95 if recorded, else speedup × (1 ± 1.96·√(cv_q² + cv_fp²))
    from the two tokens/s records' coefficients of variation (first-order ratio error)."""
    if m.ci95 is not None:
        return m.ci95
    cvs = []
    for variant in ("fp", m.variant):
        tps = results.get("speed", m.task, variant, "tokens_per_s")
        if tps is None or tps.extra.get("cv") is None:
            return None
        cvs.append(float(tps.extra["cv"]))
    if m.value is None:
        return None
    rel = Z95 * math.sqrt(sum(c * c for c in cvs))
    return [m.value * (1 - rel), m.value * (1 + rel)]


def speed_checks(results: Results, variant: str, limits: dict, pattern: str, devices: list[str],
                 alpha: float = 0.01) -> list[Check]:
    wanted = limits.get("speedup_min") or {}
    out = []
    for task, minimum in wanted.items():
        m = results.get("speed", task, variant, "speedup")
        name = f"speed/{task}/{variant}/speedup"
        if m is None:
            out.append(_skipped(results, "speed", variant, "speedup", f"{task}/speedup"))
            out[-1].check, out[-1].task = name, task
            continue
        device = m.extra.get("device_type") or results.run.get("device", {}).get("type")
        if device not in devices:
            out.append(Check(name, "limit", SKIPPED, f"measured on {device}; speed-up is gated on {', '.join(devices)} only",
                             stage="speed", task=task, variant=variant, metric="speedup", value=m.value, limit=float(minimum)))
            continue
        fp_roofline = results.get("speed", task, "fp", "roofline_fraction")
        if fp_roofline is not None and fp_roofline.value is not None and fp_roofline.value < MEMORY_BOUND_FRACTION:
            # weight-only quantization saves bytes; it cannot speed up a decode that is not waiting on them
            out.append(Check(name, "limit", SKIPPED,
                             f"fp decode reaches only {fp_roofline.value:.0%} of copy bandwidth (< "
                             f"{MEMORY_BOUND_FRACTION:.0%}): launch/overhead-bound, so a speed-up from fewer weight "
                             f"bytes is not expected; measured {m.value:.3g}x",
                             stage="speed", task=task, variant=variant, metric="speedup", value=m.value,
                             limit=float(minimum)))
            continue
        m = Metric(**{**m.__dict__, "ci95": speedup_interval(results, m)})
        out.append(_limit_check(m, float(minimum), False, name, f"schemes.{pattern}.speedup_min.{task}", alpha=alpha))
    return out


def run_checks(results: Results) -> list[Check]:
    """The run itself: errors the stages recorded mean partial data (the checks they affect say so;
    non-finite logits fail their own check), so the run is INCOMPLETE, never PASSED."""
    if not results.errors:
        return [Check("run/errors", "run", PASS, "no stage recorded an error")]
    msgs = "; ".join(f"{e.get('stage')}{'/' + e['variant'] if e.get('variant') else ''}: {e.get('message')}"
                     for e in results.errors[:5])
    return [Check("run/errors", "run", INCOMPLETE, f"{len(results.errors)} stage error(s), data partial: {msgs}")]


def variant_limits(config: GateConfig, results: Results, variant: str) -> tuple[str, dict[str, Any]]:
    """``config.scheme`` for ``variant``, with the format its quantize step recorded
    (``run.quant_details[variant].limits_as``: a torchao config's, a recipe's default scheme)."""
    details = (results.run.get("quant_details") or {}).get(variant) or {}
    return config.scheme(variant, details.get("limits_as"))


def within_run_checks(results: Results, config: GateConfig) -> list[Check]:
    checks = run_checks(results)
    metrics = list(config.data["layer_metric"])
    for variant in quantized_variants(results):
        pattern, limits = variant_limits(config, results, variant)
        checks += ppl_checks(results, variant, limits, pattern, config.alpha)
        checks += task_checks(results, variant, limits, pattern, config.alpha)
        checks += generation_checks(results, variant, limits, pattern, config.alpha)
        checks += layer_checks(results, variant, limits, pattern, metrics)
        checks += block_checks(results, variant)
        checks += coverage_checks(results, variant)
        checks += speed_checks(results, variant, limits, pattern, list(config.data["speed_devices"]), config.alpha)
    return checks
