"""Within-run gates of the gen stage (generation fidelity), per quantized variant against fp.

Gated by default, with limits per scheme (``schemes.<pattern>`` keys of the gates config; the
defaults below apply where a key is absent):

- ``gen_decode_agreement_min``: the variant's ``decode_agreement`` (its cached greedy tokens that are
  its own teacher-forced argmax) must have its whole 95% CI at or above this. It does not depend on
  how far the variant is from fp, so one default serves every scheme; a broken cache path falls far
  below it. fp's own value is named beside it.
- ``gen_kld_max``: ``tf_kld_generated`` (KL(fp || variant) on fp's own continuation) must have its
  whole CI below this; default the scheme's ``kld_mean_max``.

- ``gen_identical_vs_noise_min``: the variant's ``identical_fraction`` (its greedy generations equal
  to fp's) must not fall below this fraction of ``fp@noise``'s (fp in the run's dtype against fp in
  float32, on the same prompts). Greedy generations of a correct variant diverge at its first
  near-tie, at a rate the model decides, so an absolute limit is not safe from false alarms; the
  dtype's own rounding noise measures that rate on this model and these prompts. The test is paired
  over prompts: d_i = identical_i(variant) − r · identical_i(fp@noise), non-inferiority of mean(d)
  ≥ 0 on its t interval (a prompt near a tie diverges under both, so pairing removes the prompts'
  spread). Where every d_i is equal (all generations identical, or none) the interval is the two
  fractions' Wilson intervals combined, unpaired. Not judged (SKIPPED) without a measured floor: a
  float32 run has no rounding noise to calibrate on (``gen_identical_min`` is an absolute limit).

``identical_fraction`` is also gated against an absolute limit where a gates file sets
``gen_identical_min`` for the scheme (no default: the rate of near-ties is the model's).
"""

from __future__ import annotations

import math

import numpy as np

from evalsuite.judge.checks import SKIPPED, Z95, Check, fmt
from evalsuite.results import Metric, Results

STAGE = "gen"
TASK = "generation"
NOISE = "fp@noise"
DECODE_AGREEMENT_MIN = 0.9
IDENTICAL_VS_NOISE_MIN = 0.3  # where a gates file's scheme pattern has no gen_identical_vs_noise_min


def _ran(results: Results) -> bool:
    stages = results.run.get("stages")
    return STAGE in stages if stages is not None else bool(results.find(stage=STAGE))


def _check(results: Results, variant: str, metric: str, limit: float, upper: bool, source: str, note: str,
           alpha: float) -> Check:
    from evalsuite.judge.within import _limit_check  # within imports this module: import at call time

    m = results.get(STAGE, TASK, variant, metric)
    name = f"{STAGE}/{variant}/{metric}"
    if m is None:
        return Check(name, "limit", SKIPPED, f"no {metric} record for {variant} (stage gen ran; partial or failed data)",
                     stage=STAGE, variant=variant, metric=metric)
    # non-inferiority on the record's interval over prompts, in the run's Holm family like ppl and tasks
    return _limit_check(m, limit, upper, name, source, note, gated=True, alpha=alpha, clusters=m.n)


def _floor_note(results: Results, metric: str, reference: str) -> str:
    floor = results.get(STAGE, TASK, reference, metric)
    if floor is None or floor.value is None:
        return ""
    return f"; {reference} {fmt(floor.value)}"


def _wilson_se(x: np.ndarray) -> float:
    from evalsuite.stats import wilson_interval

    lo, hi = wilson_interval(int(x.sum()), int(x.size))
    return (hi - lo) / (2 * Z95)


