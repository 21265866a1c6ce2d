"""Stage 4 of the pipeline: judge. Gates turn results into verdicts; no model, no torch.

Two kinds of gate: within a run, each quantized variant against the fp reference measured beside
it (``within``); across runs, this run against a stored baseline (``baseline``, paired window by
window and item by item in ``paired``, with margins from the measured run-to-run noise in
``noise``). Every check knows its noise. Only a small set of primary checks gates, together held to
a family-wise false-alarm budget (Holm, ``--alpha``, default 1%); the rest is reported:

- within a run, per scheme: ``ppl/*/<scheme>/kld_mean`` and ``ppl_ratio`` against their limits,
  ``tasks/pooled/<scheme>/delta_acc`` (non-inferiority over all tasks' items), ``nonfinite_tokens``
  (exact), and the decode speed-up on a GPU where the decode is memory-bound;
- against a baseline, per variant: the paired statistics of ``evalsuite.judge.paired`` and, on a
  GPU of the same card and kernels, the speed-up (``evalsuite.judge.speed``), plus absolute
  ``tokens_per_s`` where ``benchmarks/bench_aa.py`` measured its between-process spread.

A within-run limit that the variant's own baseline already misses (a scheme known to be lossy on
this model) is reported, not gated: that variant is gated on regression from its baseline instead.
"""

from __future__ import annotations

from pathlib import Path

from evalsuite.judge.baseline import DEFAULT_DIR, Baseline, baseline_checks, find_baselines, load_baselines
from evalsuite.judge.checks import PASS, SKIPPED, Check, exit_code, finalize  # noqa: F401  (exit_code re-exported)
from evalsuite.judge.completeness import completeness_checks
from evalsuite.judge.config import GateConfig, load_gate_config  # noqa: F401  (re-exported)
from evalsuite.judge.evidence import evidence_checks, invalid
from evalsuite.judge.within import within_run_checks
from evalsuite.results import Results

DEFAULT_HISTORY = Path("reports") / "history.sqlite"


def judge(results: Results, config: GateConfig, baselines: list[Baseline] | None = None,
          results_path: str | Path | None = None, baseline_dir: Path | None = None,
          extra_checks: list[Check] | None = None, baseline_requested: bool = False) -> list[Check]:
    """All checks of one results file: within-run limits, then each baseline's metrics, then
    whether the run checked all it was asked to (``completeness``). A file that fails as evidence
    (``evidence``: it contradicts itself or its details) is not judged: its INVALID checks alone."""
    evidence = evidence_checks(results)
    if invalid(evidence):
        return finalize(evidence, config.strict, config.alpha)
    checks = [c for c in evidence if c.verdict != PASS] + within_run_checks(results, config)
    known_lossy(checks, baselines or [])
    for b in baselines or []:
        checks += baseline_checks(results, b, config, results_path=results_path, directory=baseline_dir)
    checks += extra_checks or []
    checks += completeness_checks(results, checks, baseline_requested=baseline_requested)
    checks += [c for c in evidence if c.verdict == PASS]
    finalize(checks, config.strict, config.alpha)
    state_power(checks, config.alpha)
    mark_not_requested(results, checks)
    return checks


def mark_not_requested(results: Results, checks: list[Check]) -> None:
    """Tag the SKIPPED checks of stages the run was not asked for (``extra.stage_not_requested``):
    the terminal counts them in one line; results.json and the reports keep each."""
    stages = results.run.get("stages")
    if stages is None:
        return
    for c in checks:
        if c.verdict == SKIPPED and c.stage and c.stage not in stages:
            c.extra["stage_not_requested"] = True


# metrics whose within-run limit is a minimum (the others' is a maximum)
LOWER_LIMITS = ("delta_acc", "speedup", "decode_agreement", "identical_fraction")


