"""Paired baseline checks: this run against its baseline window by window and item by item.

Both runs score the same windows and items, so the corpus' and the task's sampling error cancel and
what remains is run-to-run noise; a tolerance taken from a metric's own standard error (how well
the data set estimates it) is 10-1000x wider than that, and misses harness bugs. A baseline
therefore keeps what pairing needs, in a compressed ``.npz`` beside its JSON:

- ppl: per window (same corpus windows, checked by their start offsets) the NLL sum and scored
  tokens of each variant, and for a quantized one its KLD sum and its top-1% KLD sum and count;
- tasks: per task the doc ids, per-item ``acc`` / ``acc_norm`` (1/0) and per-choice log-likelihoods;
- gen: the prompts' keys (``details.gen.prompt_keys``: source and token ids hashed), the new-token
  budget, and per prompt of each variant (``fp@noise`` with fp) ``identical`` (its greedy generation
  equals fp's) and ``divergence`` (tokens before the first difference).

The gated (primary) statistics, per variant group, each a one-sided test that the candidate is no
worse than the baseline by more than a margin (``evalsuite.judge.noise``):

- ``ppl/<corpus>/<variant>/nll_shift``      mean NLL shift, nats/token (fp and the scheme: a harness
                                             bug moves both);
- ``ppl/<corpus>/<scheme>/kld_mean_rel``    relative change of the mean KLD;
- ``ppl/<corpus>/<scheme>/kld_top1pct_rel`` relative change of the windows' top-1% KLD (the tail);
- ``tasks/pooled/<variant>/acc_shift``      accuracy over all tasks' items, from the flips;
- ``gen/generation/<scheme>/identical_shift`` the fraction of prompts whose greedy generation equals
                                             fp's, from the prompts that flip (same prompts only: the
                                             keys and the token budget must match, else SKIPPED).

Per-task accuracy and log-likelihood shifts, the tokens to the first divergence and ``fp@noise``'s
identical fraction (the dtype's own rounding, not a property of the code) are reported, not gated.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from evalsuite.errors import EvalsuiteError
from evalsuite.judge.checks import (FAIL, IMPROVED, INCOMPLETE, INCONCLUSIVE, PASS, SKIPPED, WITHIN_NOISE, WORSE, Z95, Check,
                                    fmt)
from evalsuite.judge.noise import NoiseModel
from evalsuite.results import Results
from evalsuite import stats

PAIRED_SUFFIX = ".npz"


def variant_group(variant: str) -> str:
    return variant.split("@", 1)[0]


# ---- what a run measured, per window and per item ----

def paired_arrays(results: Results, group: str) -> dict[str, np.ndarray]:
    """The per-window and per-item arrays of one variant group of a results file."""
    out: dict[str, np.ndarray] = {}
    ppl = results.details.get("ppl") or {}
    task = ppl.get("task")
    windows = ppl.get("windows") or {}
    if task and windows.get("start") is not None:
        out[f"ppl/{task}/window_start"] = np.asarray(windows["start"], dtype=np.int64)
        for v, det in (ppl.get("variants") or {}).items():
            if variant_group(v) == group and "nll_sum" in det:
                out[f"ppl/{task}/{v}/nll_sum"] = np.asarray(det["nll_sum"], dtype=np.float64)
                out[f"ppl/{task}/{v}/n"] = np.asarray(det["n_finite"], dtype=np.int64)
        for v, det in (ppl.get("paired") or {}).items():
            if variant_group(v) != group or "kld_sum" not in det:
                continue
            out[f"ppl/{task}/{v}/kld_sum"] = np.asarray(det["kld_sum"], dtype=np.float64)
            out[f"ppl/{task}/{v}/kld_n"] = np.asarray(det["n"], dtype=np.int64)
            if "kld_top1pct_sum" in det:
                out[f"ppl/{task}/{v}/kld_top_sum"] = np.asarray(det["kld_top1pct_sum"], dtype=np.float64)
                out[f"ppl/{task}/{v}/kld_top_n"] = np.asarray(det["kld_top1pct_n"], dtype=np.int64)
    for name, entry in (results.details.get("tasks") or {}).items():
        if not isinstance(entry, dict) or "doc_ids" not in entry:
            continue
        mine = {v: vals for v, vals in (entry.get("values") or {}).items() if variant_group(v) == group}
        if not mine:
            continue
        out[f"tasks/{name}/doc_ids"] = np.asarray(entry["doc_ids"], dtype=np.int64)
        for v, vals in mine.items():
            for metric in ("acc", "acc_norm"):
                if metric in vals and all(isinstance(x, (int, float, bool)) for x in vals[metric]):
                    out[f"tasks/{name}/{v}/{metric}"] = np.asarray(vals[metric], dtype=np.float64) > 0.5
            lls = entry.get("loglikelihoods")  # "not applicable" for a generative task
            ll = lls.get(v) if isinstance(lls, dict) else None
            if ll:
                out[f"tasks/{name}/{v}/ll"] = np.asarray([x for doc in ll for x in doc], dtype=np.float32)
                out[f"tasks/{name}/{v}/ll_count"] = np.asarray([len(doc) for doc in ll], dtype=np.int32)
    gen = results.details.get("gen") or {}
    mine = {v: d for v, d in (gen.get("paired") or {}).items() if variant_group(v) == group and isinstance(d, dict)}
    if mine:
        if gen.get("prompt_keys") is not None:
            out["gen/generation/prompt_keys"] = np.asarray([str(k) for k in gen["prompt_keys"]], dtype=np.str_)
        if gen.get("new_tokens") is not None:
            out["gen/generation/new_tokens"] = np.asarray(int(gen["new_tokens"]), dtype=np.int64)
        for v, d in mine.items():
            out[f"gen/generation/{v}/identical"] = np.asarray(d.get("identical") or [], dtype=np.float64) > 0.5
            out[f"gen/generation/{v}/divergence"] = np.asarray(d.get("divergence") or [], dtype=np.float64)
    return out


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` compressed to ``path``; returns the file's sha256."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def load_arrays(path: Path, sha256: str | None) -> dict[str, np.ndarray]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalsuiteError(f"{path}: the baseline's paired data file cannot be read ({e.strerror}); "
                             f"regenerate the baseline with 'evalsuite baseline update'") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise EvalsuiteError(f"{path}: paired data file does not match its baseline (sha256 differs); "
                             f"regenerate the baseline with 'evalsuite baseline update'")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise EvalsuiteError(f"{path}: corrupt paired data file ({e})") from None


# ---- how a run was measured ----

def _argv_option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def measured_how(results: Results) -> dict[str, Any]:
    """The facts of a run that change bf16 numerics but not what is measured."""
    run = results.run
    argv = [str(a) for a in run.get("argv") or []]
    versions = run.get("versions") or {}
    protocol = ((results.details.get("ppl") or {}).get("protocol")) or {}
    return {
        "git_revision": run.get("git_revision"),
        "kernels": run.get("kernels", "fused"),
        "dtype": run.get("dtype"),
        "device_name": (run.get("device") or {}).get("name"),
        "versions": {k: versions.get(k) for k in ("torch", "transformers", "lm_eval", "evalsuite") if k in versions},
        "ppl_batch": protocol.get("batch_size"),
        "ppl_stats": protocol.get("stats"),
        "ppl_protocol": protocol.get("description"),
        "task_packing": _argv_option(argv, "--task-packing") or "auto",
        "task_batch_size": _argv_option(argv, "--task-batch-size"),
        "task_batch_tokens": _argv_option(argv, "--task-batch-tokens"),
        "lm_adapter": _argv_option(argv, "--lm-adapter") or "fast",
        "world_size": run.get("world_size", 1),
    }


PATH_KEYS = ("kernels", "ppl_batch", "ppl_stats", "task_packing", "task_batch_size", "task_batch_tokens",
             "lm_adapter", "world_size", "device_name")


def path_differences(base: dict[str, Any] | None, cand: dict[str, Any]) -> list[str]:
    """How the candidate was measured differently from the baseline (empty: the same way)."""
    if not base:
        return ["the baseline does not record how it was measured"]
    out = [f"{k} {cand.get(k)} vs baseline {base.get(k)}" for k in PATH_KEYS if base.get(k) != cand.get(k)]
    bv, cv = base.get("versions") or {}, cand.get("versions") or {}
    out += [f"{k} {cv.get(k)} vs baseline {bv.get(k)}" for k in ("torch", "transformers", "lm_eval")
            if bv.get(k) and cv.get(k) and bv[k] != cv[k]]
    return out


# ---- the checks ----

def drift_check(name: str, key: str, statistic: str, unit: str, estimate: float, se: float, clusters: int,
                what: str, worse_sign: float, noise: NoiseModel, cross_path: bool, alpha: float, gated: bool,
                extra: dict[str, Any] | None = None, **common: Any) -> Check:
    """One paired statistic against its margin: FAIL when it is significantly worse than the margin
    (one-sided, Student's t over the clusters), IMPROVED when significantly better, WITHIN-NOISE
    when beyond the margin but not significantly, PASS inside it; INCONCLUSIVE without an uncertainty."""
    margin, margin_src = noise.margin(key, cross_path)
    df = clusters - 1 if clusters >= 2 else None
    info = dict(statistic=statistic, unit=unit, se=se, margin=margin, clusters=clusters, df=df,
                noise=noise.source, **(extra or {}))
    head = f"{common.get('metric', key.rsplit('/', 1)[-1])}, the {statistic}: {fmt(estimate)} {unit}"
    if clusters >= 2 and not (math.isfinite(estimate) and math.isfinite(se)):
        reason = (f"{head}, se {fmt(se)} over {clusters} {what}: not finite (a NaN or inf in the per-window or "
                  f"per-item data of this run or its baseline): not judged [margin ±{fmt(margin)} = {margin_src}]")
        return Check(name, "baseline", INCOMPLETE, reason, gated=None if gated else False, extra=info, **common)
    if not (math.isfinite(estimate) and math.isfinite(se)) or clusters < 2:
        reason = (f"{head} over {clusters} {what}: no uncertainty from fewer than 2 {what}, so no verdict "
                  f"[margin ±{fmt(margin)} = {margin_src}]")
        return Check(name, "baseline", INCONCLUSIVE, reason, gated=False, extra=info, **common)
    worse = worse_sign * estimate
    p = stats.one_sided_p(worse - margin, se, df)
    p_better = stats.one_sided_p(-worse - margin, se, df)
    unc = f"se {fmt(se, 3)} over {clusters} {what} (paired, t with {df} df)"
    basis = f"margin ±{fmt(margin)} = {margin_src}"
    if p < alpha:
        verdict, word = FAIL, "worse beyond the margin"
    elif p_better < alpha:
        verdict, word = IMPROVED, "better beyond the margin"
    elif worse > margin:
        verdict, word = WITHIN_NOISE, "beyond the margin but not significantly"
    else:
        verdict, word = PASS, "inside the margin"
    if not gated and verdict == FAIL:
        verdict = WORSE
    reason = f"{head}, {unc}: {word} [{basis}; one-sided p {fmt(p, 2)} that it is no worse than the margin]"
    if not gated:
        reason = "reported, not gated: " + reason
    return Check(name, "baseline", verdict, reason, gated=gated, p_value=p if gated else None,
                 interval=[estimate - Z95 * se, estimate + Z95 * se], tolerance=margin, value=estimate,
                 fallback=(WITHIN_NOISE, ""), extra=info, **common)


def unpaired_checks(group: str, primaries: list[str], why: str, **common: Any) -> list[Check]:
    return [Check(f"baseline:{k}", "baseline", INCONCLUSIVE, f"unpaired: {why}; not judged (never a PASS)",
                  variant=group, gated=False, **common) for k in primaries]


def primary_keys(baseline_arrays: dict[str, np.ndarray] | None, baseline_metrics, group: str) -> list[str]:
    """The gated statistics a baseline of ``group`` would have (for the unpaired message)."""
    tasks = {m.task for m in baseline_metrics if m.stage == "ppl"}
    keys = [f"ppl/{t}/{group}/nll_shift" for t in sorted(tasks)]
    if group != "fp":
        keys += [f"ppl/{t}/{group}/{s}" for t in sorted(tasks) for s in ("kld_mean_rel", "kld_top1pct_rel")]
    if any(m.stage == "tasks" for m in baseline_metrics):
        keys.append(f"tasks/pooled/{group}/acc_shift")
    if group != "fp" and any(m.stage == "gen" and m.variant == group for m in baseline_metrics):
        keys.append(f"gen/generation/{group}/identical_shift")
    return keys


def paired_checks(base: dict[str, np.ndarray], cand: dict[str, np.ndarray], group: str, noise: NoiseModel,
                  differences: list[str], alpha: float) -> list[Check]:
    """Every paired statistic of ``group`` that both runs hold."""
    cross = bool(differences)
    path_note = {"path": "measured another way: " + "; ".join(differences) + " (cross-path noise applies)"} \
        if cross else {"path": "measured the same way as the baseline (same-path noise applies)"}
    checks: list[Check] = []
    args = dict(noise=noise, cross_path=cross, alpha=alpha)

    def add(c: Check) -> None:
        if cross:
            c.reason += f"; {path_note['path']}"
        checks.append(c)

    for key in sorted(k for k in base if k.startswith("ppl/") and k.endswith("/window_start")):
        task = key.split("/")[1]
        if key not in cand:
            continue
        if base[key].shape != cand[key].shape or not np.array_equal(base[key], cand[key]):
            checks.append(Check(f"baseline:ppl/{task}/{group}/paired", "baseline", SKIPPED,
                                f"different windows: baseline {base[key].size}, this run {cand[key].size} "
                                f"(another protocol or --limit); not paired", stage="ppl", task=task, variant=group))
            continue
        v = group
        common = dict(stage="ppl", task=task, variant=v)
        nb, nc = base.get(f"ppl/{task}/{v}/nll_sum"), cand.get(f"ppl/{task}/{v}/nll_sum")
        if nb is not None and nc is not None:
            n = base[f"ppl/{task}/{v}/n"]
            est, se, k = stats.paired_ratio_shift(nb, nc, n)
            add(drift_check(f"baseline:ppl/{task}/{v}/nll_shift", f"ppl/{task}/{v}/nll_shift",
                            "paired per-window mean NLL shift (this run - baseline)", "nats/token", est, se, k,
                            "windows", +1, gated=True, metric="nll_shift", **args, **common))
        if group == "fp":
            continue
        kb, kc = base.get(f"ppl/{task}/{v}/kld_sum"), cand.get(f"ppl/{task}/{v}/kld_sum")
        if kb is not None and kc is not None:
            est, se, k = stats.paired_relative_change(kb, kc, base[f"ppl/{task}/{v}/kld_n"], cand[f"ppl/{task}/{v}/kld_n"])
            add(drift_check(f"baseline:ppl/{task}/{v}/kld_mean_rel", f"ppl/{task}/{v}/kld_mean_rel",
                            "paired per-window relative change of mean KLD", "(fraction)", est, se, k, "windows", +1,
                            gated=True, metric="kld_mean_rel", **args, **common))
        tb, tc = base.get(f"ppl/{task}/{v}/kld_top_sum"), cand.get(f"ppl/{task}/{v}/kld_top_sum")
        if tb is not None and tc is not None:
            est, se, k = stats.paired_relative_change(tb, tc, base[f"ppl/{task}/{v}/kld_top_n"],
                                                      cand[f"ppl/{task}/{v}/kld_top_n"])
            add(drift_check(f"baseline:ppl/{task}/{v}/kld_top1pct_rel", f"ppl/{task}/{v}/kld_top1pct_rel",
                            "paired per-window relative change of the top-1% KLD mean", "(fraction)", est, se, k,
                            "windows", +1, gated=True, metric="kld_top1pct_rel", **args, **common))
        elif kb is not None:
            checks.append(Check(f"baseline:ppl/{task}/{v}/kld_top1pct_rel", "baseline", INCONCLUSIVE,
                                "the baseline or this run has no per-window top-1% KLD (older code); tail not judged",
                                **common))

    pooled = {"acc_b": [], "acc_c": []}
    ll_b, ll_c = [], []
    for key in sorted(k for k in base if k.startswith("tasks/") and k.endswith("/doc_ids")):
        task = key.split("/")[1]
        if key not in cand:
            continue
        ids_b, ids_c = base[key], cand[key]
        if ids_b.shape == ids_c.shape and np.array_equal(ids_b, ids_c):
            ib = ic = np.arange(ids_b.size)
        else:  # another --limit or task version: pair the items both scored
            _, ib, ic = np.intersect1d(ids_b, ids_c, return_indices=True)
        if ib.size == 0:
            continue
        for metric in ("acc", "acc_norm"):
            ab, ac = base.get(f"tasks/{task}/{group}/{metric}"), cand.get(f"tasks/{task}/{group}/{metric}")
            if ab is None or ac is None or ab.size != ids_b.size or ac.size != ids_c.size:
                continue
            a, b = ab[ib], ac[ic]
            if metric == "acc":
                pooled["acc_b"].append(a)
                pooled["acc_c"].append(b)
            est, se, n, r2w, w2r = stats.paired_flip_shift(a, b)
            add(drift_check(f"baseline:tasks/{task}/{group}/{metric}_shift", f"tasks/{task}/{group}/{metric}_shift",
                            f"paired {metric} shift (this run - baseline; flips right→wrong {r2w}, wrong→right {w2r})",
                            "(fraction)", est, se, n, "items", -1, gated=False, stage="tasks", task=task,
                            variant=group, metric=f"{metric}_shift", **args))
        lb, lc = base.get(f"tasks/{task}/{group}/ll"), cand.get(f"tasks/{task}/{group}/ll")
        cb, cc = base.get(f"tasks/{task}/{group}/ll_count"), cand.get(f"tasks/{task}/{group}/ll_count")
        if lb is not None and lc is not None and cb is not None and cc is not None:
            sb, sc = _per_doc_sums(lb, cb), _per_doc_sums(lc, cc)
            if sb.size == ids_b.size and sc.size == ids_c.size and np.array_equal(cb[ib], cc[ic]):
                ll_b.append(sb[ib])
                ll_c.append(sc[ic])
                pooled.setdefault("ll_n", []).append(cb[ib].astype(np.float64))
    if pooled["acc_b"]:
        a, b = np.concatenate(pooled["acc_b"]), np.concatenate(pooled["acc_c"])
        est, se, n, r2w, w2r = stats.paired_flip_shift(a, b)
        add(drift_check(f"baseline:tasks/pooled/{group}/acc_shift", f"tasks/pooled/{group}/acc_shift",
                        f"paired accuracy shift over all tasks' items (this run - baseline; flips right→wrong {r2w}, "
                        f"wrong→right {w2r})", "(fraction)", est, se, n, "items", -1, gated=True, stage="tasks",
                        task="pooled", variant=group, metric="acc_shift", **args))
    if ll_b:
        est, se, k = stats.paired_ratio_shift(np.concatenate(ll_b), np.concatenate(ll_c),
                                              np.concatenate(pooled["ll_n"]))
        add(drift_check(f"baseline:tasks/pooled/{group}/ll_shift", f"tasks/pooled/{group}/ll_shift",
                        "paired mean log-likelihood shift per choice over all tasks' items", "nats", est, se, k,
                        "items", -1, gated=False, stage="tasks", task="pooled", variant=group, metric="ll_shift",
                        **args))
    checks += _gen_checks(base, cand, group, add, args)
    return checks


def _gen_checks(base: dict[str, np.ndarray], cand: dict[str, np.ndarray], group: str, add, args: dict) -> list[Check]:
    """The gen stage's per-prompt statistics against the baseline's, on the same prompts only.
    ``add`` appends a judged check (with the path note); what is returned are the SKIPPED ones."""
    variants = sorted(k.split("/")[2] for k in base if k.startswith("gen/generation/") and k.endswith("/identical")
                      and k in cand)
    if not variants:
        return []
    common = dict(stage="gen", task="generation", variant=group)
    name = f"baseline:gen/generation/{group}/paired"
    kb, kc = base.get("gen/generation/prompt_keys"), cand.get("gen/generation/prompt_keys")
    if kb is None or kc is None:
        which = "the baseline" if kb is None else "this run"
        return [Check(name, "baseline", SKIPPED, f"{which} does not name its gen prompts (written before "
                      f"details.gen.prompt_keys was kept): same prompts not provable; not paired", **common)]
    nb, nc = base.get("gen/generation/new_tokens"), cand.get("gen/generation/new_tokens")
    if nb is None or nc is None or int(nb) != int(nc):
        return [Check(name, "baseline", SKIPPED, f"another token budget: baseline up to "
                      f"{'?' if nb is None else int(nb)} new tokens, this run {'?' if nc is None else int(nc)} "
                      f"(--gen-new-tokens); not paired", **common)]
    if kb.shape != kc.shape or not np.array_equal(kb, kc):
        shared = np.intersect1d(kb, kc).size
        return [Check(name, "baseline", SKIPPED, f"different prompts: baseline {kb.size}, this run {kc.size}, "
                      f"{shared} in common (another --gen-prompts, --gen-sources, --gen-prefix-tokens, --limit or "
                      f"tokenizer); not paired", **common)]
    skipped = []
    budget = float(int(nb))
    for v in variants:
        ib, ic = base[f"gen/generation/{v}/identical"], cand[f"gen/generation/{v}/identical"]
        db, dc = base.get(f"gen/generation/{v}/divergence"), cand.get(f"gen/generation/{v}/divergence")
        if ib.size != kb.size or ic.size != kc.size:
            skipped.append(Check(f"baseline:gen/generation/{v}/identical_shift", "baseline", SKIPPED,
                                 f"{v}: {ib.size} (baseline) and {ic.size} (this run) per-prompt flags for {kb.size} "
                                 f"prompts (partial or failed gen data); not paired", **{**common, "variant": v}))
            continue
        gated = v == group  # fp@noise is the dtype's own rounding against fp32: reported
        est, se, n, r2w, w2r = stats.paired_flip_shift(ib, ic)
        add(drift_check(f"baseline:gen/generation/{v}/identical_shift", f"gen/generation/{v}/identical_shift",
                        f"paired shift of the fraction of greedy generations identical to fp's (this run - baseline; "
                        f"prompts identical→diverged {r2w}, diverged→identical {w2r})", "(fraction)", est, se, n,
                        "prompts", -1, gated=gated, stage="gen", task="generation", variant=v,
                        metric="identical_shift", **args))
        if db is not None and dc is not None and db.size == dc.size == kb.size and budget > 0:
            est, se, k = stats.paired_ratio_shift(db / budget, dc / budget, np.ones(db.size))
            add(drift_check(f"baseline:gen/generation/{v}/divergence_shift", f"gen/generation/{v}/divergence_shift",
                            f"paired shift of the mean tokens before the first divergence from fp, as a fraction of "
                            f"the {int(budget)}-token budget (this run - baseline)", "(fraction)", est, se, k,
                            "prompts", -1, gated=False, stage="gen", task="generation", variant=v,
                            metric="divergence_shift", **args))
    return skipped


def _per_doc_sums(flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
    ends = np.cumsum(counts.astype(np.int64))
    if ends.size == 0 or ends[-1] != flat.size:
        return np.zeros(0)
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(flat.astype(np.float64)))])
    return csum[ends] - csum[ends - counts.astype(np.int64)]
