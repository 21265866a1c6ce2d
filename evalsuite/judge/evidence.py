"""A results file is evidence, checked before it is judged: every number the gates read must agree
with the file's own invariants and, where the file holds the data behind it, with that data.

Three kinds of check, each a ``Check`` of kind ``run`` (see docs/gate-trust.md):

- schema invariants of every record: a finite 95% interval with low ≤ high and the value inside it,
  ``n`` ≥ 1 where a statistic has a sample, no two records with one key, values in their metric's
  domain (KLD ≥ 0, perplexities ≥ 1, fractions and p-values in [0, 1], ratios > 0, counts ≥ 0);
- re-derivation: the ppl and tasks stages keep per-window sums and per-item values in ``details``;
  every record computed from them (kld_mean, ppl_ratio, token_ppl, acc, delta_acc, ...) is computed
  again and must agree within float rounding (its interval, re-derived by the same bootstrap, within
  ``CI_TOLERANCE`` of its width: the Monte Carlo error of 2000 replicates is ~2%, and a file made with
  another seed or numpy stays valid). Such a record without its details is not evidence;
- every scheme of ``run.schemes`` has the gated records of every finished stage (ppl: kld_mean,
  ppl_ratio, nonfinite_tokens; tasks: the paired delta of each task's accuracy).

A contradiction is ``INVALID`` (exit 5: nothing in the file is judged), a gap ``INCOMPLETE``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import numpy as np

from evalsuite import stats
from evalsuite.judge.checks import INCOMPLETE, INVALID, PASS, Check, fmt
from evalsuite.results import Metric, Results

REL_TOL = 1e-9  # float rounding: the same sums added in the same order agree to the last bits
CI_TOLERANCE = 0.25  # a re-derived interval bound may differ by this fraction of its width
SHOWN = 5  # contradictions named in one check's reason; the rest are counted


def _close(a: float, b: float, scale: float = 0.0) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=REL_TOL * scale + 1e-300)


def _slack(*xs: float) -> float:
    return REL_TOL * max((abs(x) for x in xs if math.isfinite(x)), default=0.0) + 1e-300


def _name(m: Metric) -> str:
    return f"{m.stage}/{m.task}/{m.variant}/{m.metric}"


# ---- schema invariants -----------------------------------------------------------------------

def _domain(m: Metric) -> tuple[float, float, bool, str] | None:
    """(low, high, whether low is open, words) of the values ``m`` can take, or None where no bound is known."""
    unit, metric = m.unit, m.metric
    if metric.startswith("kld") and unit == "nats":
        return 0.0, math.inf, False, "a KL divergence is ≥ 0"
    if unit in ("ppl", "perplexity"):
        return 1.0, math.inf, False, "a perplexity is ≥ 1"
    if unit == "p-value":
        return 0.0, 1.0, False, "a p-value is in [0, 1]"
    if metric == "roofline_fraction":  # a ratio of two measured bandwidths, unit "fraction" in older files
        return 0.0, math.inf, True, "a ratio of two measured bandwidths is > 0"
    if unit in ("fraction", "probability"):
        if metric.startswith("delta_") and not metric.endswith("_rms"):
            return -1.0, 1.0, False, "a difference of fractions is in [-1, 1]"
        return 0.0, 1.0, False, "a fraction is in [0, 1]"
    if unit in ("ratio", "x"):
        return 0.0, math.inf, True, "a ratio is > 0"
    if unit in ("tokens", "items"):
        return 0.0, math.inf, False, "a count is ≥ 0"
    return None


def schema_problems(results: Results) -> list[str]:
    """One line per record that contradicts itself."""
    out: list[str] = []
    dup = [k for k, c in Counter(m.key for m in results.records).items() if c > 1]
    out += [f"{'/'.join(k)}: {Counter(m.key for m in results.records)[k]} records with one key (which is meant?)"
            for k in dup]
    for m in results.records:
        name, v = _name(m), m.value
        if not isinstance(m.n, int) or isinstance(m.n, bool) or m.n < 0 or (m.n < 1 and v is not None and m.ci95):
            out.append(f"{name}: n = {m.n!r}, a statistic with an interval needs n ≥ 1")
        dom = _domain(m)
        if v is not None and dom is not None:
            lo, hi, open_lo, words = dom
            s = _slack(lo, hi, v) + (1e-12 if lo == 1.0 else 0.0)  # exp(-tiny NLL rounding) may dip below 1
            if math.isnan(v) or (math.isinf(v) and v != hi) or v < lo - s or v > hi + s or (open_lo and v <= lo):
                out.append(f"{name}: value {fmt(v)} outside its domain ({words})")
        if m.ci95 is not None:
            ci = m.ci95
            if len(ci) != 2 or not all(math.isfinite(x) for x in ci):
                out.append(f"{name}: ci95 {ci} is not two finite numbers")
                continue
            lo, hi = ci
            if lo > hi:
                out.append(f"{name}: ci95 [{fmt(lo)}, {fmt(hi)}] has low > high")
            elif v is not None and math.isfinite(v):
                s = _slack(lo, hi, v)
                if not lo - s <= v <= hi + s:
                    out.append(f"{name}: value {fmt(v)} outside its own 95% CI [{fmt(lo)}, {fmt(hi)}]")
        if m.stderr is not None and (math.isinf(m.stderr) or m.stderr < 0):  # nan: none (one item)
            out.append(f"{name}: stderr {fmt(m.stderr)} is not a number ≥ 0")
    return out


# ---- re-derivation from details --------------------------------------------------------------

def _ratio_ci(num: np.ndarray, den: np.ndarray, seed: int, f: Callable = lambda r: r) -> list[float] | None:
    """As the ppl stage computes it (evalsuite.measure.perplexity._ratio_ci)."""
    if den.sum() <= 0:
        return None
    return stats.percentile_ci(f(stats.bootstrap_ratio_of_sums(num, den, seed=seed)))


class _Expect:
    """What the details say each record must be: value, n, and (optionally) ci95 and stderr."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.missing: dict[tuple[str, str, str, str], str] = {}

    def add(self, key, value, n=None, ci=None, stderr=None):
        self.by_key[key] = {"value": value, "n": n, "ci": ci, "stderr": stderr}