def known_lossy(checks: list[Check], baselines: list[Baseline]) -> None:
    """Within-run limits the variant's own baseline already misses are reported, not gated: the
    variant is gated on regression from that (blessed) baseline instead of being permanently red."""
    from evalsuite.judge.checks import FAIL, INCONCLUSIVE

    by_variant = {b.variant: b for b in baselines}
    for c in checks:
        if c.kind != "limit" or not c.gated or c.limit is None or c.p_value is None:
            continue
        b = by_variant.get(c.variant or "")
        if b is None:
            continue
        if c.task == "pooled" and c.metric == "delta_acc":
            value = _pooled_baseline_delta(by_variant.get("fp"), b)
        else:
            m = b.get((c.stage, c.task, c.variant, c.metric))
            value = m.value if m is not None else None
        if value is None:
            continue
        upper = c.metric not in LOWER_LIMITS
        beyond = value > c.limit if upper else value < c.limit
        if beyond:
            c.gated, c.p_value = False, None
            c.extra["known_lossy"] = True  # --suggest-fix still offers a way back within the limit
            if c.verdict == FAIL:
                c.verdict = "WORSE"
            c.reason = (f"reported, not gated (known lossy: its baseline {b.path or ''} is {value:.4g}, beyond this "
                        f"limit too; gated on regression from that baseline): {c.reason}")


def _pooled_baseline_delta(fp: Baseline | None, variant: Baseline) -> float | None:
    """acc(variant) - acc(fp) over all tasks' items of the two baselines' paired data."""
    if fp is None or not fp.arrays or not variant.arrays:
        return None
    a, b = [], []
    for key in fp.arrays:
        if key.startswith("tasks/") and key.endswith("/fp/acc"):
            task = key.split("/")[1]
            other = variant.arrays.get(f"tasks/{task}/{variant.variant}/acc")
            if other is not None and other.size == fp.arrays[key].size:
                a.append(fp.arrays[key])
                b.append(other)
    if not a:
        return None
    import numpy as np

    return float(np.concatenate(b).mean() - np.concatenate(a).mean())


def state_power(checks: list[Check], alpha: float) -> None:
    """Append to each gated check the smallest effect it detects with 80% power at its sample size,
    at the strictest Holm level alpha/m (conservative)."""
    from evalsuite.stats import min_detectable

    family = [c for c in checks if c.gated and c.p_value is not None]
    for c in family:
        se, df = c.extra.get("se"), c.extra.get("df")
        if not isinstance(se, (int, float)):
            continue
        mde = min_detectable(float(se), alpha / len(family), 0.8, df)
        margin = c.extra.get("margin") if c.kind == "baseline" else None
        if mde == mde:  # not nan
            total = mde + (margin or 0.0)
            c.extra["mde"] = total
            what = "a true excess over the limit" if c.kind == "limit" else "a true change"
            c.reason += f"; MDE: detects {what} of {total:.3g} with 80% power at alpha/{len(family)} (n={c.extra.get('clusters') or '-'})"


def annotate(results: Results, checks: list[Check]) -> None:
    results.verdicts = [c.to_dict() for c in checks]


def smoke_skip(results: Results) -> list[Check]:
    """A smoke-suite run is a sample, never comparable with a baseline's full data: one SKIPPED check."""
    if results.run.get("suite") != "smoke":
        return []
    return [Check("baseline", "baseline", SKIPPED, "a --suite smoke run is not compared with baselines")]


def resolve_baselines(results: Results, baseline: str | None = None, baselines: str | Path | None = None,
                      variants: list[str] | None = None,
                      results_path: str | Path | None = None) -> tuple[list[Baseline], list[Check], Path]:
    """Baselines for ``results`` from ``baseline`` (``--baseline FILE``, only ``variants`` of it when
    given) or the ``baselines`` folder (``--baselines DIR``, default reports/baselines)."""
    directory = Path(baselines or DEFAULT_DIR)
    if smoke_skip(results):
        return [], smoke_skip(results), directory
    if baseline:
        found = load_baselines(baseline)
        if variants:
            found = [b for b in found if b.variant in variants]
        return found, [], directory
    found, missing = find_baselines(directory, results, results_path)
    return found, missing, directory
