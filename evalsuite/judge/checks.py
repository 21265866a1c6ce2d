"""A check is one gate's verdict on one number, with the reason in words and the numbers behind it.

Verdicts:

- ``PASS``          the number is on the good side of its limit, or moved less than its tolerance;
- ``FAIL``          it is beyond the limit (the whole 95% interval is), or it moved beyond its
                    tolerance in the bad direction;
- ``IMPROVED``      it moved beyond its tolerance in the good direction: reported, and failing
                    when the gate is strict (a jump is as suspicious as a drop);
- ``WITHIN-NOISE``  the run cannot tell: the 95% interval straddles the limit, or the change is
                    larger than the fixed floor but inside the run's own noise;
- ``INCONCLUSIVE``  the check cannot resolve its limit: the interval straddles it, the sample is one
                    window or one item, or the baseline holds no per-item data to pair with;
- ``WORSE``         a reported (not gated) number moved beyond its tolerance in the bad direction;
- ``SKIPPED``       the stage was not run, or the data to judge are missing or not comparable;
- ``INVALID``       the results file contradicts itself (a record outside its own interval, a
                    record that its details re-derive otherwise): nothing in it is judged, exit 5;
- ``INCOMPLETE``    the run did not check what it was asked to (interrupted, killed, a stage or task
                    without records, a baseline with nothing comparable, a NaN in the data a check
                    needs): no verdict, exit 4 (1 under ``--strict``); see ``completeness``.

Exit codes of every command: 0 passed, 1 a regression, 2 a usage or input error, 3 an internal
error, 4 INCOMPLETE, 5 INVALID (and 128+N when ended by signal N).

Only *gated* checks fail a run: a small, stated set of primary statistics that each have an
uncertainty (``p_value``), held together to a family-wise false-alarm budget (``alpha``, default 1%)
by Holm's step-down procedure in ``finalize``. Everything else is reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from evalsuite.results.verdicts import (  # noqa: F401  (the vocabulary, exit codes and GateResult, re-exported)
    EXIT_INCOMPLETE, EXIT_INTERNAL, EXIT_INVALID, EXIT_PASSED, EXIT_REGRESSION, EXIT_USAGE, FAIL, IMPROVED,
    INCOMPLETE, INCONCLUSIVE, INVALID, PASS, SKIPPED, VERDICTS, WITHIN_NOISE, WORSE, GateResult, exit_code, fmt,
)

DEFAULT_ALPHA = 0.01  # per-run family-wise false-alarm budget of the gated checks
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class Check:
    """One gate applied to one metric. ``kind`` is ``limit`` (quantized vs fp within the run),
    ``baseline`` (this run vs a stored baseline) or ``run`` (the run itself, e.g. its errors)."""

    check: str
    kind: str
    verdict: str
    reason: str
    stage: str | None = None
    task: str | None = None
    variant: str | None = None
    metric: str | None = None
    value: float | None = None
    interval: list[float] | None = None
    limit: float | None = None
    baseline: float | None = None
    tolerance: float | None = None
    failing: bool = False
    command: str | None = None   # the exact command that accepts the new values as the baseline
    source: str | None = None    # where a limit comes from (a gates-config key)
    extra: dict[str, Any] = field(default_factory=dict)
    # True: a primary check, may fail the run (through Holm, see finalize); False: reported only;
    # None (checks made elsewhere, e.g. completeness): fails the run on FAIL, outside the Holm family
    gated: bool | None = None
    p_value: float | None = None  # one-sided p of "no worse than the limit/margin"; gated checks have one
    # the verdict and reason the check falls back to when Holm does not reject it
    fallback: tuple[str, str] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("fallback", None)
        for k in ("value", "limit", "baseline", "tolerance", "p_value"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = str(d[k])
        if d["interval"] is not None:
            d["interval"] = [x if math.isfinite(x) else str(x) for x in d["interval"]]
        d["extra"] = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d["extra"].items()}
        return {k: v for k, v in d.items() if v is not None and v != {}}


def finalize(checks: list[Check], strict: bool, alpha: float = DEFAULT_ALPHA) -> list[Check]:
    """Mark which checks fail the run. Gated checks with a p-value form one family: Holm at ``alpha``
    decides which FAILs stand (the others fall back to their ``fallback`` verdict); a gated check
    without a p-value is exact (a count of NaN tokens) and fails on its own. IMPROVED fails when
    ``strict``, and so does INCOMPLETE (a check made outside the family). Ungated checks never fail the run."""
    from evalsuite.stats import holm_reject

    family = [c for c in checks if c.gated and c.p_value is not None]
    rejected = holm_reject([c.p_value for c in family], alpha)
    for c, r in zip(family, rejected):
        c.extra["family"] = f"Holm over {len(family)} gated checks at family-wise alpha {alpha:g}"
        if c.verdict == FAIL and not r:
            c.verdict, tail = c.fallback or (WITHIN_NOISE, "")
            c.reason += f"; not significant after Holm over {len(family)} gated checks (alpha {alpha:g}){tail}"
    for c in checks:
        if c.gated is None:
            c.failing = c.verdict in (FAIL, INVALID) or (strict and c.verdict in (IMPROVED, INCOMPLETE))
        else:
            c.failing = c.gated and (c.verdict == FAIL or (strict and c.verdict == IMPROVED))
    return checks


def limit_verdict(value: float, interval: list[float] | None, limit: float, upper: bool,
                  clusters: int | None = None, alpha: float = DEFAULT_ALPHA) -> tuple[str, str]:
    """Judge ``value`` against ``limit`` (``upper``: must be ≤ limit; else ≥ limit); see ``limit_test``."""
    verdict, reason, _p, _se = limit_test(value, interval, limit, upper, clusters, alpha)
    return verdict, reason


def limit_test(value: float, interval: list[float] | None, limit: float, upper: bool,
               clusters: int | None = None, alpha: float = DEFAULT_ALPHA) -> tuple[str, str, float | None, float | None]:
    """Non-inferiority against a limit on a 95% interval: PASS only when all of it is on the good
    side; FAIL when the one-sided test that the value is on the good side rejects at ``alpha``
    (Holm may still overrule it, see ``finalize``); otherwise INCONCLUSIVE: the run cannot resolve
    its limit. No interval, a zero-width one or fewer than 2 clusters: INCONCLUSIVE.

    Returns (verdict, reason, one-sided p-value or None, standard error or None)."""
    from evalsuite.stats import one_sided_p

    op, bad_op = ("≤", ">") if upper else ("≥", "<")

    def good(x: float) -> bool:
        return x <= limit if upper else x >= limit

    if not math.isfinite(value):
        return FAIL, f"value {fmt(value)} is not finite (a NaN or inf in its per-window or per-item data)", 0.0, None
    if interval is not None and not all(x is not None and math.isfinite(x) for x in interval):
        return INCOMPLETE, (f"{fmt(value)}, but its 95% interval [{', '.join(fmt(x) for x in interval)}] is not "
                            f"finite (a NaN or inf in its per-window or per-item data): not judged"), None, None
    if interval is None:
        side = op if good(value) else bad_op
        return INCONCLUSIVE, f"{fmt(value)} {side} limit {fmt(limit)}, but no interval recorded: no uncertainty, no verdict", None, None
    lo, hi = sorted(interval)
    if hi - lo <= 0 or (clusters is not None and clusters < 2):
        return INCONCLUSIVE, (f"{fmt(value)}, 95% CI [{fmt(lo)}, {fmt(hi)}] from "
                              f"{clusters if clusters is not None else 'too few'} window(s)/item(s): no uncertainty, "
                              f"no verdict"), None, None
    se = (hi - lo) / (2 * Z95)
    excess = (value - limit) if upper else (limit - value)
    p = one_sided_p(excess, se)
    ci = f"95% CI [{fmt(lo)}, {fmt(hi)}]"
    if good(lo) and good(hi) and good(value):  # a value beyond its own interval is no PASS either
        return PASS, f"{fmt(value)}, {ci} entirely {op} limit {fmt(limit)}", p, se
    if p < alpha:
        return FAIL, f"{fmt(value)}, {ci}: {bad_op} limit {fmt(limit)} (one-sided p {fmt(p, 2)})", p, se
    if not good(lo) and not good(hi):
        return INCONCLUSIVE, (f"{fmt(value)}, {ci} entirely {bad_op} limit {fmt(limit)}, but not significantly at "
                              f"alpha {alpha:g} (one-sided p {fmt(p, 2)}): the sample is too small to tell"), p, se
    side = "inside" if good(value) else "beyond"
    return INCONCLUSIVE, (f"{fmt(value)} is {side} limit {fmt(limit)} but its {ci} contains the limit "
                          f"(one-sided p {fmt(p, 2)}): the sample is too small to tell"), p, se


def metric_stderr(m) -> float | None:
    """``stderr_of`` a results record, its timing spread taken from ``extra["cv"]``."""
    cv = m.extra.get("cv") if m.extra else None
    return stderr_of(m.value, m.stderr, m.ci95, float(cv) if isinstance(cv, (int, float)) else None)


def stderr_of(value: float | None, stderr: float | None, ci95: list[float] | None, cv: float | None) -> float | None:
    """One standard error of a recorded number: its ``stderr``; else its 95% interval's half-width
    / 1.96; else, for timings, ``cv × value`` (the spread of single samples, deliberately wide
    because run-to-run variation on a GPU exceeds the within-run spread)."""
    if stderr is not None and math.isfinite(stderr):
        return abs(stderr)
    if ci95 is not None and len(ci95) == 2 and all(math.isfinite(x) for x in ci95):
        return abs(ci95[1] - ci95[0]) / (2 * Z95)
    if cv is not None and value is not None and math.isfinite(cv) and math.isfinite(value):
        return abs(cv * value)
    return None


def drift_verdict(
    base: float,
    cand: float,
    se: float | None,
    sigma: float,
    floor: float,
    higher_is_better: bool,
) -> tuple[str, str, float]:
    """Judge a move from ``base`` to ``cand``. ``se`` is the standard error of the difference
    (None when neither side recorded one), ``floor`` the smallest change worth flagging.

    Tolerance = max(sigma × se, floor). |Δ| ≤ floor → PASS; floor < |Δ| ≤ tolerance → WITHIN-NOISE;
    beyond tolerance → FAIL in the bad direction, IMPROVED in the good one.
    Returns (verdict, reason, tolerance).
    """
    if not (math.isfinite(base) and math.isfinite(cand)):
        return _nonfinite_verdict(base, cand, higher_is_better) + (math.nan,)
    diff = cand - base
    noise = sigma * se if se is not None else 0.0
    tol = max(noise, floor)
    rel = f" ({diff / base:+.2%})" if base not in (0, 0.0) and math.isfinite(base) else ""
    moved = f"{fmt(base)} → {fmt(cand)}, Δ {diff:+.4g}{rel}"
    basis = f"{sigma:g}σ = {fmt(noise)} (σ from stderr/CI/CV of both runs)" if se is not None else "no uncertainty recorded"
    if abs(diff) <= floor:
        return PASS, f"{moved}: within the floor ±{fmt(floor)}", tol
    if abs(diff) <= tol:
        return WITHIN_NOISE, f"{moved}: beyond the floor ±{fmt(floor)} but inside the noise, {basis}", tol
    worse = diff < 0 if higher_is_better else diff > 0
    verdict = FAIL if worse else IMPROVED
    word = "worse" if worse else "better"
    return verdict, f"{moved}: {word} beyond tolerance ±{fmt(tol)} [{basis}; floor {fmt(floor)}]", tol


def _nonfinite_verdict(base: float, cand: float, higher_is_better: bool) -> tuple[str, str]:
    """NaN or infinite values (an exact layer has infinite SQNR): order them, never subtract them."""
    moved = f"{fmt(base)} → {fmt(cand)}"
    if base == cand:
        return PASS, f"{moved}: unchanged"
    if math.isnan(cand):
        return FAIL, f"{moved}: candidate value is not a number"
    if math.isnan(base):
        return SKIPPED, f"{moved}: baseline value is not a number"
    worse = cand < base if higher_is_better else cand > base
    return (FAIL, f"{moved}: worse") if worse else (IMPROVED, f"{moved}: better")