def _arrays(entry: dict, *names: str) -> list[np.ndarray] | None:
    try:
        out = [np.asarray(entry[k], dtype=np.float64) for k in names]
    except (KeyError, TypeError, ValueError):
        return None
    if any(a.ndim != 1 for a in out) or len({a.size for a in out}) != 1:
        return None
    return out


PPL_VARIANT_METRICS = ("token_ppl", "nll_mean", "word_ppl", "bits_per_byte", "nonfinite_tokens")
PPL_PAIRED_METRICS = ("kld_mean", "kld_top1pct_mean", "delta_p_mean", "delta_p_rms", "same_top1", "ppl_ratio",
                      "ln_ppl_ratio", "nonfinite_tokens")
CI_CHECKED = ("token_ppl", "kld_mean", "ppl_ratio")  # intervals re-derived (the within-run limits read them)


def _ppl_expect(results: Results, seed: int, exp: _Expect) -> None:
    det = results.details.get("ppl")
    det = det if isinstance(det, dict) else {}
    task = det.get("task")
    windows = det.get("windows") if isinstance(det.get("windows"), dict) else {}
    for m in results.find(stage="ppl"):
        # a scheme has both: its own token_ppl (details.variants) and its pair with fp (details.paired);
        # nonfinite_tokens of both has one key, and the pair's, written last, is the one kept
        paired = m.variant != "fp" and m.metric in PPL_PAIRED_METRICS
        if not paired and m.metric not in PPL_VARIANT_METRICS:
            continue
        if m.extra.get("trivial"):
            continue  # fp@noise in float32: zero by construction, no details
        entry = (det.get("paired") if paired else det.get("variants")) or {}
        entry = entry.get(m.variant) if isinstance(entry, dict) else None
        if m.task != task or not isinstance(entry, dict):
            exp.missing[m.key] = f"details.ppl.{'paired' if paired else 'variants'}.{m.variant} (task {task})"
            continue
        ci_ok = "@" not in m.variant  # a derived variant may cover a subsample with its own interval rule
        if not paired:
            arrs = _arrays(entry, "nll_sum", "n_finite")
            if arrs is None:
                exp.missing[m.key] = f"details.ppl.variants.{m.variant}.nll_sum/n_finite"
                continue
            nll, n = arrs
            tokens = n.sum()
            if m.metric == "nonfinite_tokens":  # recorded n = scored + non-finite tokens
                exp.add(m.key, None if m.n is None else float(m.n - tokens), n=None)
            elif m.metric in ("token_ppl", "nll_mean"):
                f = np.exp if m.metric == "token_ppl" else (lambda r: r)
                exp.add(m.key, float(f(float(nll.sum()) / tokens)) if tokens > 0 else None, int(tokens),
                        _ratio_ci(nll, n, seed, f) if ci_ok and m.metric in CI_CHECKED else None)
            else:
                den_name = "n_words" if m.metric == "word_ppl" else "n_bytes"
                den = _arrays(windows, den_name)
                if den is None or den[0].size != nll.size:
                    continue  # not kept by every version: checked for consistency only
                den = den[0]
                value = (math.exp(float(nll.sum()) / den.sum()) if m.metric == "word_ppl"
                         else float(nll.sum()) / den.sum() / math.log(2)) if tokens > 0 and den.sum() > 0 else None
                exp.add(m.key, value, int(den.sum()))
            continue
        arrs = _arrays(entry, "n")
        if arrs is None:
            exp.missing[m.key] = f"details.ppl.paired.{m.variant}.n"
            continue
        n = arrs[0]
        tokens = n.sum()
        sums = {"kld_mean": "kld_sum", "delta_p_mean": "delta_p_sum", "delta_p_rms": "delta_p_sq_sum",
                "same_top1": "same_top1"}
        if m.metric == "nonfinite_tokens":
            exp.add(m.key, None if m.n is None else float(m.n - tokens))
        elif m.metric in sums:
            a = _arrays(entry, sums[m.metric])
            if a is None or a[0].size != n.size:
                exp.missing[m.key] = f"details.ppl.paired.{m.variant}.{sums[m.metric]}"
                continue
            f = np.sqrt if m.metric == "delta_p_rms" else (lambda r: r)
            value = float(f(float(a[0].sum()) / tokens)) if tokens > 0 else None
            exp.add(m.key, value, int(tokens), _ratio_ci(a[0], n, seed) if ci_ok and m.metric in CI_CHECKED else None)
        elif m.metric == "kld_top1pct_mean":
            a = _arrays(entry, "kld_top1pct_sum", "kld_top1pct_n")
            if a is None:
                exp.missing[m.key] = f"details.ppl.paired.{m.variant}.kld_top1pct_sum/n"
                continue
            exp.add(m.key, float(a[0].sum() / a[1].sum()) if a[1].sum() > 0 else None, int(a[1].sum()))
        else:  # ppl_ratio, ln_ppl_ratio: candidate minus reference NLL on the same tokens
            a = _arrays(entry, "nll_ref_sum", "nll_sum")
            if a is None or a[0].size != n.size:
                exp.missing[m.key] = f"details.ppl.paired.{m.variant}.nll_ref_sum/nll_sum"
                continue
            ref, cand = a
            ln = (float(cand.sum()) - float(ref.sum())) / tokens if tokens > 0 else None
            ci = None
            if ci_ok and m.metric == "ppl_ratio" and tokens > 0:
                reps = stats.bootstrap_ratio_of_sums(np.stack([ref, cand], axis=1), n, seed=seed)
                ci = stats.percentile_ci(np.exp(reps[:, 1] - reps[:, 0]))
            exp.add(m.key, (math.exp(ln) if ln is not None else None) if m.metric == "ppl_ratio" else ln,
                    int(tokens), ci)


