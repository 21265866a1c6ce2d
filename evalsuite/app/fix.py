"""``evalsuite fix RESULTS.json`` and ``evalsuite run --suggest-fix``: for a scheme that fails its
within-run limits, a mixed-precision recipe (one format per quantized linear layer, as few bytes as
the search finds) that passes them, found on a calibration corpus and verified on the evaluation data.

Per failing scheme (costs in ``details.fix.<scheme>.seconds``):

1. formats: each quantized layer's candidates are the failing scheme, ``int4-wo-g32`` for an int4
   scheme of a coarser group, ``int8-wo`` and fp (the layer's own float weights), each with its bytes
   (:func:`evalsuite.measure.sensitivity.layer_formats`);
2. sensitivity, on a calibration slice disjoint from the evaluation windows (default the other
   WikiText-2 split, 4096 tokens): every layer's KLD in every format estimated from one forward and
   one backward of fp (the diagonal Fisher score,
   :func:`evalsuite.measure.sensitivity.fisher_estimates`), a few forwards' cost for all layers;
3. search: moves (a layer to a larger format) by estimated KLD reduction per extra byte, within
   ``--fix-budget`` of extra bytes (:func:`budget_bytes`), until the *measured* KLD and ppl ratio of
   the variant are below ``margin`` x their gate limits (``ln`` of the ratio). ``path``: the greedy
   order of the estimates is fixed, and a bisection on its prefix length measures about log2(moves)
   variants (:func:`evalsuite.measure.sensitivity.path_search`); ``greedy``: every move is re-measured
   on top of the current assignment before it is taken (``greedy_formats``; interactions measured,
   about ten times the path's forwards, a smaller recipe). A failing layer-SQNR check's layers start
   in fp;
4. verification: the recipe is written to ``OUT/fix/<scheme>.recipe.json`` and the failing stages
   re-run on the evaluation data as ``--quant <scheme>-fix=recipe:FILE`` through the session's run
   loop, judged with the failing scheme's limits. A task check that failed in the run sets round 1's
   target below the KLD limit's (:func:`first_target`: the accuracy drop taken as the square root of
   the KLD); if a check still fails, the target is tightened (:func:`tightened`) and the search goes
   on from the recipe, at most ``MAX_ROUNDS`` verifications.
   The verdict of the last verification is the fix's, not the prediction.

Why greedy per byte: the cost of a format is its bytes, and its benefit (the KLD it removes) depends
on the other layers' formats only weakly, so the greedy order of a multiple-choice knapsack is near
its optimum; the path search trusts the estimates for the order only, never for the verdict (each
prefix it keeps is measured, and the recipe is verified on the evaluation data); the frontier
(``details.fix.<scheme>.frontier``) shows the visited assignments beside simple strategies at the
same size, predicted on the calibration slice.

A scheme that passes gets no fix. Speed checks are not fixable by a recipe and are reported so.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalsuite.errors import EvalsuiteError
from evalsuite.results import Results

FIXABLE_STAGES = ("ppl", "tasks", "layers")
DEFAULT_BUDGET = "25%"
MAX_ROUNDS = 3  # verifications per scheme: each costs the failing stages once
NOT_FIXABLE = "not fixable by a recipe"
SEARCHES = ("path", "greedy")
FLOAT = "fp"
_BITS = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:bpw|bits?)$")


@dataclass(frozen=True)
class Budget:
    """``--fix-budget``: a share of the bytes from the scheme to fp (``fraction``), or a ceiling on the
    effective bits per weight (``bits``); see :func:`budget_bytes`."""

    fraction: float | None = None
    bits: float | None = None


def parse_budget(spec: str | float) -> Budget:
    s = str(spec).strip()
    m = _BITS.match(s.lower())
    if m:
        bits = float(m.group(1))
        if not 0 < bits <= 32:
            raise EvalsuiteError(f"--fix-budget {spec!r}: bits per weight must be above 0 and at most 32")
        return Budget(bits=bits)
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise EvalsuiteError(f"--fix-budget {spec!r}: expected a percentage such as 10%, a fraction such as 0.1, "
                             "or an effective bits-per-weight ceiling such as 5.5bpw") from None
    if not 0 < value <= 1:
        raise EvalsuiteError(f"--fix-budget {spec!r}: must be above 0 and at most 100%")
    return Budget(fraction=value)


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
    if fix.search not in SEARCHES:
        raise EvalsuiteError(f"--fix-search {fix.search!r}: expected one of {', '.join(SEARCHES)}")
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


def run_command(argv: list[str] | None, model_path: str, quant: str, skip: list[str], stages: list[str],
                out: str) -> str:
    """The ``evalsuite run`` command of the verification: the run's own options, with this
    ``--quant`` (a recipe: ``NAME=recipe:FILE``), the run's ``--skip-layers`` and these stages."""
    drop = {"--quant", "--skip-layers", "--stages", "--out", "--model"}
    kept, i = [], 0
    argv = list(argv or [])[1:] if argv and argv[0] == "run" else []
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] in drop:
            i += 1 if "=" in a else 2
            continue
        if a == "--suggest-fix" or a == "--fix-verify-strategies":
            i += 1
            continue
        if a.startswith("--fix-"):  # the fix's own options: the verification does not fix
            i += 1 if "=" in a else 2
            continue
        kept.append(a)
        i += 1
    cmd = ["evalsuite", "run", "--model", model_path, *kept, "--quant", quant,
           *(["--skip-layers", ",".join(skip)] if skip else []), "--stages", ",".join(stages), "--out", out]
    return shlex.join(cmd)


