"""Completeness is part of the verdict: a run is judged only on what it was asked to check.

A run records what it was asked for (``run.stages``, ``run.tasks_requested``) and what finished
(``run.stages_finished``, ``run.finished``, ``run.interrupted``, ``run.running``). Each gap below is
one ``INCOMPLETE`` check (exit 4, or 1 under ``--strict``), so that PASS can never stand for
"nothing was checked":

- the run was interrupted (SIGINT, SIGTERM, SIGHUP) or never finished (killed, still running);
- a requested stage did not finish, or finished without a single record;
- a requested task has no records;
- a baseline comparison was asked for and nothing in it was comparable (every check SKIPPED or
  INCONCLUSIVE);
- no gated check at all could be judged (every one SKIPPED, INCONCLUSIVE or reported only).
"""

from __future__ import annotations

from evalsuite.judge.checks import INCOMPLETE, INCONCLUSIVE, PASS, SKIPPED, Check
from evalsuite.results import Results

MEASURE_STAGES = ("ppl", "tasks", "layers", "speed")


def stages_finished(results: Results) -> list[str]:
    """The measure stages that ran to their end. Files written before ``stages_finished`` existed
    are read through ``stage_seconds`` and their records (an interrupted run of that time is still
    caught by its missing ``finished``)."""
    run = results.run
    if "stages_finished" in run:
        return list(run["stages_finished"])
    seen = set(run.get("stage_seconds", {})) | {r.stage for r in results.records}
    return [s for s in MEASURE_STAGES if s in seen]


def completeness_checks(results: Results, checks: list[Check], baseline_requested: bool = False) -> list[Check]:
    """INCOMPLETE checks for every gap between what ``results`` was asked for and what it holds,
    or one PASS saying it is complete. ``checks`` are the run's other checks (its baseline checks
    decide whether anything was comparable); ``baseline_requested``: the user asked for a baseline
    comparison (``--baseline``, or ``gate``), so finding nothing comparable is no verdict."""
    run = results.run
    out: list[Check] = []

    def incomplete(name: str, reason: str, **kw) -> None:
        out.append(Check(f"complete/{name}", "run", INCOMPLETE, reason, **kw))

    running = run.get("running")
    interrupted = run.get("interrupted")
    if interrupted:
        where = f" during stage {interrupted.get('stage')}" if interrupted.get("stage") else ""
        incomplete("run", f"the run was interrupted by {interrupted.get('signal', 'a signal')}{where}")
    elif "finished" not in run:
        where = f" (stage {running} was running)" if running else ""
        incomplete("run", f"the run never finished{where}: killed, crashed or still running")
    requested = list(run.get("stages") or [])
    if not requested:
        incomplete("stages", "no stage was run: there is nothing to judge")
    finished = set(stages_finished(results))
    errors = {e.get("stage"): e.get("message") for e in results.errors}
    for stage in requested:
        if stage not in finished:
            why = f": {errors[stage]}" if stage in errors else ""
            incomplete(f"stage/{stage}", f"stage {stage} was requested but did not finish{why}", stage=stage)
        elif not results.find(stage=stage):
            incomplete(f"stage/{stage}", f"stage {stage} finished without a single record", stage=stage)
    if "tasks" in finished:
        have = {r.task for r in results.find(stage="tasks")}
        for task in run.get("tasks_requested") or []:
            if task not in have:
                incomplete(f"task/{task}", f"task {task} was requested but has no records", stage="tasks", task=task)
    if baseline_requested:
        compared = [c for c in checks if c.kind == "baseline"]
        # an unpaired or unresolved comparison (INCONCLUSIVE) compared nothing either
        if not any(c.verdict not in (SKIPPED, INCONCLUSIVE) for c in compared):
            reasons = "; ".join(dict.fromkeys(c.reason for c in compared[:20]))
            incomplete("baseline", "nothing in the baseline was comparable with this run"
                       + (f" ({reasons[:300]})" if reasons else " (no gated metric in common)"))
    judged = [c for c in checks if c.gated is not False and c.kind != "run" and c.verdict not in (SKIPPED, INCONCLUSIVE)]
    if not out and requested and not judged:
        # e.g. a speed-only run whose speed baselines lack a run-to-run calibration: all reported
        incomplete("gate", "no gated check could be judged: every check was skipped, inconclusive or "
                   "reported only, so there is no verdict to give")
    if not out:
        out.append(Check("complete/run", "run", PASS,
                         f"every requested stage finished with records ({', '.join(requested)})"))
    return out