def _binary(a: np.ndarray) -> bool:
    return bool(np.all((a == 0.0) | (a == 1.0)))


def _paired_metric(metric: str) -> str | None:
    """``delta_acc`` → ``acc``; ``flips_right_to_wrong_exact_match_x`` → ``exact_match_x`` (tasks.paired_names)."""
    for prefix in ("delta_", "mcnemar_p", "flips_right_to_wrong", "flips_wrong_to_right"):
        if metric.startswith(prefix):
            rest = metric[len(prefix):].lstrip("_")
            return rest or "acc"
    return None


def _tasks_expect(results: Results, exp: _Expect) -> None:
    det = results.details.get("tasks")
    det = det if isinstance(det, dict) else {}
    for m in results.find(stage="tasks"):
        base = _paired_metric(m.metric)
        if base is None and not (m.metric == "acc" or m.metric == "acc_norm" or m.metric.startswith("exact_match")):
            continue  # other lm-eval aggregations: checked for consistency only
        entry = det.get(m.task)
        values = entry.get("values") if isinstance(entry, dict) else None
        if not isinstance(values, dict):
            exp.missing[m.key] = f"details.tasks.{m.task}.values"
            continue
        want = [(m.variant, base or m.metric)] + ([("fp", base)] if base else [])
        arrs = []
        for variant, metric in want:
            v = values.get(variant)
            a = _arrays(v, metric) if isinstance(v, dict) else None
            if a is None:
                exp.missing[m.key] = f"details.tasks.{m.task}.values.{variant}.{metric}"
                break
            arrs.append(a[0])
        if len(arrs) != len(want):
            continue
        if base is None:
            x = arrs[0]
            if not _binary(x):
                continue  # a non-binary per-item mean: lm-eval's aggregation may differ; consistency only
            mean, se = stats.mean_stderr(x)
            exp.add(m.key, mean, int(x.size), stderr=None if math.isnan(se) else se)
            continue
        b, a = arrs
        if a.size != b.size or not (_binary(a) and _binary(b)):
            exp.missing[m.key] = f"details.tasks.{m.task}.values (fp and {m.variant} {base} unpaired)"
            continue
        p, r2w, w2r = stats.mcnemar_exact(a > 0.5, b > 0.5)
        value = {"delta_": float(b.mean() - a.mean()), "mcnemar_p": p, "flips_right_to_wrong": float(r2w),
                 "flips_wrong_to_right": float(w2r)}
        exp.add(m.key, next(v for k, v in value.items() if m.metric.startswith(k)), int(a.size))


