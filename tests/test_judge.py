"""Judge: gates within a run and against baselines, verdicts with their noise, baselines, history.

Results are synthetic but built the way the stages build them (per-window sums, per-item
correctness, per-sample timings, run through evalsuite.stats), so intervals are real intervals.
Gates are exercised through the real CLI (``evalsuite.commands.cli.main`` and ``python3 -m evalsuite``).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from evalsuite import stats
from evalsuite.commands.cli import main
from evalsuite.results import Results

REPO = Path(__file__).resolve().parents[1]
MODULES = [f"model.layers.{i}.{m}" for i in range(6) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
KLD_EDGES = [0.0, *np.logspace(-8, 2, 41).tolist()]


# Realistic bf16 run-to-run noise (two runs of unchanged code with another batch plan or kernel):
# per-token NLL moves ~0.06 nats (conservative: measured fp token-ppl drift was 0.0025%), per-token
# KLD ~10% (its maximum over all tokens is a fresh heavy-tailed draw), and 1-3% of answers flip.
TOKEN_NLL_SD, TOKEN_KLD_REL_SD, FLIP_RATE = 0.06, 0.10, 0.02


def _ppl(res: Results, rng, variants: dict[str, float], windows: int, noise: float, truth_seed: int,
         nll_shift: float = 0.0) -> None:
    """ppl stage: per-window NLL sums of fp, per-window KLD / NLL deltas of each scheme (scale = mean KLD),
    as records and as the per-window details the stage writes."""
    truth = np.random.default_rng(truth_seed)  # the corpus: identical in every run of the same model
    tokens = 256
    n = np.full(windows, float(tokens))
    nll_fp = truth.normal(3.0, 0.3, windows) * n
    res.details["ppl"] = {"task": "wikitext2", "protocol": {"batch_size": 4, "stats": "torch", "description": "synthetic"},
                          "windows": {"start": (np.arange(windows) * tokens).tolist()}, "variants": {}, "paired": {}}
    for variant, scale in {"fp": 0.0, **variants}.items():
        # windows differ: some text is harder to quantize than other (lognormal per-window scale)
        per_window = scale * truth.lognormal(-0.125, 0.5, (windows, 1))
        base_kld = truth.gamma(2.0, per_window / 2.0, (windows, tokens)) if scale else np.zeros((windows, tokens))
        # a rerun changes float rounding: every token's KLD and NLL move a little, independently
        kld_tok = base_kld * np.exp(noise * TOKEN_KLD_REL_SD * rng.standard_normal(base_kld.shape))
        nll = nll_fp + (base_kld.sum(axis=1) * 0.8 if scale else 0.0) + nll_shift * n
        nll = nll + noise * TOKEN_NLL_SD * math.sqrt(tokens) * rng.standard_normal(windows)
        if "@" not in variant:
            reps = stats.bootstrap_ratio_of_sums(nll, n, seed=1)
            res.add(stage="ppl", task="wikitext2", variant=variant, metric="token_ppl",
                    value=math.exp(nll.sum() / n.sum()), unit="ppl", n=int(n.sum()), higher_is_better=False,
                    ci95=[math.exp(x) for x in stats.percentile_ci(reps)],
                    definition="exp(mean NLL per token) over the scored tokens")
            res.details["ppl"]["variants"][variant] = {"nll_sum": nll.tolist(), "n_finite": n.astype(int).tolist()}
        if variant == "fp":
            continue
        kld_sum = kld_tok.sum(axis=1)
        ci = stats.percentile_ci(stats.bootstrap_ratio_of_sums(kld_sum, n, seed=2))
        flat = kld_tok.ravel()
        common = dict(stage="ppl", task="wikitext2", variant=variant, n=int(n.sum()))
        res.add(**common, metric="kld_mean", value=float(kld_sum.sum() / n.sum()), unit="nats", higher_is_better=False,
                ci95=ci, definition="mean over tokens of KL(P_fp || Q)", extra={"windows": windows})
        for name, q in (("kld_median", 50), ("kld_p99", 99), ("kld_p99_9", 99.9), ("kld_max", 100)):
            res.add(**common, metric=name, value=float(np.percentile(flat, q)), unit="nats", higher_is_better=False)
        diff = (nll - nll_fp)
        rci = stats.percentile_ci(np.exp(stats.bootstrap_ratio_of_sums(diff, n, seed=3)))
        res.add(**common, metric="ppl_ratio", value=float(math.exp(diff.sum() / n.sum())), unit="ratio",
                higher_is_better=False, ci95=rci, definition="token_ppl(Q) / token_ppl(P)")
        res.add(**common, metric="nonfinite_tokens", value=0.0, unit="tokens", higher_is_better=False)
        counts, _ = np.histogram(np.clip(flat, KLD_EDGES[0], KLD_EDGES[-1]), bins=np.asarray(KLD_EDGES))
        k = math.ceil(0.01 * tokens)
        top = np.sort(kld_tok, axis=1)[:, -k:].sum(axis=1)
        res.details["ppl"]["paired"][variant] = {
            "kld_hist": {"edges": KLD_EDGES, "counts": counts.tolist()}, "kld_sum": kld_sum.tolist(),
            "n": n.astype(int).tolist(), "kld_top1pct_sum": top.tolist(), "kld_top1pct_n": [k] * windows,
            "nll_ref_sum": nll_fp.tolist(), "nll_sum": nll.tolist()}


def _aa_flips(rng, correct: np.ndarray, rate: float) -> np.ndarray:
    """Near-tie items answered the other way in a rerun: as many right→wrong as wrong→right expected."""
    acc = correct.mean()
    if rate <= 0 or acc in (0.0, 1.0):
        return correct.copy()
    p = np.where(correct, rate / (2 * acc), rate / (2 * (1 - acc)))
    return correct ^ (rng.random(correct.size) < np.minimum(p, 1.0))


def _tasks(res: Results, rng, schemes: dict[str, float], items: int, truth_seed: int, flip_rate: float = FLIP_RATE,
           drop: float = 0.0) -> None:
    """tasks stage: per-item correctness; a scheme flips right→wrong with probability ∝ its error; a
    rerun flips ``flip_rate`` of the answers symmetrically; ``drop`` plants an accuracy drop (fraction
    of items turned wrong) in every variant."""
    truth = np.random.default_rng(truth_seed)
    res.details["tasks"] = {}
    for task in ("arc_easy", "piqa"):
        fp_true = truth.random(items) < 0.6
        truths = {"fp": fp_true}
        for variant, flip in schemes.items():
            u = truth.random(items)
            truths[variant] = np.where(fp_true, u >= flip, u < flip / 4)
        ll_true = truth.normal(-5.0, 2.0, (items, 2))
        answered = {}
        for variant, t in truths.items():
            q = _aa_flips(rng, t, flip_rate)
            if drop:
                right = np.flatnonzero(q)
                q[rng.choice(right, size=min(right.size, round(drop * items)), replace=False)] = False
            answered[variant] = q
        entry = res.details["tasks"][task] = {"n": items, "doc_ids": list(range(items)), "values": {},
                                              "loglikelihoods": {}}
        for variant, q in answered.items():
            acc, se = stats.mean_stderr(q)
            res.add(stage="tasks", task=task, variant=variant, metric="acc", value=acc, stderr=se, unit="fraction",
                    n=items, higher_is_better=True, definition="fraction of items answered correctly")
            entry["values"][variant] = {"acc": q.astype(float).tolist()}
            entry["loglikelihoods"][variant] = (ll_true + 0.02 * rng.standard_normal(ll_true.shape)).tolist()
        fp = answered["fp"]
        for variant in schemes:
            q = answered[variant]
            p, r2w, w2r = stats.mcnemar_exact(fp, q)
            common = dict(stage="tasks", task=task, variant=variant, n=items)
            res.add(**common, metric="delta_acc", value=float(q.mean() - fp.mean()), unit="fraction",
                    higher_is_better=True, ci95=stats.paired_bootstrap_mean_diff(fp, q),
                    definition="acc(Q) - acc(fp), paired bootstrap over items")
            res.add(**common, metric="mcnemar_p", value=p, unit="p-value", higher_is_better=None)
            res.add(**common, metric="flips_right_to_wrong", value=float(r2w), unit="items", higher_is_better=False)
            res.add(**common, metric="flips_wrong_to_right", value=float(w2r), unit="items", higher_is_better=None)


def _layers(res: Results, schemes: dict[str, float], broken: str | None, truth_seed: int) -> None:
    """layers stage: SQNR per module (deterministic for a model × scheme), floors in ``extra``."""
    truth = np.random.default_rng(truth_seed)
    for variant, scale in schemes.items():
        base = 40.0 - 10 * math.log10(max(scale, 1e-6) / 1e-3)
        worst, low = None, math.inf
        for name in MODULES:
            w, o = base + truth.normal(0, 1.5), base - 2 + truth.normal(0, 1.5)
            if name == broken:
                w, o = 4.0, 3.0
            for metric, v, floor in (("weight_sqnr_db", w, 30.0), ("output_sqnr_db", o, 28.0)):
                res.add(stage="layers", task=name, variant=variant, metric=metric, value=float(v), unit="dB",
                        n=1000, higher_is_better=True, extra={"floor_db": floor},
                        definition="10 log10(|W|^2 / |W - dequant(Q(W))|^2)" if metric.startswith("w") else
                        "10 log10(|y|^2 / |y - y_q|^2) on calibration activations")
            if o < low:
                worst, low = name, o
        for i in range(6):
            res.add(stage="layers", task=f"block.{i}", variant=variant, metric="hidden_sqnr_db",
                    value=base - 3 - i, unit="dB", n=1000, higher_is_better=True, extra={"floor_db": 10.0})
        outs = [r.value for r in res.find(stage="layers", variant=variant, metric="output_sqnr_db")]
        res.add(stage="layers", task="all", variant=variant, metric="min_output_sqnr_db", value=min(outs), unit="dB",
                n=len(outs), higher_is_better=True, extra={"worst": worst})


def _speed(res: Results, rng, schemes: dict[str, float], factor: float, device: str) -> None:
    """speed stage: 12 timed samples of tokens/s per variant; speed-up with a bootstrap interval."""
    samples = {"fp": rng.normal(100.0, 2.0, 12)}
    for variant in schemes:
        samples[variant] = rng.normal(170.0, 3.0, 12) * factor
    for variant, s in samples.items():
        res.add(stage="speed", task="decode_bs1", variant=variant, metric="tokens_per_s", value=float(np.median(s)),
                unit="tokens/s", n=s.size, higher_is_better=True,
                extra={"min": float(s.min()), "max": float(s.max()), "cv": float(s.std(ddof=1) / s.mean()),
                       "samples": s.tolist(), "device_type": device},
                definition="median over samples of tokens / sample seconds")
    for variant in schemes:
        idx = np.random.default_rng(5).integers(0, 12, (2000, 12))
        reps = np.median(samples[variant][idx], axis=1) / np.median(samples["fp"][idx], axis=1)
        res.add(stage="speed", task="decode_bs1", variant=variant, metric="speedup",
                value=float(np.median(samples[variant]) / np.median(samples["fp"])), unit="x", n=12,
                higher_is_better=True, ci95=stats.percentile_ci(reps), extra={"device_type": device})


def make_results(seed: int = 0, kld: float = 1e-3, broken_layer: str | None = None, speed: float = 1.0,
                 limit: int | None = None, sha: str = "a" * 64, device: str = "cuda", noise: float = 1.0,
                 errors: list | None = None, nll_shift: float = 0.0, acc_drop: float = 0.0) -> Results:
    """A full synthetic run of one model with fp and int8-wo (mean per-token KLD ``kld``)."""
    rng = np.random.default_rng(seed)
    windows, items = (limit or 40), (limit or 300)
    res = Results(run={"started": f"2026-11-28T06:{seed % 60:02d}:00+00:00", "finished": "later",
                       "schemes": ["int8-wo"], "stages": ["ppl", "tasks", "layers", "speed"],
                       "model": {"name": "SmolLM2-135M", "sha256": sha, "format": "gguf", "n_params": 134515008},
                       "device": {"type": device, "name": "synthetic"}, "dtype": "bf16", "seed": seed,
                       "limit": limit, "partial": limit is not None, "git_revision": f"rev{seed}",
                       "argv": ["run", f"--seed={seed}"]})
    _ppl(res, rng, {"int8-wo": kld, "fp@noise": 1e-4}, windows, noise, truth_seed=1, nll_shift=nll_shift)
    _tasks(res, rng, {"int8-wo": min(0.5, 2 * kld)}, items, truth_seed=2, flip_rate=FLIP_RATE * noise, drop=acc_drop)
    _layers(res, {"int8-wo": kld}, broken_layer, truth_seed=3)
    _speed(res, rng, {"int8-wo": kld}, speed, device)
    res.errors = errors or []
    return res


def save(res: Results, path: Path) -> str:
    res.save(path)
    return str(path)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "evalsuite", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def gate(tmp_path: Path, baseline: Results, candidate: Results, *extra: str, capsys=None) -> tuple[int, dict, str]:
    """``evalsuite gate`` in-process; returns (exit code, verdicts by check, stdout)."""
    b, c = save(baseline, tmp_path / "base.json"), save(candidate, tmp_path / "cand.json")
    out = tmp_path / "gate-out"
    code = main(["gate", "--baseline", b, "--candidate", c, "--out", str(out), "--formats", "json", "--force", *extra])
    text = capsys.readouterr().out if capsys else ""
    verdicts = {v["check"]: v for v in json.loads((out / "results.json").read_text())["verdicts"]}
    return code, verdicts, text


# ---- the verdict rules, against independent computations ----

@pytest.mark.parametrize("value,ci,limit,upper,expected", [
    (0.004, [0.003, 0.005], 0.01, True, "PASS"),
    (0.02, [0.015, 0.03], 0.01, True, "FAIL"),
    (0.009, [0.006, 0.012], 0.01, True, "INCONCLUSIVE"),
    (0.011, [0.008, 0.014], 0.01, True, "INCONCLUSIVE"),
    (-0.002, [-0.006, 0.002], -0.01, False, "PASS"),
    (-0.03, [-0.05, -0.015], -0.01, False, "INCONCLUSIVE"),  # beyond at 95%, not at the 1% budget
    (-0.04, [-0.05, -0.03], -0.01, False, "FAIL"),
    (0.02, None, 0.01, True, "INCONCLUSIVE"),  # no interval: no uncertainty, no verdict
    (0.02, [0.02, 0.02], 0.01, True, "INCONCLUSIVE"),  # one window: a zero-width interval
    (float("nan"), [0.0, 1.0], 0.01, True, "FAIL"),
])
def test_limit_verdict_follows_the_interval(value, ci, limit, upper, expected):
    from evalsuite.judge.checks import limit_verdict

    verdict, reason = limit_verdict(value, ci, limit, upper)
    assert verdict == expected, reason
    if ci is not None and expected != "FAIL":
        assert "CI" in reason


def test_drift_tolerance_is_sigma_times_combined_stderr():
    from evalsuite.judge.baseline import compare_metric
    from evalsuite.judge.config import load_gate_config
    from evalsuite.results import Metric

    cfg = load_gate_config()
    se_b, se_c = 0.02, 0.015
    tol = cfg.sigma * math.hypot(se_b, se_c)
    assert cfg.sigma == 3.0 and sps.norm.sf(cfg.sigma) < 0.0015  # one-sided false-alarm rate per metric

    def verdict(delta: float, hib: bool = False) -> str:
        base = Metric("ppl", "wikitext2", "int8-wo", "token_ppl", 10.0, "ppl", 1000, hib, stderr=se_b)
        cand = Metric("ppl", "wikitext2", "int8-wo", "token_ppl", 10.0 + delta, "ppl", 1000, hib, stderr=se_c)
        return compare_metric(base, cand, cfg)[0]

    floor = cfg.rel_floor("ppl/wikitext2/int8-wo/token_ppl") * 10.0
    assert floor < tol
    assert verdict(0.9 * floor) == "PASS"
    assert verdict(0.99 * tol) == "WITHIN-NOISE"
    assert verdict(1.01 * tol) == "FAIL"
    assert verdict(-1.01 * tol) == "IMPROVED"
    assert verdict(1.01 * tol, hib=True) == "IMPROVED"


@pytest.mark.parametrize("base,cand,hib,expected", [
    (math.inf, math.inf, True, "PASS"), (math.inf, 45.0, True, "FAIL"), (40.0, math.inf, True, "IMPROVED"),
    (0.1, math.nan, False, "FAIL"), (math.nan, 0.1, False, "SKIPPED"), (0.1, math.inf, False, "FAIL"),
])
def test_non_finite_values_are_ordered_not_subtracted(base, cand, hib, expected):
    from evalsuite.judge.checks import drift_verdict

    assert drift_verdict(base, cand, 0.01, 3.0, 0.0, hib)[0] == expected


def test_example_gates_file_states_the_defaults():
    import yaml

    from evalsuite.judge.config import DEFAULTS, load_gate_config

    example = REPO / "reports" / "gates.example.yaml"
    assert yaml.safe_load(example.read_text()) == DEFAULTS
    assert load_gate_config(example).data == DEFAULTS


def test_interval_only_metric_gets_stderr_from_ci_half_width():
    from evalsuite.judge.checks import stderr_of

    lo, hi = 1.2, 1.6
    assert stderr_of(1.4, None, [lo, hi], None) == pytest.approx((hi - lo) / 2 / sps.norm.ppf(0.975))
    assert stderr_of(200.0, None, None, 0.05) == pytest.approx(10.0)
    assert stderr_of(1.0, None, None, None) is None


# ---- the done-when scenarios, through the CLI ----

def test_aa_rerun_yields_no_fail(tmp_path, capsys):
    code, verdicts, out = gate(tmp_path, make_results(seed=1), make_results(seed=2), capsys=capsys)
    fails = {k: v["reason"] for k, v in verdicts.items() if v["verdict"] in ("FAIL", "IMPROVED")}
    assert code == 0 and not fails, fails
    assert sum(v["kind"] == "baseline" for v in verdicts.values()) > 20
    assert "gate PASSED" in out


def test_worse_scheme_substituted_fails_with_reason_and_update_command(tmp_path, capsys):
    code, verdicts, out = gate(tmp_path, make_results(seed=1), make_results(seed=2, kld=0.02), capsys=capsys)
    assert code == 1
    kld = verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean_rel"]
    assert kld["verdict"] == "FAIL" and kld["failing"] and "worse beyond the margin" in kld["reason"]
    assert verdicts["ppl/wikitext2/int8-wo/kld_mean"]["verdict"] == "FAIL"  # over the int8 limit 0.01 too
    assert verdicts["baseline:ppl/wikitext2/int8-wo/nll_shift"]["verdict"] == "FAIL"
    # the record-by-record comparison is reported beside, never gating
    assert verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean"]["verdict"] == "WORSE"
    assert not verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean"]["failing"]
    assert f"evalsuite baseline update {tmp_path / 'cand.json'} --variant int8-wo" in out


def test_one_broken_layer_is_named_and_reported_not_gated(tmp_path, capsys):
    """A minimum over layers is an extreme: reported (WORSE, named), not gated; its effect on the
    output is gated through KLD (see test_judge_paired's planted fp8 scale)."""
    bad = MODULES[17]
    code, verdicts, out = gate(tmp_path, make_results(seed=1), make_results(seed=2, broken_layer=bad), capsys=capsys)
    layer = verdicts["layers/int8-wo/sqnr"]
    assert layer["verdict"] == "WORSE" and layer["extra"]["worst"] == bad and layer["extra"]["under"] == [bad]
    assert bad in layer["reason"] and "1 of 42 layers" in layer["reason"] and "not gated" in layer["reason"]
    assert verdicts["baseline:layers/all/int8-wo/min_output_sqnr_db"]["verdict"] == "WORSE"
    assert not layer["failing"] and code == 0


def test_speed_halved_fails(tmp_path, capsys):
    code, verdicts, _ = gate(tmp_path, make_results(seed=1), make_results(seed=2, speed=0.5), capsys=capsys)
    assert code == 1
    # without a run-to-run calibration neither speed statistic is gated against the baseline (the
    # calibrated case: test_judge_speed); the within-run speed-up limit catches the slowdown
    assert verdicts["baseline:speed/decode_bs1/int8-wo/speedup"]["verdict"] == "WORSE"
    assert not verdicts["baseline:speed/decode_bs1/int8-wo/speedup"].get("gated")
    assert verdicts["baseline:speed/decode_bs1/int8-wo/tokens_per_s"]["verdict"] == "WORSE"
    assert not verdicts["baseline:speed/decode_bs1/int8-wo/tokens_per_s"].get("gated")
    assert verdicts["speed/decode_bs1/int8-wo/speedup"]["verdict"] == "FAIL"  # 0.85x < the 1.0x limit
    fp = verdicts["baseline:speed/decode_bs1/fp/tokens_per_s"]
    assert fp["verdict"] == "INCONCLUSIVE" and "no run-to-run speed calibration" in fp["reason"]  # not judged


def test_improvement_is_reported_and_fails_only_when_strict(tmp_path, capsys):
    base, cand = make_results(seed=1, kld=3e-3), make_results(seed=2, kld=1e-3)
    code, verdicts, _ = gate(tmp_path, base, cand, capsys=capsys)
    assert verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean"]["verdict"] == "IMPROVED"
    assert code == 0
    code, _, out = gate(tmp_path, base, cand, "--strict", capsys=capsys)
    assert code == 1 and "evalsuite baseline update" in out


def test_limit_straddled_by_a_small_sample_is_within_noise(tmp_path, capsys):
    res = make_results(seed=3, kld=0.0095, limit=8)
    code = main(["report", save(res, tmp_path / "r.json"), "--format", "json", "--out", str(tmp_path / "o")])
    v = {x["check"]: x for x in json.loads((tmp_path / "o" / "results.json").read_text())["verdicts"]}
    kld = v["ppl/wikitext2/int8-wo/kld_mean"]
    lo, hi = kld["interval"]
    assert lo < 0.01 < hi and kld["verdict"] == "INCONCLUSIVE" and "too small to tell" in kld["reason"]
    assert not kld["failing"]
    assert code == int(any(x["failing"] for x in v.values()))


def test_partial_candidate_skips_sample_dependent_baseline_checks(tmp_path, capsys):
    code, verdicts, _ = gate(tmp_path, make_results(seed=1), make_results(seed=2, limit=10), capsys=capsys)
    assert verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean"]["verdict"] == "SKIPPED"
    assert "different samples" in verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean"]["reason"]
    assert verdicts["baseline:layers/all/int8-wo/min_output_sqnr_db"]["verdict"] != "SKIPPED"


def test_stage_not_run_is_skipped(tmp_path, capsys):
    cand = make_results(seed=2)
    cand.records = [r for r in cand.records if r.stage != "tasks"]
    del cand.details["tasks"]
    cand.run["stages"] = ["ppl", "layers", "speed"]
    code, verdicts, _ = gate(tmp_path, make_results(seed=1), cand, capsys=capsys)
    assert verdicts["tasks/int8-wo/delta_acc"]["verdict"] == "SKIPPED"
    assert verdicts["baseline:tasks/pooled/int8-wo/acc_shift"]["verdict"] == "SKIPPED"
    assert verdicts["baseline:tasks/arc_easy/int8-wo/delta_acc"]["reason"] == "stage tasks was not run"
    assert code == 0


def test_gates_file_overrides_defaults(tmp_path, capsys):
    gates = tmp_path / "gates.yaml"
    gates.write_text('schemes:\n  "int8-*": {kld_mean_max: 0.0001}\n')
    out = tmp_path / "o"
    code = main(["report", save(make_results(seed=2), tmp_path / "r.json"), "--gates", str(gates), "--rejudge",
                 "--format", "json", "--out", str(out)])
    v = {x["check"]: x for x in json.loads((out / "results.json").read_text())["verdicts"]}
    assert code == 1 and v["ppl/wikitext2/int8-wo/kld_mean"]["verdict"] == "FAIL"
    assert v["ppl/wikitext2/int8-wo/kld_mean"]["limit"] == 0.0001


def test_scheme_known_lossy_by_its_baseline_is_gated_on_regression_not_permanently_red(tmp_path, capsys):
    gates = tmp_path / "gates.yaml"
    gates.write_text('schemes:\n  "int8-*": {kld_mean_max: 0.0001}\n')
    code, verdicts, _ = gate(tmp_path, make_results(seed=1), make_results(seed=2), "--gates", str(gates), capsys=capsys)
    kld = verdicts["ppl/wikitext2/int8-wo/kld_mean"]
    assert kld["verdict"] == "WORSE" and "known lossy" in kld["reason"] and not kld["failing"] and code == 0
    # a regression from that baseline still fails
    code, verdicts, _ = gate(tmp_path, make_results(seed=1), make_results(seed=2, kld=2e-3), "--gates", str(gates),
                             capsys=capsys)
    assert code == 1 and verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean_rel"]["failing"]


# ---- usage errors: exit 2, one line ----

def _one_line(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_baseline_of_another_model_exits_2(tmp_path):
    b = save(make_results(seed=1, sha="b" * 64), tmp_path / "b.json")
    c = save(make_results(seed=2), tmp_path / "c.json")
    _one_line(run_cli("gate", "--baseline", b, "--candidate", c, "--no-history"), "baseline is for model")


def test_corrupt_inputs_exit_2(tmp_path):
    good = save(make_results(seed=1), tmp_path / "good.json")
    cut = tmp_path / "cut.json"
    cut.write_text(Path(good).read_text()[:5000])
    _one_line(run_cli("gate", "--baseline", good, "--candidate", str(cut)), "truncated or corrupt")
    alien = tmp_path / "alien.json"
    alien.write_text(json.dumps({**json.loads(Path(good).read_text()), "schema": "evalsuite.results/99"}))
    _one_line(run_cli("compare", good, str(alien)), "not supported")
    odd = tmp_path / "odd-baseline.json"
    odd.write_text(json.dumps({"schema": "evalsuite.baseline/7", "metrics": []}))
    _one_line(run_cli("gate", "--baseline", str(odd), "--candidate", good), "baseline schema")


# ---- baselines as files ----

def test_baseline_update_then_gate_by_folder_keeps_hand_tolerances(tmp_path, capsys):
    folder = tmp_path / "baselines"
    first = save(make_results(seed=1), tmp_path / "first.json")
    assert main(["baseline", "update", first, "--dir", str(folder)]) == 0
    path = folder / "SmolLM2-135M" / "cuda-bf16" / "int8-wo.json"
    assert path.is_file() and (folder / "SmolLM2-135M" / "cuda-bf16" / "fp.json").is_file()
    data = json.loads(path.read_text())
    assert data["schema"] == "evalsuite.baseline/2" and data["model"]["sha256"] == "a" * 64
    assert (path.parent / data["paired"]["file"]).is_file() and data["measured"]["kernels"] == "fused"
    # a hand-set tolerance tight enough to flag the A/A jitter of kld_max, and kept by the next update
    for m in data["metrics"]:
        if m["metric"] == "kld_max":
            m["tolerance"] = {"rel_floor": 0.0, "sigma": 0.0, "abs_floor": 0.0}
    path.write_text(json.dumps(data))
    assert main(["baseline", "update", first, "--dir", str(folder), "--variant", "int8-wo"]) == 0
    kept = [m for m in json.loads(path.read_text())["metrics"] if m.get("tolerance")]
    assert [m["metric"] for m in kept] == ["kld_max"]
    cand = save(make_results(seed=2), tmp_path / "cand.json")
    code = main(["gate", "--baselines", str(folder), "--candidate", cand, "--out", str(tmp_path / "o"), "--formats", "json"])
    v = {x["check"]: x for x in json.loads((tmp_path / "o" / "results.json").read_text())["verdicts"]}
    # the maximum is a fresh draw each run: flagged by the tight hand tolerance, but never gated
    kmax = v["baseline:ppl/wikitext2/int8-wo/kld_max"]
    assert kmax["verdict"] in ("WORSE", "IMPROVED") and not kmax["failing"] and "not gated" in kmax["reason"] and code == 0
    assert v["baseline:ppl/wikitext2/int8-wo/kld_mean_rel"]["verdict"] == "PASS"
    assert main(["baseline", "show", str(path)]) == 0
    assert "kld_mean" in capsys.readouterr().out


def test_partial_run_is_refused_as_baseline(tmp_path):
    p = save(make_results(seed=1, limit=5), tmp_path / "p.json")
    _one_line(run_cli("baseline", "update", p, "--dir", str(tmp_path / "b")), "partial run")


def test_compare_flags_the_worse_file(tmp_path, capsys):
    a, b = save(make_results(seed=1), tmp_path / "a.json"), save(make_results(seed=2, speed=0.5), tmp_path / "b.json")
    assert main(["compare", a, a]) == 0
    capsys.readouterr()
    assert main(["compare", a, b]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("speed/decode_bs1/int8-wo/tokens_per_s"))
    # at 80 columns (not a terminal) a metric's values may wrap onto the line under its name
    assert "FAIL" in lines[at] or "FAIL" in lines[at + 1]


# ---- history ----

def test_history_flags_drift_against_rolling_median(tmp_path, capsys):
    db = tmp_path / "h.sqlite"
    runs = [make_results(seed=s, kld=k) for s, k in enumerate([1e-3, 1.05e-3, 0.98e-3, 1.02e-3, 1e-3, 3e-3], start=10)]
    for i, r in enumerate(runs):
        assert main(["history", "--db", str(db), "--add", save(r, tmp_path / f"r{i}.json"), "--metric", "token_ppl"]) in (0, 1)
    capsys.readouterr()
    code = main(["history", "--db", str(db), "--metric", "kld_mean", "--variant", "int8-wo", "--plot", str(tmp_path / "t.png")])
    out = capsys.readouterr().out
    assert code == 1 and "DRIFT-WORSE" in out and (tmp_path / "t.png").stat().st_size > 1000
    from evalsuite.judge.history import flag_drift, load_series

    values = [r.get("ppl", "wikitext2", "int8-wo", "kld_mean").value for r in runs]
    (series,) = load_series(db, metric="kld_mean", variant="int8-wo")
    flag_drift(series, window=5)
    assert [p.value for p in series.points] == pytest.approx(values)
    assert series.points[-1].median == pytest.approx(statistics.median(values[:5]))
    assert [p.flag for p in series.points] == [""] * 5 + ["DRIFT-WORSE"]
    # the same file appended twice is one run
    main(["history", "--db", str(db), "--add", str(tmp_path / "r0.json")])
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 6


def test_history_survives_a_crash_mid_write(tmp_path):
    from evalsuite.judge.history import append_run

    db = tmp_path / "h.sqlite"
    first = make_results(seed=1)
    append_run(db, first)

    def dying_records():
        for i, r in enumerate(make_results(seed=2).records):
            if i == 50:
                raise RuntimeError("killed mid-write")
            yield r

    with pytest.raises(RuntimeError):
        append_run(db, make_results(seed=2), records=dying_records())
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == len(first.records)


def test_head_quantized_against_policy_fails_on_its_inf_floor():
    """The layers stage writes floor_db "inf" (JSON has no infinity) for a layer the policy keeps in float."""
    from evalsuite.results.layers import layer_summary

    res = make_results(seed=1)
    res.add(stage="layers", task="lm_head", variant="int8-wo", metric="weight_sqnr_db", value=45.0, unit="dB", n=1,
            higher_is_better=True, extra={"floor_db": "inf"})
    summary = layer_summary(res, "int8-wo", ["weight_sqnr_db"], default_floor_db=30.0)
    assert summary.floors["lm_head"]["weight_sqnr_db"] == math.inf


@pytest.mark.parametrize("fp_roofline, expected", [(0.09, "SKIPPED"), (0.7, "FAIL")])
def test_speedup_gate_applies_only_to_memory_bound_decode(tmp_path, capsys, fp_roofline, expected):
    """SmolLM2 on an H100 decodes at 9% of copy bandwidth: int8-wo measured 0.93x there, which says
    nothing about bandwidth savings. A memory-bound fp decode keeps the gate."""
    cand = make_results(seed=2, speed=0.5)
    cand.add(stage="speed", task="decode_bs1", variant="fp", metric="roofline_fraction", value=fp_roofline,
             unit="fraction", n=12, higher_is_better=True, extra={"device_type": "cuda"})
    _, verdicts, _ = gate(tmp_path, make_results(seed=1), cand, capsys=capsys)
    v = verdicts["speed/decode_bs1/int8-wo/speedup"]
    assert v["verdict"] == expected
    if expected == "SKIPPED":
        assert "overhead-bound" in v["reason"]


def test_speed_baseline_from_another_card_is_skipped(tmp_path, capsys):
    base, cand = make_results(seed=1), make_results(seed=2, speed=0.5)
    base.run["device"]["name"], cand.run["device"]["name"] = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
    _, verdicts, _ = gate(tmp_path, base, cand, capsys=capsys)
    v = verdicts["baseline:speed/decode_bs1/int8-wo/tokens_per_s"]
    assert v["verdict"] == "SKIPPED" and "H200" in v["reason"]
    assert verdicts["baseline:ppl/wikitext2/int8-wo/kld_mean"]["verdict"] != "SKIPPED"  # accuracy still compared
