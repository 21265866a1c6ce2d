"""The verdict vocabulary of a results file's ``verdicts`` (what each means: ``evalsuite.judge.checks``),
the exit code they give (``exit_code``, ``GateResult``) and the one number format the judge's reasons
and the reports share. Here, below both, so that the judge writes and the reporters and the results
schema (``Results.passed``) read the same words without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PASS, FAIL, IMPROVED, WITHIN_NOISE, SKIPPED = "PASS", "FAIL", "IMPROVED", "WITHIN-NOISE", "SKIPPED"
INCOMPLETE = "INCOMPLETE"
INVALID = "INVALID"
INCONCLUSIVE, WORSE = "INCONCLUSIVE", "WORSE"
VERDICTS = (INVALID, FAIL, INCOMPLETE, IMPROVED, INCONCLUSIVE, WORSE, WITHIN_NOISE, SKIPPED, PASS)  # worst first

# exit codes of every command (and 128+N when ended by signal N)
EXIT_PASSED = 0
EXIT_REGRESSION = 1
EXIT_USAGE = 2  # a usage or input error (one line on stderr)
EXIT_INTERNAL = 3  # a bug: the traceback is printed, the results so far are kept
EXIT_INCOMPLETE = 4  # the run could not judge everything it was asked to: no verdict
EXIT_INVALID = 5  # the results file contradicts itself or its details: nothing in it is judged


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def exit_code(verdicts: list[dict[str, Any]]) -> int:
    """5 when the results are INVALID (evidence that contradicts itself: no verdict in it can be
    trusted); else 1 when any check fails the run; else 4 when any is INCOMPLETE (no verdict); else 0.
    A regression wins over incompleteness: it must block a release whatever else is missing."""
    if any(v.get("verdict") == INVALID for v in verdicts):
        return EXIT_INVALID
    if any(v.get("failing", v.get("verdict") == FAIL) for v in verdicts):
        return EXIT_REGRESSION
    return EXIT_INCOMPLETE if any(v.get("verdict") == INCOMPLETE for v in verdicts) else EXIT_PASSED


@dataclass(frozen=True)
class GateResult:
    """What a gate decided, for the Python API: ``status`` is ``passed``, ``failed``, ``incomplete``
    or ``invalid``, as ``exit_code`` says (0, 1, 4, 5). ``judged``: at least one gated check reached
    a verdict (not SKIPPED, INCONCLUSIVE or INCOMPLETE); ``passed`` is True only when judged and
    nothing failed or was left incomplete, so a run that checked nothing never passes."""

    verdicts: list[dict[str, Any]]
    results: Any = None  # the Results judged (its tables: ``results.table()``)

    @property
    def exit_code(self) -> int:
        code = exit_code(self.verdicts)
        return EXIT_INCOMPLETE if code == EXIT_PASSED and not self.judged else code

    @property
    def judged(self) -> bool:
        return any(v.get("gated") and v.get("verdict") not in (SKIPPED, INCONCLUSIVE, INCOMPLETE, INVALID)
                   for v in self.verdicts)

    @property
    def status(self) -> str:
        return {EXIT_PASSED: "passed", EXIT_REGRESSION: "failed", EXIT_INVALID: "invalid"}.get(self.exit_code,
                                                                                               "incomplete")

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def __bool__(self) -> bool:
        return self.passed