def _limits(config, results: Results, variant: str) -> tuple[float, float, str]:
    from evalsuite.judge.within import variant_limits

    pattern, limits = variant_limits(config, results, variant)
    return float(limits["kld_mean_max"]), float(limits["ppl_ratio_max"]), pattern


def budget_bytes(budget: Budget, formats: dict) -> int:
    """``--fix-budget`` in extra weight bytes over the searched layers: a fraction of the bytes that
    every layer in fp would add over the scheme (25%: a quarter of the way from the scheme to fp; the
    same share of the weights kept in fp that the option meant before recipes), or an effective
    bits-per-weight ceiling."""
    scheme = sum(fs[0].bytes for fs in formats.values())
    if budget.bits is not None:
        weights = sum(fs[0].weights for fs in formats.values())
        return max(0, int(budget.bits * weights / 8) - scheme)
    fp = sum(fs[-1].bytes for fs in formats.values())
    return int(budget.fraction * max(fp - scheme, 0))


def accuracy_factor(check: dict, margin: float) -> float | None:
    """For an accuracy-drop check (limit L < 0; value v, the drop ``-v``, its interval's far end lo),
    ``margin x`` the factor by which the KLD must fall for the check's far end to reach its limit,
    the drop taken to scale as the square root of the KLD: a perturbation of size e of the logits
    moves the KLD by ~e^2 and flips the answers whose margin is within ~e, a share ~e of them. The
    interval's half-width (the run's own sampling noise) is kept as measured:
    ``margin ((-L - (v - lo)) / -v)^2``. 0 when that half-width alone exceeds the limit (only a drop
    of nothing would pass); None for another kind of check or a drop that is not one.

    Measured (H100, SmolLM2 int4-wo-g128, pooled drop of 8 tasks): from the scheme's own point (KLD
    0.432, drop 0.0637), the square root predicts 0.0312 / 0.0244 at the recipes' KLD 0.106 / 0.064
    (measured 0.0307 / 0.0184, 2026-12-08) and 0.0331 / 0.0230 at 0.117 / 0.057 (measured 0.0283 /
    0.0100, 2026-12-07): at or above the drop each time, where a drop proportional to the KLD
    (0.0156 / 0.0095 / 0.0172 / 0.0083) was below it each time."""
    v, limit, interval = check.get("value"), check.get("limit"), check.get("interval")
    if limit is None or limit >= 0 or v is None or not interval or interval[0] is None:
        return None
    drop = -float(v)
    if drop <= 0:
        return None
    room = -float(limit) - max(float(v) - float(interval[0]), 0.0)
    return margin * (room / drop) ** 2 if room > 0 else 0.0


def first_target(checks: list[dict], margin: float) -> tuple[float, list[str]] | None:
    """Round 1's KLD factor (of the scheme's own KLD on the calibration slice) from the run's failing
    accuracy-drop checks (:func:`accuracy_factor`, the smallest, at least 0.1), or None when none
    failed: the first recipe aims where the task check would pass, instead of meeting the KLD limit
    and failing the verification on the task."""
    found = [(f, c["check"]) for c in checks if c.get("stage") == "tasks"
             for f in [accuracy_factor(c, margin)] if f is not None]
    if not found:
        return None
    return max(min(f for f, _ in found), 0.1), [name for _, name in found]


