"""``evalsuite run --confirm``: re-measure the stages of a failing run once, with the models already
loaded and a perturbed batch plan, for ``evalsuite.judge.confirm`` to judge again.

The perturbation changes what should not matter (bf16 numerics under another batch shape, a fresh
timing): ppl windows per forward halved (2 where it was 1), task sequences per forward halved, speed
re-timed; fp's cached reference is not used, so fp is measured afresh too. The re-measurement's own
results go to ``OUT/confirm/results.json``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from evalsuite.results import Results


def perturbed_args(args, results: Results, stages: list[str], device_type: str):
    """A copy of the run's options with another batch plan, and that plan in words."""
    args = copy.copy(args)
    plan = []
    if "ppl" in stages:
        was = ((results.details.get("ppl") or {}).get("protocol") or {}).get("batch_size") or args.ppl_batch or 1
        args.ppl_batch = int(was) // 2 if int(was) > 1 else 2
        plan.append(f"--ppl-batch {args.ppl_batch} (was {was})")
        args.ppl_noise_floor = "off"  # fp@noise is reported, never gated: not worth re-measuring
    if "tasks" in stages or "gen" in stages:
        from evalsuite.measure.lm_adapter import BATCH_SIZE_CPU, BATCH_SIZE_GPU

        was = args.task_batch_size or (BATCH_SIZE_GPU if device_type == "cuda" else BATCH_SIZE_CPU)
        args.task_batch_size = max(1, int(was) // 2) if int(was) > 1 else 2
        plan.append(f"--task-batch-size {args.task_batch_size} (was {was})")
    if "speed" in stages:
        plan.append("speed re-timed")
    if "layers" in stages:
        plan.append("layers re-measured")
    args.fp_cache = "off"
    return args, ", ".join(plan)


def remeasure(ctx, results: Results, stages: list[str], variants: list[str], out_dir: Path) -> tuple[Results, str]:
    """``stages`` measured again for ``variants`` (fp first) into a copy of ``results`` that keeps the
    other stages' records as they were."""
    import torch

    from evalsuite.measure import get_stage
    from evalsuite.measure.context import RunContext

    args, plan = perturbed_args(ctx.args, results, stages, ctx.device.type)
    run = copy.deepcopy(results.run)
    run.update(confirmation_of=results.run.get("started"), confirm_plan=plan, stage_seconds={},
               schemes=[v for v in results.run.get("schemes", []) if v in variants])
    again = Results(run=run)
    again.records = [r for r in results.records if r.stage not in stages]
    again.details = {k: v for k, v in results.details.items() if k not in stages}
    again.errors = [e for e in results.errors if e.get("stage") not in stages]
    models = {k: m for k, m in ctx.variants.items() if k in variants}
    vctx = RunContext(loaded=ctx.loaded, variants=models, configs={k: c for k, c in ctx.configs.items() if k in models},
                      device=ctx.device, dtype=ctx.dtype, args=args, results=again, data_dir=ctx.data_dir,
                      limit=ctx.limit, reload=ctx.reload, show_progress=ctx.show_progress)
    print(f"--confirm: re-measuring {', '.join(stages)} for {', '.join(variants)} with {plan}", flush=True)
    for name in stages:
        t0 = time.perf_counter()
        with torch.inference_mode():
            get_stage(name).run(vctx)
        again.run["stage_seconds"][name] = round(time.perf_counter() - t0, 3)
    path = Path(out_dir) / "confirm" / "results.json"
    again.run["confirm_results"] = str(path)
    again.save(path)
    return again, plan
