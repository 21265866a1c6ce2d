"""``--confirm``: a failing run pages only when its failures reproduce.

The run's stages that hold a failing gated check are measured once more in the same process, with
the models already loaded, under a perturbed batch plan (another ppl/task batch size; speed re-timed;
see ``evalsuite.confirm``), and judged again with the same limits and baselines. A failure that the
second judgement also fails is *confirmed* and keeps failing the run; one that does not is shown as
``WORSE`` with "not confirmed by a re-measurement with ...", never dropped. Checks that no stage
measures (completeness, the run's own errors) are not re-measurable and stand as they are.
"""

from __future__ import annotations

from typing import Any, Callable

from evalsuite.errors import first_line
from evalsuite.judge.checks import INCOMPLETE, SKIPPED, WORSE, Check, fmt
from evalsuite.results import Results

MEASURED_STAGES = ("ppl", "tasks", "gen", "layers", "speed")  # the run order


def stage_of(c: Check) -> str | None:
    return c.stage if c.stage in MEASURED_STAGES else None


def confirm(results: Results, checks: list[Check], remeasure: Callable[[list[str], list[str]], tuple[Results, str]],
            rejudge: Callable[[Results], list[Check]]) -> list[Check]:
    """Re-measure the stages of the failing checks (``remeasure(stages, variants)`` returns the
    re-measured results and its batch plan in words), judge them (``rejudge``), and keep failing
    only the failures that reproduce. Records what happened in ``results.run["confirm"]``."""
    failing = [c for c in checks if c.failing]
    stages = [s for s in MEASURED_STAGES if any(stage_of(c) == s for c in failing)]
    record: dict[str, Any] = {"stages": stages, "confirmed": [], "not_confirmed": [], "not_remeasurable": []}
    results.run["confirm"] = record
    for c in failing:
        if stage_of(c) is None:
            c.extra["confirmed"] = None
            c.reason += "; --confirm: not re-measurable (no stage measures it), so it stands"
            record["not_remeasurable"].append(c.check)
    if not stages:
        return checks
    variants = sorted({(c.variant or "fp").split("@", 1)[0] for c in failing if stage_of(c)} | {"fp"})
    try:
        again, plan = remeasure(stages, variants)
        second = {c.check: c for c in rejudge(again)}
    except Exception as e:  # noqa: BLE001 - a failed re-measurement must not lose the first judgement
        why = first_line(e, 200)
        record["error"] = why
        for c in failing:
            if stage_of(c) is not None:
                c.extra["confirmed"] = None
                c.reason += f"; --confirm: the re-measurement failed ({type(e).__name__}: {why}), so it stands"
        return checks
    record.update(plan=plan, variants=variants, results=again.run.get("confirm_results"))
    for c in failing:
        if stage_of(c) is None:
            continue
        d = second.get(c.check)
        there = f"{d.verdict}, value {fmt(d.value)}" if d is not None else "no such check"
        if d is None or d.verdict in (SKIPPED, INCOMPLETE):
            # the re-measurement did not measure it (a stage error, a missing record): not a second
            # opinion, so the failure stands rather than passing unchecked
            c.extra["confirmed"] = None
            c.reason += f"; --confirm: the re-measurement did not judge it ({there}), so it stands"
            record["not_remeasurable"].append(c.check)
            continue
        if d.failing:
            c.extra["confirmed"] = True
            c.reason += f"; confirmed by a re-measurement with {plan} (there: {there})"
            record["confirmed"].append(c.check)
        else:
            c.extra["confirmed"] = False
            c.extra["first_verdict"] = c.verdict
            c.verdict, c.failing = WORSE, False
            c.reason = (f"not confirmed by a re-measurement with {plan} (there: {there}"
                        f"{': ' + d.reason if d is not None else ''}); first measurement: {c.reason}")
            record["not_confirmed"].append(c.check)
    # failures only the re-measurement shows: reported (they would need a confirmation of their own)
    first = {c.check for c in checks if c.failing or c.extra.get("confirmed") is False}
    record["new_in_remeasurement"] = sorted(k for k, d in second.items() if d.failing and k not in first)
    return checks