def tightened(kld_target: float, ln_ratio_target: float, predicted: dict, checks: list[dict], margin: float,
              ) -> tuple[float, float, str]:
    """The next round's predicted-KLD and ln(ppl ratio) targets after a failed verification: the
    prediction was too optimistic for the evaluation data, so the target drops below what the recipe
    was predicted to reach, by the smallest of each failing gated check's factors:

    - a KLD or ppl-ratio check (verified value v, limit L; ln of a ratio): ``margin L / v``, what would
      have put it at the margin (the KLD scales with the target);
    - an accuracy-drop check: :func:`accuracy_factor` of the verification's own interval (the drop
      taken as the square root of the KLD);
    - any other (a layer's SQNR): a half.

    The factor is at most 0.8 (every round moves) and at least 0.1."""
    factor, why = 1.0, []
    for c in checks:
        if c.get("verdict") == "PASS" or not c.get("gated", True):
            continue
        v, limit = c.get("value"), c.get("limit")
        metric = c["check"].rsplit("/", 1)[-1]
        f = 0.5
        if metric in ("kld_mean", "ppl_ratio") and v and limit and v > 0:
            if metric == "ppl_ratio":
                v, limit = math.log(v), math.log(limit)
            if v > 0 and limit > 0:
                f = margin * limit / v
        elif (acc := accuracy_factor(c, margin)) is not None:
            f = acc
        factor = min(factor, f)
        why.append(c["check"])
    factor = min(max(factor, 0.1), 0.8)
    kld = min(kld_target, factor * predicted["kld_mean"])
    ln_ratio = min(ln_ratio_target, factor * predicted["ln_ppl_ratio"]) if predicted["ln_ppl_ratio"] > 0 \
        else ln_ratio_target
    return kld, ln_ratio, f"x{factor:.2g} of the predicted values, for {', '.join(why) or 'no named check'}"


