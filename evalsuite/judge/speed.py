"""Speed against a baseline: the paired speed-up (primary), and absolute tokens/s only where its
run-to-run spread was measured.

Absolute tokens/s moves between processes with clock, thermal and allocator state and with the other
variants timed in the same process (fp decode at 938 vs the baseline's 1058 tokens/s, -11%, on one
H200 with unchanged code); a run's own timed-sample CV knows nothing of that. Two statistics, each a
relative change against the baseline, one-sided against the floor ``speed/*`` (default 10%):

- ``speed/<task>/<scheme>/speedup``: scheme tokens/s / fp tokens/s measured in the same process,
  which cancels some machine state but not all: on one H200 its between-process sd was 4.7% for
  decode and 22% for a 512-token prefill of a 135M model, against within-run intervals of ~1%. So
  it too is gated only with a measured spread (se = within-run plus the between-process spread of
  ``benchmarks/bench_aa.py``); without one it is reported. A large within-run slowdown is still
  caught by the within-run ``speedup_min`` limit.
- ``speed/<task>/<variant>/tokens_per_s``: gated only where the noise calibration holds a measured
  between-process spread for that speed task (se = sqrt(within^2 + between^2)); otherwise reported.
"""

from __future__ import annotations

import math
from typing import Any

from evalsuite import stats
from evalsuite.judge.checks import FAIL, IMPROVED, INCONCLUSIVE, PASS, WITHIN_NOISE, WORSE, Z95, Check, fmt
from evalsuite.judge.noise import NoiseModel
from evalsuite.results import Metric

SPEED_STATISTICS = ("speedup", "tokens_per_s")
NO_CALIBRATION = "no run-to-run speed calibration (run benchmarks/bench_aa.py)"


def within_rel_se(m: Metric) -> float | None:
    """One run's relative uncertainty of a speed record: its 95% interval's half-width / value (the
    speed-up's bootstrap), else the timed samples' CV (the spread of one sample: deliberately wide)."""
    if not m.value:
        return None
    if m.ci95 is not None and len(m.ci95) == 2 and all(math.isfinite(x) for x in m.ci95):
        return abs(m.ci95[1] - m.ci95[0]) / (2 * Z95) / abs(m.value)
    cv = (m.extra or {}).get("cv")
    return abs(float(cv)) if isinstance(cv, (int, float)) and math.isfinite(cv) else None


def speed_check(name: str, b: Metric, c: Metric, noise: NoiseModel, floor: float, alpha: float,
                gate_allowed: bool, not_gated_why: str | None) -> Check:
    """The relative change c/b - 1 of a speed statistic against ``floor``: FAIL when significantly
    slower than the floor (one-sided), IMPROVED when significantly faster, WITHIN-NOISE beyond the
    floor but not significantly, PASS inside it. Ungated: FAIL reads WORSE, and a check that could
    not be judged for want of calibration is INCONCLUSIVE rather than PASS."""
    common = dict(stage=b.stage, task=b.task, variant=b.variant, metric=b.metric, baseline=b.value, value=c.value)
    key = f"speed/{b.task}/{b.variant}/{b.metric}_rel"
    what = ("scheme/fp tokens/s measured in the same process" if b.metric == "speedup"
            else "median tokens/s of timed samples, absolute")
    wb, wc = within_rel_se(b), within_rel_se(c)
    if wb is None and wc is None:
        return Check(name, "baseline", INCONCLUSIVE, f"{b.metric}: neither run recorded a timing spread; no "
                     f"uncertainty, no verdict", gated=False, **common)
    # one side without a spread: as noisy as the other
    within = math.sqrt(2) * (wb if wc is None else wc) if wb is None or wc is None else math.hypot(wb, wc)
    cal = noise.between_process(key)
    between_sd = float(cal["between_process_sd"]) if cal else 0.0
    df = int(cal["processes"]) - 1 if cal else None
    # the difference of two processes carries the between-process variance twice
    se = math.sqrt(within ** 2 + 2 * between_sd ** 2)
    rel = float(c.value) / float(b.value) - 1
    if not se > 0:
        return Check(name, "baseline", INCONCLUSIVE, f"{b.metric}: zero timing spread in both runs and no "
                     f"calibration; no uncertainty, no verdict", gated=False, **common)
    p = stats.one_sided_p(-rel - floor, se, df)
    p_better = stats.one_sided_p(rel - floor, se, df)
    if cal:
        source = (f"between-process sd {fmt(between_sd, 3)} of {cal['processes']} fresh processes from "
                  f"{noise.source}")
    else:
        source = NO_CALIBRATION
    gated = gate_allowed and cal is not None
    if gate_allowed and not gated:
        not_gated_why = NO_CALIBRATION
    if p < alpha:
        verdict, word = FAIL, "slower beyond the floor"
    elif p_better < alpha:
        verdict, word = IMPROVED, "faster beyond the floor"
    elif -rel > floor:
        verdict, word = WITHIN_NOISE, "slower than the floor but not significantly"
    else:
        verdict, word = PASS, "inside the floor"
    reason = (f"{b.metric} ({what}) vs baseline: {fmt(b.value)} → {fmt(c.value)} ({rel:+.2%}), {word}; "
              f"se {fmt(se, 3)} of the relative change = sqrt(within-run {fmt(within, 3)}^2 + 2 x between-process "
              f"{fmt(between_sd, 3)}^2) [noise: {source}; floor ±{floor:.0%}; one-sided p {fmt(p, 2)} that it is no "
              f"slower than the floor]")
    info: dict[str, Any] = dict(statistic=f"relative change of {b.metric}", unit="(fraction)", se=se, margin=floor,
                                df=df, clusters=int(cal["processes"]) if cal else None, within_rel_se=within,
                                between_process_sd=between_sd if cal else None,
                                noise=noise.source if cal else NO_CALIBRATION)
    if not gated:
        if verdict == FAIL:
            verdict = WORSE
        elif verdict in (PASS, WITHIN_NOISE) and not_gated_why == NO_CALIBRATION:
            verdict = INCONCLUSIVE  # not judged: never a PASS for a check that was not calibrated
        return Check(name, "baseline", verdict, f"reported, not gated ({not_gated_why}): {reason}", gated=False,
                     tolerance=floor, extra=info, **common)
    return Check(name, "baseline", verdict, reason, gated=True, p_value=p, tolerance=floor,
                 interval=[float(b.value) * (1 + rel - Z95 * se), float(b.value) * (1 + rel + Z95 * se)],
                 fallback=(WITHIN_NOISE, ""), extra=info, **common)
