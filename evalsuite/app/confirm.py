"""``--confirm``: a failing run pages only when its failures reproduce.

The run's stages that hold a failing gated check are measured once more in the same process, with
the models already loaded, under a perturbed batch plan (another ppl/task batch size; speed re-timed;
``perturbed`` and ``remeasure`` below), and judged again with the same limits and baselines. A failure that the
second judgement also fails is *confirmed* and keeps failing the run; one that does not is shown as
``WORSE`` with "not confirmed by a re-measurement with ...", never dropped. Checks that no stage
measures (completeness, the run's own errors) are not re-measurable and stand as they are.

A re-measurement that raises leaves the first judgement standing and its error recorded (in
``confirm/results.json``'s errors, as a run records a stage's error); the run's reports are written,
then the error surfaces as it would in the run itself (exit 3 for a bug, 2 for a user's mistake).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from evalsuite.errors import first_line
from evalsuite.judge.checks import INCOMPLETE, SKIPPED, WORSE, Check, fmt
from evalsuite.results import Results

MEASURED_STAGES = ("ppl", "tasks", "gen", "layers", "speed")  # the run order


def stage_of(c: Check) -> str | None:
    return c.stage if c.stage in MEASURED_STAGES else None


def confirm(results: Results, checks: list[Check], remeasure: Callable[[list[str], list[str]], tuple[Results, str]],
            rejudge: Callable[[Results], list[Check]]) -> tuple[list[Check], Exception | None]:
    """Re-measure the stages of the failing checks (``remeasure(stages, variants)`` returns the
    re-measured results and its batch plan in words), judge them (``rejudge``), and keep failing
    only the failures that reproduce. Records what happened in ``results.run["confirm"]``. Returns the
    checks and the exception a failed re-measurement raised (None when it did not)."""
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
        return checks, None
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
        return checks, e
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
    return checks, None



def perturbed(config, results: Results, stages: list[str], device_type: str):
    """The run's config with another batch plan (``dataclasses.replace``), and that plan in words."""
    options, plan = {}, []
    if "ppl" in stages:
        was = ((results.details.get("ppl") or {}).get("protocol") or {}).get("batch_size") or config.option("ppl_batch") or 1
        options["ppl_batch"] = int(was) // 2 if int(was) > 1 else 2
        plan.append(f"--ppl-batch {options['ppl_batch']} (was {was})")
        options["ppl_noise_floor"] = "off"  # fp@noise is reported, never gated: not worth re-measuring
    if "tasks" in stages or "gen" in stages:
        from evalsuite.measure.lm_adapter import BATCH_SIZE_CPU, BATCH_SIZE_GPU

        was = config.option("task_batch_size") or (BATCH_SIZE_GPU if device_type == "cuda" else BATCH_SIZE_CPU)
        options["task_batch_size"] = max(1, int(was) // 2) if int(was) > 1 else 2
        plan.append(f"--task-batch-size {options['task_batch_size']} (was {was})")
    if "speed" in stages:
        plan.append("speed re-timed")
    if "layers" in stages:
        plan.append("layers re-measured")
    return config.with_options(**options).with_runtime(fp_cache="off"), ", ".join(plan)


def remeasure(ctx, results: Results, stages: list[str], variants: list[str], out_dir: Path,
              measure: Callable) -> tuple[Results, str]:
    """``stages`` measured again for ``variants`` (fp first) into a copy of ``results`` that keeps the
    other stages' records as they were, by ``measure`` (the session's run loop)."""
    from evalsuite.measure.context import RunContext

    config, plan = perturbed(ctx.config, results, stages, ctx.device.type)
    run = copy.deepcopy(results.run)
    run.update(confirmation_of=results.run.get("started"), confirm_plan=plan, stage_seconds={},
               schemes=[v for v in results.run.get("schemes", []) if v in variants])
    run["config"] = config.to_record()
    again = Results(run=run)
    again.records = [r for r in results.records if r.stage not in stages]
    again.details = {k: v for k, v in results.details.items() if k not in stages}
    again.errors = [e for e in results.errors if e.get("stage") not in stages]
    models = {k: m for k, m in ctx.variants.items() if k in variants}
    vctx = RunContext(loaded=ctx.loaded, variants=models, configs={k: c for k, c in ctx.configs.items() if k in models},
                      device=ctx.device, dtype=ctx.dtype, config=config, results=again, data_dir=ctx.data_dir,
                      limit=ctx.limit, reload=ctx.reload, show_progress=ctx.show_progress)
    print(f"--confirm: re-measuring {', '.join(stages)} for {', '.join(variants)} with {plan}", flush=True)
    path = Path(out_dir) / "confirm" / "results.json"
    again.run["confirm_results"] = str(path)
    try:
        measure(vctx, stages)
    finally:  # what was re-measured, and the error of a stage that raised, are kept
        again.save(path)
    return again, plan