def suggest(ctx, results: Results, config, fails: dict[str, list[dict]], out_dir: Path, measure) -> dict[str, dict]:
    """Formats, search and verification for each failing scheme of ``fails``; writes
    ``results.details['fix']`` and the ``fix`` records, and returns the details. ``config``: the gate
    limits; ``measure``: the session's run loop, which runs each verification."""
    import torch

    from evalsuite.measure.corpus import load_corpus
    from evalsuite.measure.perplexity import select_stats
    from evalsuite.measure.sensitivity import (
        Counterfactuals,
        calibration_corpus,
        calibration_windows,
        candidate_schemes,
        fisher_estimates,
        fisher_prior,
        layer_formats,
        quantized_layer_names,
    )
    from evalsuite.quantize.base import SchemeConfig

    fix = ctx.config.fix
    budget = parse_budget(fix.budget)
    corpus = calibration_corpus(ctx.option("ppl_corpus") or "wikitext2", fix.corpus)
    text, source, _ = load_corpus(corpus, ctx.data_dir)
    context = int(ctx.option("ppl_context") or 2048)
    if ctx.loaded.info.max_seq_len:
        context = min(context, int(ctx.loaded.info.max_seq_len))
    windows = calibration_windows(ctx.tokenizer, text, int(fix.tokens), context, source)
    stats_fn, _, _ = select_stats(ctx.device, False, ctx.fused_kernels)
    details = results.details.setdefault("fix", {})
    for variant, checks in fails.items():
        t0 = time.perf_counter()
        kld_max, ratio_max, pattern = _limits(config, results, variant)
        margin = float(fix.margin)
        stages = [s for s in dict.fromkeys(c.get("stage") for c in checks) if s]
        unfixable = [c["check"] for c in checks if c.get("stage") not in FIXABLE_STAGES]
        entry: dict[str, Any] = {
            "failing_checks": [c["check"] for c in checks], "limits": {
                "kld_mean_max": kld_max, "ppl_ratio_max": ratio_max, "source": f"gates config: schemes.{pattern}",
                "margin": margin},
            "calibration": {"source": source, "corpus": corpus, "tokens": int(windows.n_scored.sum()),
                            "windows": len(windows), "context": int(windows.input_ids.shape[1])},
            "budget": fix.budget,
        }
        details[variant] = entry
        if unfixable:
            entry["unfixable"] = unfixable
        stages = [s for s in stages if s in FIXABLE_STAGES]
        if stages and "ppl" not in stages and "ppl" in (results.run.get("stages") or []):
            stages = ["ppl", *stages]  # the KLD the search predicts, verified too (the frontier's verified points)
        cfg = ctx.configs[variant]
        if not stages:
            entry["status"] = NOT_FIXABLE
            print(describe(variant, entry))
            continue
        if not isinstance(cfg, SchemeConfig) or cfg.include_head:
            entry.update(status=NOT_FIXABLE, unfixable=[c["check"] for c in checks],
                         reason=f"{getattr(cfg, 'spec', None) or variant} is not a built-in scheme without +head: "
                                "a recipe cannot express its layers")
            print(describe(variant, entry))
            continue
        fp, quantized = ctx.fp, ctx.variants[variant]
        layer_names = quantized_layer_names(quantized)
        formats = layer_formats(fp, layer_names, candidate_schemes(cfg.scheme), quantized)
        limit_bytes = budget_bytes(budget, formats)
        under = {l for c in checks if c.get("stage") == "layers" for l in (c.get("extra") or {}).get("under", [])}
        forced = {n for n in layer_names if n in under}  # a failing layer-SQNR check's layers: in fp from the start
        start = {n: FLOAT for n in forced}
        # several moves a round on a wide model (each still measured on top of the current recipe):
        # rounds, not moves, bound the forwards; one a round on a small one
        batch = max(1, min(8, len(layer_names) // 25))
        name = f"{variant}-fix" if config.scheme(f"{variant}-fix")[0] == pattern else variant
        recipe_path = out_dir / "fix" / f"{variant}.recipe.json"
        verify_dir = out_dir / "fix" / variant
        kld_target, ln_ratio_target = margin * kld_max, margin * math.log(ratio_max)
        rounds: list[dict] = []
        visited: list[dict] = []
        t_search = t_verify = 0.0
        greedy = fix.search == "greedy"
        how = "estimating every layer's KLD in every format (one forward and backward of fp), then " + (
            "a greedy search re-measuring every move" if greedy else
            "measuring the shortest estimated path that meets the target (a bisection)")
        print(f"fix {variant}: {len(layer_names)} layers, {entry['calibration']['tokens']} calibration tokens: {how} "
              f"({', '.join(candidate_schemes(cfg.scheme))})", flush=True)
        with torch.inference_mode(), ctx.fused_forwards(fp, quantized):
            cf = Counterfactuals(fp, quantized, windows.input_ids, ctx.device, stats_fn,
                                 batch_size=len(windows) if ctx.device.type == "cuda" else 1)
        t1 = time.perf_counter()
        est, _ = fisher_estimates(fp, formats, cf.batches, seed=int(ctx.option("seed", 0) or 0))
        prior, sensitivity = fisher_prior(est, formats)
        entry["seconds_estimate"] = round(time.perf_counter() - t1, 3)
        entry["search"] = fix.search
        path: dict[str, Any] = {}  # the path search's state across rounds (_search)
        first = first_target(checks, margin)
        if first is not None:  # a failing task check sets round 1's target below the KLD limit's
            with torch.inference_mode(), ctx.fused_forwards(fp, quantized):
                scheme_kld = cf.measure_modules({})
            path["scheme"] = scheme_kld  # the path search's first measurement, made
            kld_target = min(kld_target, first[0] * scheme_kld.kld_mean)
            entry["first_target"] = {"factor": round(first[0], 4), "checks": first[1],
                                     "scheme_kld_calibration": scheme_kld.kld_mean, "kld_mean": kld_target}
            entry["task_signal"] = TASK_SIGNAL
        search = None
        for k in range(MAX_ROUNDS):
            t1 = time.perf_counter()
            if k:
                print(f"fix {variant}: round {k + 1} of at most {MAX_ROUNDS}, target tightened to KLD "
                      f"{kld_target:.4g}", flush=True)

            def target(m, kt=kld_target, rt=ln_ratio_target) -> bool:
                return m.kld_mean <= kt and m.ln_ppl_ratio <= rt

            with torch.inference_mode(), ctx.fused_forwards(fp, quantized):
                previous = search
                search = _search(greedy, cf, formats, target, limit_bytes, prior, batch, int(fix.rerank), start, path)
            t_search += time.perf_counter() - t1
            # a greedy round's first step is the last round's recipe; a path search's steps are all new
            skip = 1 if k and greedy else 0
            new = [dict(st, round=k + 1) for st in search.steps]
            chosen = new[search.chosen]
            visited += new[skip:]
            if previous is not None and search.assignment == previous.assignment:
                rounds[-1]["note"] = "the tightened target adds nothing within the budget"
                break
            recipe_cfg, command = _write_recipe(ctx, results, variant, name, search.assignment, cfg.scheme,
                                                recipe_path, stages, verify_dir)
            print(f"fix {variant}: recipe at {search.bits_per_weight:.3g} bits/weight, predicted KLD "
                  f"{search.metrics.kld_mean:.4g} ({cf.forwards} forwards so far); verifying it on the evaluation "
                  f"data ({', '.join(stages)})", flush=True)
            t1 = time.perf_counter()
            try:
                verified, checks_after, bits = _verify(ctx, results, config, name, recipe_cfg, stages, verify_dir,
                                                       command, measure)
            except Exception as e:
                entry.update(status="verification failed", error=f"{type(e).__name__}: {e}", command=command)
                raise
            t_verify += time.perf_counter() - t1
            rounds.append({"round": k + 1, "target": {"kld_mean": kld_target, "ln_ppl_ratio": ln_ratio_target},
                           "predicted": search.metrics.to_dict(), "predicted_met": search.met,
                           "stop_reason": search.stop_reason, "bits_per_weight": bits,
                           "extra_bytes": search.extra_bytes, "recipe": recipe_cfg.to_dict(),
                           "verified": verified, "verification_checks": checks_after,
                           "seconds": round(time.perf_counter() - t1, 3)})
            chosen["verified_kld_mean"] = (verified["metrics"].get("kld_mean") or {}).get("value")
            chosen["verdict"] = verified["verdict"]
            if verified["pass"] or not search.met:  # passed, or the budget is spent
                break
            kld_target, ln_ratio_target, why = tightened(kld_target, ln_ratio_target, search.metrics.to_dict(),
                                                         checks_after, margin)
            rounds[-1]["tightened"] = why
            if any(c["check"].startswith("tasks/") and c.get("gated", True) and c.get("verdict") != "PASS"
                   for c in checks_after):
                entry["task_signal"] = TASK_SIGNAL
            forced |= {l for c in checks_after if c.get("verdict") != "PASS"
                       for l in (c.get("extra") or {}).get("under", []) if l in formats}
            # the greedy goes on from its recipe; the path search from the same start, along the same path
            start = {**(search.assignment if greedy else start), **{n: FLOAT for n in forced}}
        last = rounds[-1]
        with torch.inference_mode(), ctx.fused_forwards(fp, quantized):
            frontier = _frontier(ctx, results, config, cf, fp, formats, visited, last, variant, name, cfg.scheme,
                                 stages, out_dir, measure, bool(getattr(fix, "verify_strategies", False)))
            frontier.append(_fp_only(cf, formats, target, limit_bytes, batch, int(fix.rerank), prior, cfg.scheme,
                                     greedy))
        forwards = cf.forwards
        del cf
        ok = last["verified"]["pass"]
        # in the order the search raised them (the first is the one it found most worth its bytes)
        order = [*(m.split("=", 1)[0] for st in visited for m in st["moves"]), *sorted(forced), *search.assignment]
        raised = {n: search.assignment[n] for n in dict.fromkeys(order) if search.assignment[n] != cfg.scheme}
        entry.update({
            "status": "verified" if ok else ("verification failed" if search.met else "no recipe within the budget"),
            "predicted_met": search.met, "stop_reason": search.stop_reason,
            "recipe": str(recipe_path), "recipe_content": last["recipe"], "variant_name": name,
            "set": list(raised), "raised": raised, "forced": sorted(forced),
            "layers_raised": len(raised), "layers_quantized": len(layer_names),
            "layers_by_scheme": _count(search.assignment), "bits_per_weight": last["bits_per_weight"],
            "bits_per_weight_scheme": 8 * sum(fs[0].bytes for fs in formats.values())
                                      / max(1, sum(fs[0].weights for fs in formats.values())),
            "bytes_extra": search.extra_bytes, "budget_bytes": limit_bytes,
            "predicted": search.metrics.to_dict(), "before": search.baseline.to_dict(),
            "steps": visited, "rounds": rounds, "sensitivity": sensitivity, "frontier": frontier,
            "verified": last["verified"], "verification_checks": last["verification_checks"],
            "command": _command(results, ctx, name, recipe_path, stages, verify_dir),
            "seconds": {"sensitivity_and_search": round(time.perf_counter() - t0 - t_verify, 3),
                        "verification": round(t_verify, 3), "forwards": forwards, "rounds": len(rounds)},
        })
        ppl_s = (results.run.get("stage_seconds") or {}).get("ppl")
        if ppl_s and len(results.run.get("schemes") or []) == 1:
            # the cost target: the whole fix within 4x one ppl stage of the same variant
            entry["seconds"]["over_ppl_stage"] = round((time.perf_counter() - t0) / ppl_s, 3)
        _records(results, variant, entry)
        print(describe(variant, entry), flush=True)
        ctx.checkpoint()
    return details


def _count(assignment: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in assignment.values():
        out[s] = out.get(s, 0) + 1
    return out


def _command(results: Results, ctx, name: str, recipe_path: Path, stages: list[str], out: Path) -> str:
    return run_command(results.run.get("argv"), str(ctx.loaded.info.path), f"{name}=recipe:{recipe_path}",
                       list(ctx.skip), stages, str(out))


def _write_recipe(ctx, results: Results, variant: str, name: str, assignment: dict[str, str], scheme: str,
                  path: Path, stages: list[str], verify_dir: Path):
    """Write the recipe file (rank 0) and read it back as ``--quant NAME=recipe:FILE`` would; with the
    verification's command."""
    import json

    from evalsuite.measure.sensitivity import to_recipe
    from evalsuite.quantize import parse_scheme

    if getattr(ctx, "rank", 0) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_recipe(scheme, assignment), indent=1) + "\n")
    return parse_scheme(f"{name}=recipe:{path}"), _command(results, ctx, name, path, stages, verify_dir)


def _frontier(ctx, results: Results, config, cf, fp, formats: dict, visited: list[dict], last: dict, variant: str,
              name: str, scheme: str, stages: list[str], out_dir: Path, measure, verify: bool) -> list[dict]:
    """The size-quality points: each assignment the search visited (predicted on the calibration
    slice; verified where a round verified it) and the simple strategies at the recipe's extra bytes
    (predicted; verified too with ``--fix-verify-strategies``)."""
    from evalsuite.measure.sensitivity import (
        bits_per_weight,
        extra_bytes,
        measure_assignment,
        simple_strategies,
    )

    points = [{"strategy": "search", "round": st["round"], "bits_per_weight": st["bits_per_weight"],
               "extra_bytes": st["extra_bytes"], "predicted_kld_mean": st["kld_mean"],
               "predicted_ppl_ratio": st["ppl_ratio"],
               **({"verified_kld_mean": st["verified_kld_mean"], "verdict": st["verdict"]}
                  if "verdict" in st else {})} for st in visited]
    seed = int(ctx.option("seed", 0) or 0)
    for sname, s in simple_strategies(fp, formats, last["extra_bytes"], seed=seed).items():
        if "skipped" in s:
            points.append({"strategy": sname, "skipped": s["skipped"]})
            continue
        a = {n: s["assignment"].get(n, scheme) for n in formats}
        m = measure_assignment(cf, formats, a)
        point = {"strategy": sname, "bits_per_weight": bits_per_weight(formats, a), "extra_bytes": extra_bytes(formats, a),
                 "predicted_kld_mean": m.kld_mean, "predicted_ppl_ratio": m.ppl_ratio,
                 "layers_raised": sum(1 for v in a.values() if v != scheme)}
        if verify:
            slug = sname.replace("_", "-")
            cfg, command = _write_recipe(ctx, results, variant, f"{name}.{slug}", a, scheme,
                                         out_dir / "fix" / f"{variant}.{slug}.recipe.json", stages,
                                         out_dir / "fix" / f"{variant}.{slug}")
            verified, _, _ = _verify(ctx, results, config, f"{name}.{slug}", cfg, stages,
                                     out_dir / "fix" / f"{variant}.{slug}", command, measure)
            point.update(verified_kld_mean=(verified["metrics"].get("kld_mean") or {}).get("value"),
                         verdict=verified["verdict"])
        points.append(point)
    return points


def _search(greedy: bool, cf, formats: dict, target, limit_bytes: int, prior: dict, batch: int, rerank: int,
            start: dict[str, str] | None = None, state: dict | None = None):
    """``--fix-search``'s search from ``start``: the measured greedy, or the bisected path. ``state``
    (the path search's, across rounds): its path and measured prefixes, kept while ``start`` stays the
    same, so that a tightened round goes on along the path; a new start begins a new one."""
    from evalsuite.measure.sensitivity import greedy_formats, path_search

    if greedy:
        return greedy_formats(cf, formats, target, limit_bytes, batch=batch, rerank=rerank, start=start, prior=prior)
    state = {} if state is None else state
    if state.get("start") != (start or {}):
        state.update(start=dict(start or {}), known={}, path=None)
    search = path_search(cf, formats, target, limit_bytes, prior, start=start, path=state["path"],
                         known=state["known"], scheme=state.get("scheme"))
    state["path"] = search.path
    return search


def _fp_only(cf, formats: dict, target, limit_bytes: int, batch: int, rerank: int, prior: dict, scheme: str,
             greedy: bool) -> dict:
    """The point of the fix as it was before per-layer formats: the same search and final target, each
    layer either in the scheme or in fp (predicted on the calibration slice), to set the recipe's bits
    per weight beside."""
    two = {n: [fs[0], fs[-1]] for n, fs in formats.items()}  # a layer's formats run up to fp
    prior2 = {(n, 1): r for (n, j), r in prior.items() if j == len(formats[n]) - 1}
    search = _search(greedy, cf, two, target, limit_bytes, prior2, batch, rerank)
    return {"strategy": "fp-only search", "bits_per_weight": search.bits_per_weight, "extra_bytes": search.extra_bytes,
            "predicted_kld_mean": search.metrics.kld_mean, "predicted_ppl_ratio": search.metrics.ppl_ratio,
            "layers_raised": sum(1 for v in search.assignment.values() if v != scheme),
            "target_met": search.met, "stop_reason": search.stop_reason}


def _verify(ctx, results: Results, config, name: str, recipe_cfg, stages: list[str], out_dir: Path, command: str,
            measure) -> tuple[dict, list[dict], float]:
    """Re-run ``stages`` for the recipe variant ``name`` on the evaluation data (``measure``: the
    session's run loop, on the run's config); judge it with the limits of ``name`` (those of the
    failing scheme). A stage that raises is recorded in the verification's results.json, which is
    written either way. Returns the verdict, the checks and the recipe's effective bits per weight."""
    from evalsuite.judge.checks import PASS, finalize
    from evalsuite.judge.within import within_run_checks
    from evalsuite.measure.context import RunContext
    from evalsuite.quantize import quantize_
    from evalsuite.quantize.recipe import describe as describe_recipe

    t0 = time.perf_counter()
    model = quantize_(copy.deepcopy(ctx.fp), recipe_cfg, skip=tuple(ctx.skip))
    quant_details = describe_recipe(recipe_cfg, model)
    # the gate's checks do not need the noise floor; it costs a third of the ppl stage
    vconfig = ctx.config.with_options(ppl_noise_floor="off")
    run = {**results.run, "argv": shlex.split(command)[1:], "schemes": [name], "stages": stages,
           "fix_verification_of": name, "quant_specs": {name: recipe_cfg.spec},
           "quant_details": {name: quant_details},
           "stage_seconds": {}, "partial": bool(results.run.get("partial")), "config": vconfig.to_record()}
    vres = Results(run=run)
    vctx = RunContext(loaded=ctx.loaded, variants={"fp": ctx.fp, name: model}, configs={name: recipe_cfg},
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
              if c.variant == name and c.stage in stages]
    vres.verdicts = [c.to_dict() for c in checks]
    if getattr(ctx, "rank", 0) == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        vres.save(out_dir / "results.json")
    metrics = {}
    for metric in ("kld_mean", "ppl_ratio"):
        for m in vres.find(stage="ppl", variant=name, metric=metric):
            metrics[metric] = {"task": m.task, "value": m.value, "ci95": m.ci95, "n": m.n}
    # the fix passes when every gated check passes (a task's own check, reported beside the pooled one,
    # does not gate the run and does not gate the fix); an INCONCLUSIVE gated check has not passed
    gated = [c for c in checks if c.gated]
    ok = bool(gated) and all(c.verdict == PASS for c in gated)
    verified = {"pass": ok, "verdict": "PASS" if ok else "FAIL", "metrics": metrics,
                "results": str(out_dir / "results.json"), "stage_seconds": vres.run["stage_seconds"],
                "seconds": round(time.perf_counter() - t0, 3)}
    return verified, [{"check": c.check, "verdict": c.verdict, "value": c.value, "interval": c.interval,
                       "limit": c.limit, "gated": bool(c.gated), **({"extra": {"under": c.extra["under"]}}
                                            if (c.extra or {}).get("under") else {})} for c in checks], \
        quant_details["bits_per_weight"]


TASK_SIGNAL = ("the failing task check's own value and interval (in the run for round 1, in the last verification "
               "after it): the KLD target set where its interval's far end would reach the limit, times the margin, "
               "the accuracy drop taken as the square root of the KLD (no calibration items of its own)")

KLD_EST_DEF = ("estimated sensitivity: the KLD of fp with only this layer in the scheme, by the diagonal Fisher "
               "score (1/2 sum over tokens and output channels of (gradient x output change)^2, labels drawn from "
               "fp); on {source}, {tokens} calibration tokens disjoint from the evaluation windows")


def _records(results: Results, variant: str, e: dict) -> None:
    from evalsuite.results import Metric

    cal = e["calibration"]
    tokens = cal["tokens"]
    definition = KLD_EST_DEF.format(source=cal["source"], tokens=tokens)
    records = [dict(stage="fix", task=name, variant=variant, metric="kld_drop", value=v, unit="nats", n=tokens,
                    higher_is_better=None, definition=definition) for name, v in e["sensitivity"].items()]
    summary = [
        ("bits_per_weight", e["bits_per_weight"], "bits",
         "effective bits per weight of the recipe: 8 x bytes of the linear layers' stored weights (codes, scales, "
         "zeros; float layers at their dtype; no biases; output head excluded) / their number of weights"),
        ("bytes_extra", float(e["bytes_extra"]), "bytes",
         "weight bytes the recipe adds over every quantized layer in the failing scheme"),
        ("layers_raised", float(e["layers_raised"]), "layers",
         "quantized linear layers the recipe gives a larger format than the failing scheme"),
        ("predicted_kld_mean", e["predicted"]["kld_mean"], "nats",
         "mean KL(fp || the recipe's variant) on the calibration tokens"),
        ("predicted_ppl_ratio", e["predicted"]["ppl_ratio"], "ratio",
         "exp(mean NLL(the recipe's variant) - mean NLL(fp)) on the calibration tokens"),
        ("verification_rounds", float(e["seconds"]["rounds"]), "rounds",
         "verification runs on the evaluation data (each after a search on the calibration tokens)"),
    ]
    for metric, m in e["verified"]["metrics"].items():
        summary.append((f"verified_{metric}", m["value"], "nats" if metric == "kld_mean" else "ratio",
                        f"ppl stage {metric} of the last verification run (the recipe) on {m['task']}"))
    summary.append(("verified_pass", 1.0 if e["verified"]["pass"] else 0.0, "bool",
                    "1 when every re-run check of the last verification run passes"))
    records += [dict(stage="fix", task="suggestion", variant=variant, metric=m, value=v, unit=u, n=tokens,
                     higher_is_better=None, definition=d) for m, v, u, d in summary]
    results.extend([Metric(**r) for r in records])


def describe(variant: str, e: dict) -> str:
    """The fix of one scheme in a few lines, ending with every check of the verification run."""
    from evalsuite.judge.checks import fmt

    if e.get("status") == NOT_FIXABLE:
        why = e.get("reason") or "a recipe of per-layer formats does not change them"
        return f"fix {variant}: failing checks {', '.join(e['unfixable'])} are not fixable by a recipe ({why})"
    p, v = e["predicted"], e["verified"]
    ver = ", ".join(f"{k} {fmt(m['value'])}" + (f" [{fmt(m['ci95'][0])}, {fmt(m['ci95'][1])}]" if m.get("ci95") else "")
                    for k, m in v["metrics"].items())
    head = {"verified": "fix", "verification failed": "fix NOT verified",
            "no recipe within the budget": f"no fix within the {e['budget']} budget; best found"}[e["status"]]
    checks = e.get("verification_checks") or []
    failed = [c["check"] for c in checks if c.get("gated", True) and c.get("verdict") != "PASS"]
    gated = sum(1 for c in checks if c.get("gated", True))
    by_scheme = ", ".join(f"{n} {s}" for s, n in e["layers_by_scheme"].items())
    rounds = e["seconds"]["rounds"]
    lines = [
        f"{head} {variant}: recipe at {e['bits_per_weight']:.3g} bits/weight (the scheme alone "
        f"{e['bits_per_weight_scheme']:.3g}; +{e['bytes_extra'] / 2**20:.2f} MiB), {e['layers_raised']} of "
        f"{e['layers_quantized']} quantized layers raised ({by_scheme}): predicted on calibration KLD "
        f"{fmt(p['kld_mean'])} (before {fmt(e['before']['kld_mean'])}), ppl ratio {fmt(p['ppl_ratio'])}; "
        f"verified {ver or 'no ppl stage'}: {v['verdict']} after {rounds} verification round{'s' if rounds > 1 else ''}"
        + (f" ({len(failed)} of {gated} gated checks not passed: {', '.join(failed)})" if failed else ""),
    ]
    if e.get("unfixable"):
        lines.append(f"  not addressed (not fixable by a recipe): {', '.join(e['unfixable'])}")
    raised = [f"{n}={s}" for n, s in e["raised"].items()]
    lines.append(f"  raised: {', '.join(raised[:8]) or 'none'}{' …' if len(raised) > 8 else ''}")
    lines.append(f"  recipe: {e['recipe']}")
    lines.append(f"  {e['command']}")
    lines.append(f"  verification checks: {'; '.join(map(describe_check, checks)) or 'none judged'}")
    return "\n".join(lines)


def describe_check(c: dict) -> str:
    """``tasks/pooled/int8-wo/delta_acc -0.05 [-0.07, -0.03] limit -0.02: FAIL``."""
    from evalsuite.judge.checks import fmt

    interval = c.get("interval")
    ci = f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else ""
    limit = f" limit {fmt(c['limit'])}" if c.get("limit") is not None else ""
    return f"{c['check']} {fmt(c.get('value'))}{ci}{limit}: {c.get('verdict')}" \
        + ("" if c.get("gated", True) else " (reported, not gated)")


def exit_code(details: dict[str, dict]) -> int:
    return 0 if all(e.get("status") == "verified" for e in details.values()) else 1
