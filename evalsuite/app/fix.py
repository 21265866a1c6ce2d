"""``evalsuite fix RESULTS.json`` and ``evalsuite run --suggest-fix``: for a scheme that fails its
within-run limits, the smallest set of layers (by parameters) to keep in floating point, found on
a calibration corpus and verified on the evaluation data.

Three steps per failing scheme (costs are recorded in ``details.fix.<scheme>.seconds``):

1. sensitivity: leave-one-out counterfactuals on a calibration slice disjoint from the evaluation
   windows (:mod:`evalsuite.measure.sensitivity`; default the other WikiText-2 split, 4096 tokens);
2. search: greedy by KLD drop per parameter, re-measured on top of the chosen set, until the
   predicted KLD and ppl ratio are below ``margin`` x their gate limits (``ln`` of the ratio), within
   ``--fix-budget`` (a fraction of the quantized linear weights' parameters); a failing layer-SQNR
   check's layers are in the set from the start (restoring them is the only way that check passes);
3. verification: the failing stages re-run on the real evaluation data with the set as
   ``--skip-layers`` (the same quantization as ``evalsuite run --skip-layers``; no noise floor), judged
   with the same gate limits. The verdict of that run is the fix's verdict, not the prediction.

A scheme that passes gets no fix. Speed checks are not fixable by restoring layers and are reported so.
"""

from __future__ import annotations

import copy
import math
import shlex
import time
from pathlib import Path
from typing import Any

from evalsuite.errors import EvalsuiteError
from evalsuite.results import Results

FIXABLE_STAGES = ("ppl", "tasks", "layers")
DEFAULT_BUDGET = "25%"


def parse_budget(spec: str | float) -> float:
    s = str(spec).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise EvalsuiteError(f"--fix-budget {spec!r}: expected a percentage such as 10% or a fraction such as 0.1") from None
    if not 0 < value <= 1:
        raise EvalsuiteError(f"--fix-budget {spec!r}: must be above 0 and at most 100%")
    return value


def validate(fix, ppl_corpus: str | None = None) -> None:
    """The fix options' cheap checks (``fix``: the run's ``FixConfig``), before any model loads."""
    from evalsuite.measure.sensitivity import calibration_corpus

    parse_budget(fix.budget)
    if fix.tokens < 2:
        raise EvalsuiteError("--fix-tokens must be at least 2")
    if not 0 < fix.margin <= 1:
        raise EvalsuiteError("--fix-margin must be above 0 and at most 1")
    if fix.rerank < 1:
        raise EvalsuiteError("--fix-rerank must be at least 1")
    calibration_corpus(ppl_corpus or "wikitext2", fix.corpus)