def rederive(results: Results) -> _Expect:
    """What the details say each record they back must be (``by_key``: value, n, ci, stderr), and
    the records whose details are missing (``missing``)."""
    exp = _Expect()
    _ppl_expect(results, int(results.run.get("seed") or 0), exp)
    _tasks_expect(results, exp)
    return exp


def derivation_problems(results: Results) -> tuple[list[str], int]:
    """Lines naming each record that its details contradict or that lacks them; and how many
    records were re-derived."""
    exp = rederive(results)
    out = [f"{'/'.join(k)}: recorded, but its details ({where}) are missing: not evidence"
           for k, where in exp.missing.items()]
    for m in results.records:
        want = exp.by_key.get(m.key)
        if want is None:
            continue
        name, v = _name(m), m.value
        wv = want["value"]
        if (v is None) != (wv is None) or (v is not None and not (
                (math.isnan(v) and math.isnan(wv)) or _close(v, wv))):
            out.append(f"{name}: recorded {fmt(v)}, its details give {fmt(wv, 10)}")
            continue
        if want["n"] is not None and m.n != want["n"]:
            out.append(f"{name}: recorded n = {m.n}, its details hold {want['n']}")
        if want["stderr"] is not None and (m.stderr is None or not _close(m.stderr, want["stderr"])):
            out.append(f"{name}: recorded stderr {fmt(m.stderr)}, its details give {fmt(want['stderr'], 10)}")
        ci = want["ci"]
        if ci is not None and (m.ci95 is None or len(m.ci95) != 2):
            out.append(f"{name}: no 95% CI recorded, its details give [{fmt(ci[0])}, {fmt(ci[1])}]")
        elif ci is not None and all(math.isfinite(x) for x in m.ci95):
            tol = CI_TOLERANCE * (ci[1] - ci[0]) + _slack(*ci)
            if abs(m.ci95[0] - ci[0]) > tol or abs(m.ci95[1] - ci[1]) > tol:
                out.append(f"{name}: recorded 95% CI [{fmt(m.ci95[0])}, {fmt(m.ci95[1])}], its details give "
                           f"[{fmt(ci[0])}, {fmt(ci[1])}] (a bootstrap re-run agrees within {CI_TOLERANCE:.0%} of its width)")
    return out, len(exp.by_key)


