"""The verdict vocabulary of a results file's ``verdicts`` (what each means: ``evalsuite.judge.checks``)
and the one number format the judge's reasons and the reports share. Here, below both, so that the
judge writes and the reporters read the same words without importing each other."""

from __future__ import annotations

import math

PASS, FAIL, IMPROVED, WITHIN_NOISE, SKIPPED = "PASS", "FAIL", "IMPROVED", "WITHIN-NOISE", "SKIPPED"
INCOMPLETE = "INCOMPLETE"
INVALID = "INVALID"
INCONCLUSIVE, WORSE = "INCONCLUSIVE", "WORSE"
VERDICTS = (INVALID, FAIL, INCOMPLETE, IMPROVED, INCONCLUSIVE, WORSE, WITHIN_NOISE, SKIPPED, PASS)  # worst first


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"
