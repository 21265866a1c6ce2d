"""Within-run gates of the gen stage (generation fidelity), per quantized variant against fp.

Gated by default, with limits per scheme (``schemes.<pattern>`` keys of the gates config; the
defaults below apply where a key is absent):

- ``gen_decode_agreement_min``: the variant's ``decode_agreement`` (its cached greedy tokens that are
  its own teacher-forced argmax) must have its whole 95% CI at or above this. It does not depend on
  how far the variant is from fp, so one default serves every scheme; a broken cache path falls far
  below it. fp's own value is named beside it.
- ``gen_kld_max``: ``tf_kld_generated`` (KL(fp || variant) on fp's own continuation) must have its
  whole CI below this; default the scheme's ``kld_mean_max``.

``identical_fraction`` is gated only where a gates file sets ``gen_identical_min`` for the scheme:
greedy generations of a correct variant diverge at its first near-tie, at rates the model decides
(the fp@noise floor shows them), so no default limit is safe from false alarms.
"""

from __future__ import annotations

from evalsuite.judge.checks import SKIPPED, Check, fmt
from evalsuite.results import Results

STAGE = "gen"
TASK = "generation"
DECODE_AGREEMENT_MIN = 0.9


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
    if limits.get("gen_identical_min") is not None:
        out.append(_check(results, variant, "identical_fraction", float(limits["gen_identical_min"]), False,
                          f"schemes.{pattern}.gen_identical_min", _floor_note(results, "identical_fraction", "fp@noise"),
                          alpha))
    return out