# ---- every scheme's gated records ------------------------------------------------------------

def gap_problems(results: Results) -> list[str]:
    """One line per scheme × finished stage without its gated records."""
    from evalsuite.judge.completeness import stages_finished

    finished = set(stages_finished(results))
    out = []
    schemes = [s for s in results.run.get("schemes") or [] if isinstance(s, str)]
    fp_tasks = results.find(stage="tasks", variant="fp")
    for variant in schemes:
        if "ppl" in finished:
            for metric in ("kld_mean", "ppl_ratio", "nonfinite_tokens"):
                if not results.find(stage="ppl", variant=variant, metric=metric):
                    out.append(f"ppl/{variant}: no {metric} record (the stage finished; its gated record is missing)")
        if "tasks" in finished:
            for task in dict.fromkeys([*(results.run.get("tasks_requested") or []), *(m.task for m in fp_tasks)]):
                mine = results.find(stage="tasks", task=task, variant=variant)
                if not mine and results.find(stage="tasks", task=task):
                    out.append(f"tasks/{task}/{variant}: no record (the stage finished; fp has records)")
                    continue
                for fp in results.find(stage="tasks", task=task, variant="fp"):
                    paired = fp.metric == "acc" or fp.metric.startswith("exact_match")
                    if paired and fp.unit == "fraction" and not results.get("tasks", task, variant, f"delta_{fp.metric}"):
                        out.append(f"tasks/{task}/{variant}: no delta_{fp.metric} record (fp has {fp.metric})")
    return out


def _check(name: str, verdict: str, problems: list[str], what: str) -> Check:
    shown = "; ".join(problems[:SHOWN]) + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
    return Check(f"evidence/{name}", "run", verdict, f"{what}: {shown}", extra={"problems": problems})


def evidence_checks(results: Results) -> list[Check]:
    """The checks of a results file as evidence: INVALID ones (nothing in the file is to be judged),
    INCOMPLETE ones (a scheme without its gated records), or one PASS saying what was verified."""
    out = []
    schema = schema_problems(results)
    derived, n = derivation_problems(results)
    if schema:
        out.append(_check("records", INVALID, schema, f"{len(schema)} record(s) contradict themselves"))
    if derived:
        out.append(_check("details", INVALID, derived, f"{len(derived)} record(s) not backed by their details"))
    gaps = gap_problems(results)
    if gaps:
        out.append(_check("gated", INCOMPLETE, gaps, f"{len(gaps)} gated record(s) missing"))
    if not out:
        out.append(Check("evidence/results", "run", PASS,
                         f"every record consistent with itself; {n} re-derived from the file's details"))
    return out


def invalid(checks: list[Check]) -> bool:
    return any(c.verdict == INVALID for c in checks)