def identical_vs_noise_check(results: Results, variant: str, ratio: float, pattern: str, alpha: float) -> Check:
    """``identical_fraction`` of ``variant`` against ``ratio`` × fp@noise's, paired over prompts (see
    the module's docstring)."""
    from scipy import special

    from evalsuite.judge.within import _limit_check  # within imports this module: import at call time

    name = f"{STAGE}/{variant}/identical_vs_noise"
    source = f"schemes.{pattern}.gen_identical_vs_noise_min"

    def skipped(why: str) -> Check:
        return Check(name, "limit", SKIPPED, why, stage=STAGE, task=TASK, variant=variant,
                     metric="identical_fraction", source=f"gates config: {source}")

    details = results.details.get(STAGE) or {}
    paired = details.get("paired") or {}
    floor = str(details.get("noise_floor", ""))
    if NOISE not in paired:
        if floor.startswith("trivial"):
            return skipped(f"no {NOISE} generations to calibrate on ({floor}); "
                           f"schemes.{pattern}.gen_identical_min sets an absolute limit")
        return skipped(f"no per-prompt {NOISE} generations in this run ({floor or 'results written before they were kept'})")
    if variant not in paired:
        return skipped(f"no per-prompt generations of {variant} (stage gen ran; partial or failed data)")
    x = np.asarray(paired[variant].get("identical") or [], dtype=np.float64)
    y = np.asarray(paired[NOISE].get("identical") or [], dtype=np.float64)
    if x.size != y.size or x.size < 2:
        return skipped(f"{variant} and {NOISE} hold {x.size} and {y.size} prompts: nothing to pair")
    n = int(x.size)
    d = x - ratio * y
    if np.ptp(d) > 0:
        se, how = float(d.std(ddof=1) / math.sqrt(n)), f"paired over {n} prompts, t interval"
        half = float(special.stdtrit(n - 1, 0.975)) * se
    else:  # every prompt alike (all identical, or none): the fractions' own binomial uncertainty
        se, how = math.sqrt(_wilson_se(x) ** 2 + ratio ** 2 * _wilson_se(y) ** 2),             f"{n} prompts all alike: Wilson intervals combined, unpaired"
        half = Z95 * se
    limit = ratio * float(y.mean())
    value = float(x.mean())
    m = Metric(stage=STAGE, task=TASK, variant=variant, metric="identical_fraction", value=value, unit="fraction",
               n=n, higher_is_better=True, ci95=[limit + float(d.mean()) - half, limit + float(d.mean()) + half],
               definition=f"identical_fraction vs {fmt(ratio, 3)} × {NOISE}'s (prompts whose greedy generation "
                          f"equals fp's; the limit is {fmt(ratio, 3)} × {fmt(float(y.mean()))}, the fraction of fp's "
                          f"generations equal to fp32's; 95% CI {how})")
    div = paired[variant].get("divergence")
    noise_div = paired[NOISE].get("divergence")
    note = ""
    if div and noise_div:
        note = (f"; median tokens to the first divergence {fmt(float(np.median(div)), 3)} "
                f"({NOISE} {fmt(float(np.median(noise_div)), 3)})")
    return _limit_check(m, limit, False, name, source, note, gated=True, alpha=alpha, clusters=n)


def generation_checks(results: Results, variant: str, limits: dict, pattern: str,
                      alpha: float = 0.01) -> list[Check]:
    """The gen stage's gates for one variant; none when the stage was not asked for."""
    if not _ran(results):
        return []
    agreement = float(limits.get("gen_decode_agreement_min", DECODE_AGREEMENT_MIN))
    kld = float(limits.get("gen_kld_max", limits.get("kld_mean_max", 0.05)))
    out = [
        _check(results, variant, "decode_agreement", agreement, False,
               f"schemes.{pattern}.gen_decode_agreement_min", _floor_note(results, "decode_agreement", "fp"), alpha),
        _check(results, variant, "tf_kld_generated", kld, True, f"schemes.{pattern}.gen_kld_max"
               + ("" if "gen_kld_max" in limits else " (default: kld_mean_max)"),
               _floor_note(results, "tf_kld_generated", "fp@noise"), alpha),
    ]
    ratio = limits.get("gen_identical_vs_noise_min", IDENTICAL_VS_NOISE_MIN)
    if ratio is not None:
        out.append(identical_vs_noise_check(results, variant, float(ratio), pattern, alpha))
    if limits.get("gen_identical_min") is not None:
        out.append(_check(results, variant, "identical_fraction", float(limits["gen_identical_min"]), False,
                          f"schemes.{pattern}.gen_identical_min", _floor_note(results, "identical_fraction", "fp@noise"),
                          alpha))
    return out