def failing_checks(verdicts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Within-run limit checks beyond their limit, by scheme, in run order: those failing the run,
    and those of a known-lossy scheme (WORSE, gated on its own baseline instead), whose fix the user
    asked for all the same."""
    out: dict[str, list[dict[str, Any]]] = {}
    for v in verdicts:
        lossy = v.get("verdict") == "WORSE" and (v.get("extra") or {}).get("known_lossy")
        if v.get("kind") == "limit" and (v.get("failing") or lossy) and v.get("variant"):
            out.setdefault(v["variant"], []).append(v)
    return out


def run_command(argv: list[str] | None, model_path: str, variant: str, skip: list[str], stages: list[str],
                out: str) -> str:
    """The ``evalsuite run`` command of the verification: the run's own options, with this scheme,
    these skipped layers and stages."""
    drop = {"--quant", "--skip-layers", "--stages", "--out", "--model"}
    kept, i = [], 0
    argv = list(argv or [])[1:] if argv and argv[0] == "run" else []
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] in drop:
            i += 1 if "=" in a else 2
            continue
        if a == "--suggest-fix":
            i += 1
            continue
        kept.append(a)
        i += 1
    cmd = ["evalsuite", "run", "--model", model_path, *kept, "--quant", variant, "--skip-layers", ",".join(skip),
           "--stages", ",".join(stages), "--out", out]
    return shlex.join(cmd)


def _limits(config, variant: str) -> tuple[float, float, str]:
    pattern, limits = config.scheme(variant)
    return float(limits["kld_mean_max"]), float(limits["ppl_ratio_max"]), pattern


def suggest(ctx, results: Results, config, fails: dict[str, list[dict]], out_dir: Path, measure) -> dict[str, dict]:
    """Sensitivity, search and verification for each failing scheme of ``fails``; writes
    ``results.details['fix']`` and the ``fix`` records, and returns the details. ``config``: the gate
    limits; ``measure``: the session's run loop, which runs each verification."""
    import torch

    from evalsuite.measure.corpus import load_corpus
    from evalsuite.measure.perplexity import select_stats
    from evalsuite.measure.sensitivity import (
        Counterfactuals,
        calibration_corpus,
        calibration_windows,
        greedy_restore,
        make_units,
        quantized_layer_names,
    )

    fix = ctx.config.fix
    budget = parse_budget(fix.budget)
    corpus = calibration_corpus(ctx.option("ppl_corpus") or "wikitext2", fix.corpus)
    text, source, _ = load_corpus(corpus, ctx.data_dir)
    context = int(ctx.option("ppl_context") or 2048)
    if ctx.loaded.info.max_seq_len:
        context = min(context, int(ctx.loaded.info.max_seq_len))
    windows = calibration_windows(ctx.tokenizer, text, int(fix.tokens), context, source)
    stats_fn, _, _ = select_stats(ctx.device, False, ctx.fused_kernels)
    dtype_bytes = torch.empty((), dtype=ctx.dtype).element_size()
    details = results.details.setdefault("fix", {})
    for variant, checks in fails.items():
        t0 = time.perf_counter()
        kld_max, ratio_max, pattern = _limits(config, variant)
        margin = float(fix.margin)
        stages = [s for s in dict.fromkeys(c.get("stage") for c in checks) if s]
        unfixable = [c["check"] for c in checks if c.get("stage") not in FIXABLE_STAGES]
        entry: dict[str, Any] = {
            "failing_checks": [c["check"] for c in checks], "limits": {
                "kld_mean_max": kld_max, "ppl_ratio_max": ratio_max, "source": f"gates config: schemes.{pattern}",
                "margin": margin},
            "calibration": {"source": source, "corpus": corpus, "tokens": int(windows.n_scored.sum()),
                            "windows": len(windows), "context": int(windows.input_ids.shape[1])},
            "granularity": fix.granularity, "budget_fraction": budget,
        }
        details[variant] = entry
        if unfixable:
            entry["unfixable"] = unfixable
        stages = [s for s in stages if s in FIXABLE_STAGES]
        if not stages:
            entry["status"] = "not fixable by restoring layers"
            print(describe(variant, entry))
            continue
        fp, quantized = ctx.fp, ctx.variants[variant]
        layer_names = quantized_layer_names(quantized)
        units = make_units(fp, layer_names, fix.granularity)
        total_params = sum(u.params for u in units)
        under = {l for c in checks if c.get("stage") == "layers" for l in (c.get("extra") or {}).get("under", [])}
        forced = [u for u in units if under & set(u.layers)]

        def target(m) -> bool:
            return m.kld_mean <= margin * kld_max and m.ln_ppl_ratio <= margin * math.log(ratio_max)

        with torch.inference_mode(), ctx.fused_forwards(fp, quantized):
            cf = Counterfactuals(fp, quantized, windows.input_ids, ctx.device, stats_fn,
                                 batch_size=len(windows) if ctx.device.type == "cuda" else 1)
            search = greedy_restore(cf, units, target, int(budget * total_params), rerank=int(fix.rerank),
                                    forced=forced)
            blocks = make_units(fp, layer_names, "block") if fix.granularity == "layer" else []
            block_drop = {b.name: search.baseline.kld_mean - cf.measure(b.layers).kld_mean for b in blocks}
            forwards = cf.forwards
            del cf
        t_search = time.perf_counter() - t0
        skip = [*ctx.skip, *(u.pattern for u in search.chosen)]
        restored_layers = [l for u in search.chosen for l in u.layers]
        params = sum(u.params for u in search.chosen)
        q_bytes = sum(b.numel() * b.element_size() for l in restored_layers
                      for b in quantized.get_submodule(l).buffers())
        fp_bytes = params * dtype_bytes
        verify_dir = out_dir / "fix" / variant
        command = run_command(results.run.get("argv"), str(ctx.loaded.info.path), variant, skip, stages, str(verify_dir))
        try:
            verified, checks_after, t_verify = _verify(ctx, results, config, variant, skip, stages, verify_dir,
                                                       command, measure)
        except Exception as e:
            entry.update(status="verification failed", error=f"{type(e).__name__}: {e}", command=command)
            raise
        entry.update({
            "status": "verified" if verified["pass"] else ("verification failed" if search.met else "no set within the budget"),
            "predicted_met": search.met, "stop_reason": search.stop_reason,
            "set": [u.name for u in search.chosen], "patterns": [u.pattern for u in search.chosen],
            "forced": [u.name for u in search.forced], "skip_layers": skip,
            "layers_restored": len(restored_layers), "layers_quantized": len(layer_names),
            "params_restored": params, "params_quantized": total_params,
            "params_fraction": params / total_params if total_params else 0.0,
            "bytes_fp": fp_bytes, "bytes_extra": fp_bytes - q_bytes,
            "predicted": search.metrics.to_dict(), "before": search.baseline.to_dict(),
            "steps": [s.to_dict() for s in search.steps],
            "sensitivity": search.sensitivity, "block_sensitivity": block_drop,
            "verified": verified, "verification_checks": checks_after,
            "command": command,
            "seconds": {"sensitivity_and_search": round(t_search, 3), "verification": round(t_verify, 3),
                        "forwards": forwards},
        })
        ppl_s = (results.run.get("stage_seconds") or {}).get("ppl")
        if ppl_s and len(results.run.get("schemes") or []) == 1:
            # the cost target: the whole fix within 4x one ppl stage of the same variant
            entry["seconds"]["over_ppl_stage"] = round((t_search + t_verify) / ppl_s, 3)
        _records(results, variant, entry)
        print(describe(variant, entry), flush=True)
        ctx.checkpoint()
    return details


def _verify(ctx, results: Results, config, variant: str, skip: list[str], stages: list[str],
            out_dir: Path, command: str, measure) -> tuple[dict, list[dict], float]:
    """Re-run ``stages`` for ``variant`` quantized with ``skip`` on the evaluation data (``measure``: the
    session's run loop, on the run's config with these ``--skip-layers``); judge it. A stage that
    raises is recorded in the verification's results.json, which is written either way."""
    from evalsuite.judge.checks import PASS, finalize
    from evalsuite.judge.within import within_run_checks
    from evalsuite.measure.context import RunContext
    from evalsuite.quantize import quantize_

    t0 = time.perf_counter()
    cfg = ctx.configs[variant]
    model = quantize_(copy.deepcopy(ctx.fp), cfg, skip=tuple(skip))
    # the gate's checks do not need the noise floor; it costs a third of the ppl stage
    vconfig = ctx.config.with_model(skip_layers=",".join(skip)).with_options(ppl_noise_floor="off")
    run = {**results.run, "argv": shlex.split(command)[1:], "schemes": [variant], "stages": stages,
           "fix_verification_of": variant,
           "stage_seconds": {}, "partial": bool(results.run.get("partial")), "config": vconfig.to_record()}
    vres = Results(run=run)
    vctx = RunContext(loaded=ctx.loaded, variants={"fp": ctx.fp, variant: model}, configs={variant: cfg},
                      device=ctx.device, dtype=ctx.dtype, config=vconfig, results=vres, data_dir=ctx.data_dir,
                      limit=ctx.limit, reload=None, show_progress=ctx.show_progress)
    try:
        measure(vctx, stages)
    except Exception:
        if getattr(ctx, "rank", 0) == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            vres.save(out_dir / "results.json")
        raise
    del model
    checks = [c for c in finalize(within_run_checks(vres, config), config.strict)
              if c.variant == variant and c.stage in stages]
    vres.verdicts = [c.to_dict() for c in checks]
    if getattr(ctx, "rank", 0) == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        vres.save(out_dir / "results.json")
    metrics = {}
    for metric in ("kld_mean", "ppl_ratio"):
        for m in vres.find(stage="ppl", variant=variant, metric=metric):
            metrics[metric] = {"task": m.task, "value": m.value, "ci95": m.ci95, "n": m.n}
    ok = bool(checks) and all(c.verdict == PASS for c in checks)
    verified = {"pass": ok, "verdict": "PASS" if ok else "FAIL", "metrics": metrics,
                "results": str(out_dir / "results.json"), "stage_seconds": vres.run["stage_seconds"]}
    return verified, [{"check": c.check, "verdict": c.verdict, "value": c.value, "interval": c.interval,
                       "limit": c.limit} for c in checks], time.perf_counter() - t0


KLD_DROP_DEF = ("leave-one-out sensitivity: mean per-token KL(fp || Q) minus the same with only this {unit} restored "
                "to fp; on {source}, {tokens} calibration tokens disjoint from the evaluation windows")


def _records(results: Results, variant: str, e: dict) -> None:
    cal = e["calibration"]
    tokens = cal["tokens"]
    unit = "block's quantized layers" if e["granularity"] == "block" else "layer"
    definition = KLD_DROP_DEF.format(unit=unit, source=cal["source"], tokens=tokens)
    if e.get("forced"):
        definition += f" (on top of {len(e['forced'])} layers forced by a failing layer-SQNR check)"
    records = [dict(stage="fix", task=name, variant=variant, metric="kld_drop", value=v, unit="nats", n=tokens,
                    higher_is_better=None, definition=definition) for name, v in e["sensitivity"].items()]
    block_def = KLD_DROP_DEF.format(unit="block's quantized layers", source=cal["source"], tokens=tokens)
    records += [dict(stage="fix", task=name, variant=variant, metric="kld_drop", value=v, unit="nats", n=tokens,
                     higher_is_better=None, definition=block_def) for name, v in e.get("block_sensitivity", {}).items()]
    summary = [
        ("params_fraction", e["params_fraction"], "fraction",
         "parameters of the suggested set / parameters of all quantized linear layers"),
        ("bytes_extra", float(e["bytes_extra"]), "bytes",
         "weight bytes the suggested set adds: its fp bytes minus its quantized buffers' bytes"),
        ("layers_restored", float(e["layers_restored"]), "layers", "quantized linear layers the suggested set keeps in fp"),
        ("predicted_kld_mean", e["predicted"]["kld_mean"], "nats",
         "mean KL(fp || Q with the set restored) on the calibration tokens"),
        ("predicted_ppl_ratio", e["predicted"]["ppl_ratio"], "ratio",
         "exp(mean NLL(Q with the set restored) - mean NLL(fp)) on the calibration tokens"),
    ]
    for metric, m in e["verified"]["metrics"].items():
        summary.append((f"verified_{metric}", m["value"], "nats" if metric == "kld_mean" else "ratio",
                        f"ppl stage {metric} of the verification run (set kept in fp) on {m['task']}"))
    summary.append(("verified_pass", 1.0 if e["verified"]["pass"] else 0.0, "bool",
                    "1 when every re-run check of the verification run passes"))
    records += [dict(stage="fix", task="suggestion", variant=variant, metric=m, value=v, unit=u, n=tokens,
                     higher_is_better=None, definition=d) for m, v, u, d in summary]
    from evalsuite.results import Metric

    results.extend([Metric(**r) for r in records])


def describe(variant: str, e: dict) -> str:
    """The fix of one scheme in a few lines, ending with the command that verifies it."""
    from evalsuite.judge.checks import fmt

    if e.get("status") == "not fixable by restoring layers":
        return f"fix {variant}: failing checks {', '.join(e['unfixable'])} are not fixable by keeping layers in fp"
    p, v = e["predicted"], e["verified"]
    ver = ", ".join(f"{k} {fmt(m['value'])}" + (f" [{fmt(m['ci95'][0])}, {fmt(m['ci95'][1])}]" if m.get("ci95") else "")
                    for k, m in v["metrics"].items())
    head = {"verified": "fix", "verification failed": "fix NOT verified",
            "no set within the budget": f"no fix within {e['budget_fraction']:.0%} budget; best found"}[e["status"]]
    checks = e.get("verification_checks") or []
    failed = [c["check"] for c in checks if c.get("verdict") != "PASS"]
    lines = [
        f"{head} {variant}: keep {e['layers_restored']} of {e['layers_quantized']} quantized layers in fp "
        f"({e['params_fraction']:.1%} of linear weights, +{e['bytes_extra'] / 2**20:.2f} MiB): "
        f"predicted on calibration KLD {fmt(p['kld_mean'])} (before {fmt(e['before']['kld_mean'])}), "
        f"ppl ratio {fmt(p['ppl_ratio'])}; verified {ver}: {v['verdict']}"
        + (f" ({len(failed)} of {len(checks)} checks not passed: {', '.join(failed)})" if failed else ""),
    ]
    if e.get("unfixable"):
        lines.append(f"  not addressed (not fixable by keeping layers in fp): {', '.join(e['unfixable'])}")
    lines.append(f"  set: {', '.join(e['set'][:12])}{' …' if len(e['set']) > 12 else ''}")
    lines.append(f"  {e['command']}")
    lines.append(f"  verification checks: {'; '.join(map(describe_check, checks)) or 'none judged'}")
    return "\n".join(lines)


def describe_check(c: dict) -> str:
    """``tasks/pooled/int8-wo/delta_acc -0.05 [-0.07, -0.03] limit -0.02: FAIL``."""
    from evalsuite.judge.checks import fmt

    interval = c.get("interval")
    ci = f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else ""
    limit = f" limit {fmt(c['limit'])}" if c.get("limit") is not None else ""
    return f"{c['check']} {fmt(c.get('value'))}{ci}{limit}: {c.get('verdict')}"


def exit_code(details: dict[str, dict]) -> int:
    return 0 if all(e.get("status") == "verified" for e in details.values()) else 1
