"""Paired baselines and the gate's two error rates, on the sizes of the stored SmolLM2 baselines.

The simulation draws A/A runs with realistic bf16 run-to-run noise (1-3% of answers flipped, per-token
NLL and KLD noise, a per-run systematic offset as seen across batch plans and kernels) around the
committed baselines' own windows, tasks and accuracies, judges each with the real checks and Holm,
and counts runs that would page. Planted regressions must page in at least 80% of runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.judge import checks as ck
from evalsuite.judge.noise import NoiseModel
from evalsuite.judge.paired import paired_checks
from evalsuite.judge.within import _limit_check
from evalsuite.results import Metric

REPO = Path(__file__).resolve().parents[1]
STORED = REPO / "reports" / "baselines" / "SmolLM2-135M-Instruct.Q4_1" / "cuda-bf16"


def _stored() -> dict:
    """Sizes, accuracies and spreads of the stored H200 baselines (fp and int8-wo)."""
    def records(name):
        return {(m["stage"], m["task"], m["variant"], m["metric"]): m
                for m in json.loads((STORED / f"{name}.json").read_text())["metrics"]}

    fp, q = records("fp"), records("int8-wo")
    tasks = {}
    for (stage, task, variant, metric), m in fp.items():
        if stage == "tasks" and metric == "acc" and variant == "fp":
            qd = q[("tasks", task, "int8-wo", "flips_right_to_wrong")]["value"], \
                q[("tasks", task, "int8-wo", "flips_wrong_to_right")]["value"]
            tasks[task] = (int(m["n"]), float(m["value"]), qd)
    nll = fp[("ppl", "wikitext2", "fp", "nll_mean")]
    kld = q[("ppl", "wikitext2", "int8-wo", "kld_mean")]
    return {"tokens": int(nll["n"]), "nll_mean": nll["value"], "nll_se": (nll["ci95"][1] - nll["ci95"][0]) / 3.92,
            "kld_mean": kld["value"], "kld_se": (kld["ci95"][1] - kld["ci95"][0]) / 3.92,
            "ln_ratio": q[("ppl", "wikitext2", "int8-wo", "ln_ppl_ratio")]["value"], "tasks": tasks}


# Realistic bf16 noise between two honest runs (other batch plan / kernels / packing):
TOKEN_NLL_SD = 0.06          # nats per token (conservative: the measured fp drift, 0.0025%, implies ~0.01)
NLL_OFFSET_SD = 2.5e-5       # per-run systematic shift of mean NLL, nats/token (measured drift between versions)
WINDOW_KLD_REL_SD = 0.03     # per-window relative KLD noise
KLD_OFFSET_SD = 0.02         # per-run systematic relative KLD shift (fp@noise mean moved 3.8% across versions)
WINDOW_TOP_REL_SD = 0.10     # per-window relative noise of the top-1% KLD mean (heavy tail)
TOP_OFFSET_SD = 0.04
FLIP_RANGE = (0.01, 0.03)    # fraction of answers a rerun flips, symmetrically


class World:
    """The stored model's corpus windows and task items, fixed; each ``run`` draws one honest rerun."""

    def __init__(self, seed: int = 0):
        s = _stored()
        rng = np.random.default_rng(seed)
        self.context = 2048
        w = math.ceil(s["tokens"] / self.context)
        self.n = np.full(w, float(self.context))
        self.n[-1] = s["tokens"] - self.context * (w - 1)
        self.start = np.arange(w, dtype=np.int64) * self.context
        sd_w = s["nll_se"] * math.sqrt(w)
        self.nll_fp = rng.normal(s["nll_mean"], sd_w, w) * self.n
        kld_sd_w = s["kld_se"] * math.sqrt(w)
        shape = (s["kld_mean"] / kld_sd_w) ** 2
        self.kld = rng.gamma(shape, s["kld_mean"] / shape, w) * self.n
        self.top_n = np.ceil(0.01 * self.n)
        self.top = rng.gamma(4.0, 8 * s["kld_mean"] / 4.0, w) * self.top_n
        self.nll_q = self.nll_fp + s["ln_ratio"] * self.n + 0.02 * rng.standard_normal(w) * np.sqrt(self.n)
        self.tasks = {}
        for task, (items, acc, (r2w, w2r)) in s["tasks"].items():
            fp = rng.random(items) < acc
            q = fp.copy()
            right, wrong = np.flatnonzero(fp), np.flatnonzero(~fp)
            q[rng.choice(right, int(min(r2w, right.size)), replace=False)] = False
            q[rng.choice(wrong, int(min(w2r, wrong.size)), replace=False)] = True
            self.tasks[task] = (fp, q)

    def run(self, rng, kld_factor: float = 1.0, nll_shift: float = 0.0, acc_drop: float = 0.0) -> dict:
        """One rerun's arrays (as ``paired.paired_arrays`` builds them), for groups fp and int8-wo."""
        w = self.n.size
        t = lambda size: rng.standard_t(5, size) / math.sqrt(5 / 3)  # unit-variance, heavier tails

        def nll(base):
            return base + (nll_shift + NLL_OFFSET_SD * rng.standard_normal()) * self.n \
                + TOKEN_NLL_SD * np.sqrt(self.n) * t(w)

        kld_off, top_off = KLD_OFFSET_SD * rng.standard_normal(), TOP_OFFSET_SD * rng.standard_normal()
        out = {"fp": {}, "int8-wo": {}}
        for g in out:
            out[g]["ppl/wikitext2/window_start"] = self.start
        out["fp"]["ppl/wikitext2/fp/nll_sum"] = nll(self.nll_fp)
        out["fp"]["ppl/wikitext2/fp/n"] = self.n
        q = out["int8-wo"]
        q["ppl/wikitext2/int8-wo/nll_sum"] = nll(self.nll_q)
        q["ppl/wikitext2/int8-wo/n"] = self.n
        q["ppl/wikitext2/int8-wo/kld_sum"] = self.kld * kld_factor * (1 + kld_off + WINDOW_KLD_REL_SD * t(w))
        q["ppl/wikitext2/int8-wo/kld_n"] = self.n
        q["ppl/wikitext2/int8-wo/kld_top_sum"] = self.top * kld_factor * (1 + top_off + WINDOW_TOP_REL_SD * t(w))
        q["ppl/wikitext2/int8-wo/kld_top_n"] = self.top_n
        rate = rng.uniform(*FLIP_RANGE)
        for task, (fp, qa) in self.tasks.items():
            for g, correct in (("fp", fp), ("int8-wo", qa)):
                acc = correct.mean()
                p = np.where(correct, rate / (2 * acc), rate / (2 * (1 - acc)))
                c = correct ^ (rng.random(correct.size) < np.minimum(p, 1.0))
                if acc_drop and g == "int8-wo":
                    right = np.flatnonzero(c)
                    c[rng.choice(right, round(acc_drop * c.size), replace=False)] = False
                out[g][f"tasks/{task}/doc_ids"] = np.arange(c.size)
                out[g][f"tasks/{task}/{g}/acc"] = c
        return out


def _within(run: dict, limits=(0.01, 1.01, 0.01)) -> list[ck.Check]:
    """The within-run gated checks of one run (int8-wo vs fp), from its arrays."""
    from evalsuite import stats

    q = run["int8-wo"]
    kld, n = q["ppl/wikitext2/int8-wo/kld_sum"], q["ppl/wikitext2/int8-wo/n"]
    mean, se_mean, k = stats.paired_ratio_shift(np.zeros_like(kld), kld, n)  # sum(kld)/sum(n), its se
    d, se_d, _ = stats.paired_ratio_shift(run["fp"]["ppl/wikitext2/fp/nll_sum"], q["ppl/wikitext2/int8-wo/nll_sum"], n)
    a = np.concatenate([v for key, v in run["fp"].items() if key.endswith("/fp/acc")])
    b = np.concatenate([v for key, v in q.items() if key.endswith("/int8-wo/acc")])
    ci = stats.paired_proportion_diff_ci(a, b)
    metrics = [
        (Metric("ppl", "wikitext2", "int8-wo", "kld_mean", mean, "nats", int(n.sum()), False,
                ci95=[mean - 1.96 * se_mean, mean + 1.96 * se_mean], extra={"windows": k}), limits[0], True),
        (Metric("ppl", "wikitext2", "int8-wo", "ppl_ratio", math.exp(d), "ratio", int(n.sum()), False,
                ci95=[math.exp(d - 1.96 * se_d), math.exp(d + 1.96 * se_d)], extra={"windows": k}), limits[1], True),
        (Metric("tasks", "pooled", "int8-wo", "delta_acc", float(b.mean() - a.mean()), "fraction", a.size, True,
                ci95=ci), -limits[2], False),
    ]
    return [_limit_check(m, lim, up, f"{m.stage}/{m.task}/{m.variant}/{m.metric}", "test") for m, lim, up in metrics]


def judge_once(world: World, baseline: dict, rng, noise: NoiseModel, **plant) -> list[ck.Check]:
    cand = world.run(rng, **plant)
    checks = _within(cand)
    for g in ("fp", "int8-wo"):
        checks += paired_checks(baseline[g], cand[g], g, noise, [], alpha=0.01)
    return ck.finalize(checks, strict=False, alpha=0.01)


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def _page_rate(world, runs: int, seed: int, **plant) -> tuple[float, dict]:
    rng = np.random.default_rng(seed)
    noise = NoiseModel()
    paged, which = 0, {}
    for _ in range(runs):
        baseline = world.run(rng)  # the baseline is itself one honest run
        failing = [c.check for c in judge_once(world, baseline, rng, noise, **plant) if c.failing]
        paged += bool(failing)
        for f in failing:
            which[f] = which.get(f, 0) + 1
    return paged / runs, which


def test_aa_family_wise_false_alarm_rate_is_at_most_one_percent(world):
    rate, which = _page_rate(world, 1000, seed=1)
    assert rate <= 0.01, which


@pytest.mark.parametrize("plant, check", [
    ({"kld_factor": 1.30}, "baseline:ppl/wikitext2/int8-wo/kld_mean_rel"),         # int8-wo KLD +30%
    ({"kld_factor": 1.29}, "baseline:ppl/wikitext2/int8-wo/kld_top1pct_rel"),      # fp8 scales in one MLP: +29%
    ({"nll_shift": math.log(1.005)}, "baseline:ppl/wikitext2/fp/nll_shift"),       # harness bug: ppl +0.5% on all
    ({"acc_drop": 0.015}, "baseline:tasks/pooled/int8-wo/acc_shift"),              # 1.5-point pooled drop
])
def test_planted_regression_pages_with_at_least_80_percent_power(world, plant, check):
    rate, which = _page_rate(world, 100, seed=2, **plant)
    assert rate >= 0.8, which
    assert which.get(check, 0) >= 0.8 * 100, which


def test_a_harness_bug_on_fp_and_variant_alike_fails_both(world):
    rng = np.random.default_rng(3)
    checks = judge_once(world, world.run(rng), rng, NoiseModel(), nll_shift=math.log(1.005))
    failing = {c.check for c in checks if c.failing}
    assert {"baseline:ppl/wikitext2/fp/nll_shift", "baseline:ppl/wikitext2/int8-wo/nll_shift"} <= failing
    # within the run, fp and variant moved together: the quantization checks see nothing
    assert not any(c.kind == "limit" for c in checks if c.failing)


def test_without_noise_margins_the_same_reruns_page_often(world, monkeypatch):
    """The A/A test can fail: judged on sampling error alone (margins 0), honest reruns page."""
    import evalsuite.judge.noise as noise_mod

    monkeypatch.setattr(noise_mod, "FLOORS", {"*": 0.0})
    rate, _ = _page_rate(world, 100, seed=1)
    assert rate > 0.2


# ---- one MLP's scales cast to fp8, through the real quantizer and the real ppl statistics ----

def _tiny_bf16_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.1)  # peaked enough for a visible KLD
    return LlamaForCausalLM(cfg).eval().requires_grad_(False).to(torch.bfloat16)


def _ppl_arrays(fp, variant, batch: int, attention: str = "sdpa") -> dict:
    """The int8-wo group's paired arrays of one ppl pass, built by the ppl stage's own functions."""
    from evalsuite.judge.paired import paired_arrays
    from evalsuite.measure.perplexity import Protocol, Windows, measure_pass, paired_records, variant_records
    from evalsuite.results import Results

    for m in (fp, variant):
        m.config._attn_implementation = attention
    w, ctx = 24, 64
    ids = torch.randint(0, 256, (w, ctx), generator=torch.Generator().manual_seed(1))
    win = Windows(input_ids=ids, first=np.ones(w, dtype=int), start=np.arange(w) * ctx, n_words=np.full(w, 10),
                  n_bytes=np.full(w, 50), n_corpus_tokens=w * ctx, n_tail_unscored=0, bos=False,
                  protocol=Protocol(context=ctx))
    with torch.inference_mode():
        res = measure_pass({"fp": fp, "int8-wo": variant}, win, torch.device("cpu"), batch)
    r = Results(run={})
    r.details["ppl"] = {"task": "t", "windows": {"start": win.start.tolist()}, "paired": {
        "int8-wo": paired_records(res.pairs["int8-wo"], 0, "fp")[1]},
        "variants": {v: variant_records(res.nll[v], win, 0)[1] for v in ("fp", "int8-wo")}}
    return paired_arrays(r, "int8-wo")


def test_one_layer_with_fp8_cast_scales_fails_where_an_honest_rerun_passes():
    import copy

    from evalsuite.quantize import parse_schemes, quantize_

    fp = _tiny_bf16_llama()
    (cfg,) = parse_schemes("int8-wo")
    q = quantize_(copy.deepcopy(fp), cfg)
    broken = copy.deepcopy(q)
    layer = broken.get_submodule("model.layers.1.mlp.down_proj")
    layer.scales.copy_(layer.scales.float().to(torch.float8_e4m3fn).float().to(layer.scales.dtype))
    base = _ppl_arrays(fp, q, batch=4)
    rerun = _ppl_arrays(fp, q, batch=1, attention="eager")  # another batch plan and attention kernel
    planted = _ppl_arrays(fp, broken, batch=4)

    def failing(cand):
        checks = ck.finalize(paired_checks(base, cand, "int8-wo", NoiseModel(), [], alpha=0.01), False, 0.01)
        return {c.check: c for c in checks if c.failing}

    assert not failing(rerun)
    bad = failing(planted)
    assert "baseline:ppl/t/int8-wo/kld_mean_rel" in bad, bad
    assert "relative change of mean KLD" in bad["baseline:ppl/t/int8-wo/kld_mean_rel"].reason


# ---- through the CLI: old baselines, provenance, what is gated ----

def _gate(tmp_path, baseline_path, cand, *extra):
    from evalsuite.commands.cli import main

    c = tmp_path / "cand.json"
    cand.save(c)
    out = tmp_path / "gate-out"
    code = main(["gate", "--baseline", str(baseline_path), "--candidate", str(c), "--out", str(out), "--formats", "json",
                 "--no-history", *extra])
    return code, {v["check"]: v for v in json.loads((out / "results.json").read_text())["verdicts"]}


def test_schema_1_baseline_loads_and_is_judged_unpaired_never_pass(tmp_path):
    from test_judge import make_results

    # a schema /1 file is what the committed int4 baseline was until 2026-12-01: the same metrics
    # without paired data, provenance or noise; gate an int8-wo run on it by name
    stored = json.loads((STORED / "int4-wo-g128.json").read_text())
    for key in ("paired", "measured", "noise"):
        stored.pop(key, None)
    stored["schema"] = "evalsuite.baseline/1"
    stored["variant"] = "int8-wo"
    for m in stored["metrics"]:
        m["variant"] = "int8-wo" if m["variant"] == "int4-wo-g128" else m["variant"]
    old = tmp_path / "int8-wo.json"
    old.write_text(json.dumps(stored))
    cand = make_results(seed=2, sha=stored["model"]["sha256"])
    code, v = _gate(tmp_path, old, cand)
    primaries = [k for k in v if k.startswith("baseline:") and k.endswith(("nll_shift", "kld_mean_rel", "acc_shift"))]
    assert primaries
    for k in primaries:
        assert v[k]["verdict"] == "INCONCLUSIVE" and "unpaired" in v[k]["reason"] and "schema evalsuite.baseline/1" \
            in v[k]["reason"], v[k]
    assert code == 0  # nothing gated could be judged, and nothing is claimed


def test_every_gated_check_has_an_uncertainty_and_says_what_it_is(tmp_path):
    from test_judge import make_results

    from evalsuite.commands.cli import main

    base = tmp_path / "base.json"
    make_results(seed=1).save(base)
    folder = tmp_path / "baselines"
    assert main(["baseline", "update", str(base), "--dir", str(folder)]) == 0
    # a calibration beside the baselines with a measured between-process speed spread: tokens/s gates too
    (folder / "SmolLM2-135M" / "cuda-bf16" / "noise.json").write_text(json.dumps({
        "schema": "evalsuite.noise/1", "source": "bench_aa speed fixture",
        "statistics": {"speed/decode_bs1/fp/tokens_per_s_rel": {"between_process_sd": 0.03, "processes": 5}}}))
    cand = tmp_path / "cand.json"
    make_results(seed=2).save(cand)
    out = tmp_path / "o"
    main(["gate", "--baselines", str(folder), "--candidate", str(cand), "--out", str(out), "--formats", "json",
          "--no-history"])
    v = {x["check"]: x for x in json.loads((out / "results.json").read_text())["verdicts"]}
    gated = {k: c for k, c in v.items() if c.get("gated")}
    names = {k.split(":")[-1].rsplit("/", 1)[-1] for k in gated}
    assert {"nll_shift", "kld_mean_rel", "kld_top1pct_rel", "acc_shift", "kld_mean", "ppl_ratio", "delta_acc",
            "tokens_per_s", "speedup", "nonfinite_tokens"} <= names | {k.rsplit("/", 1)[-1] for k in gated}, names
    assert v["baseline:speed/decode_bs1/int8-wo/tokens_per_s"]["gated"]  # another variant's spread, same task
    assert "bench_aa speed fixture" in v["baseline:speed/decode_bs1/fp/tokens_per_s"]["reason"]
    for k, c in gated.items():
        exact = c.get("metric") == "nonfinite_tokens"
        assert exact or c.get("p_value") is not None, k
        assert exact or "interval" in c, k
        reason = c["reason"]
        assert c["metric"] in reason, (k, reason)
        assert exact or any(w in reason for w in ("se ", "CI", "σ")), (k, reason)
        assert exact or any(w in reason for w in ("margin", "noise", "floor")), (k, reason)
    # extremes and the harness's own noise floor are never gated
    for k, c in v.items():
        if k.endswith(("kld_max", "kld_p99", "kld_p99_9", "min_output_sqnr_db")) or "fp@noise" in k:
            assert not c.get("gated"), k


def test_candidate_measured_another_way_is_told_and_gets_cross_path_noise(tmp_path):
    from evalsuite.commands.cli import main
    from test_judge import make_results

    folder = tmp_path / "baselines"
    first = tmp_path / "first.json"
    make_results(seed=1).save(first)
    assert main(["baseline", "update", str(first), "--dir", str(folder)]) == 0
    where = folder / "SmolLM2-135M" / "cuda-bf16"
    (where / "noise.json").write_text(json.dumps({
        "schema": "evalsuite.noise/1", "source": "bench_aa test fixture",
        "statistics": {"ppl/wikitext2/int8-wo/kld_mean_rel": {"same_path": 0.01, "cross_path": 0.2}}}))
    cand = make_results(seed=2)
    cand.run["kernels"] = "eager"
    c = tmp_path / "cand.json"
    cand.save(c)
    out = tmp_path / "o"
    main(["gate", "--baselines", str(folder), "--candidate", str(c), "--out", str(out), "--formats", "json",
          "--no-history"])
    v = {x["check"]: x for x in json.loads((out / "results.json").read_text())["verdicts"]}
    kld = v["baseline:ppl/wikitext2/int8-wo/kld_mean_rel"]
    assert "measured another way: kernels eager vs baseline fused" in kld["reason"]
    assert kld["tolerance"] == pytest.approx(0.6) and "cross-path" in kld["reason"] and "bench_aa test fixture" in kld["reason"]
    # speed timed with other kernels is reported, not gated
    assert not v["baseline:speed/decode_bs1/int8-wo/tokens_per_s"].get("gated")


def test_one_window_or_one_item_is_inconclusive(tmp_path):
    from evalsuite.judge import judge
    from evalsuite.judge.config import load_gate_config
    from test_judge import make_results

    res = make_results(seed=1, limit=1)
    v = {c.check: c for c in judge(res, load_gate_config())}
    assert v["ppl/wikitext2/int8-wo/kld_mean"].verdict == "INCONCLUSIVE"
    assert "no uncertainty" in v["ppl/wikitext2/int8-wo/kld_mean"].reason
    assert v["tasks/pooled/int8-wo/delta_acc"].verdict == "INCONCLUSIVE"
    # paired against itself on one window: no uncertainty either
    from evalsuite.judge.paired import paired_arrays

    arrays = paired_arrays(res, "int8-wo")
    checks = paired_checks(arrays, arrays, "int8-wo", NoiseModel(), [], 0.01)
    assert {c.verdict for c in checks if "ppl/" in c.check} == {"INCONCLUSIVE"}
    json.dumps([c.to_dict() for c in checks], allow_nan=False)  # a results file stays strict JSON


@pytest.mark.parametrize("flag, gated", [((), False), (("--gate-cpu-speed",), True)])
def test_cpu_speed_baselines_are_informational_unless_asked(tmp_path, flag, gated):
    from test_judge import make_results

    base = tmp_path / "base.json"
    make_results(seed=1, device="cpu").save(base)
    code, v = _gate(tmp_path, base, make_results(seed=2, device="cpu", speed=0.5), *flag)
    # --gate-cpu-speed lets CPU timings through to the next condition: a run-to-run calibration,
    # which these baselines lack, so both stay reported (the calibrated case: test_judge_speed)
    for key in ("speedup", "tokens_per_s"):
        c = v[f"baseline:speed/decode_bs1/int8-wo/{key}"]
        assert not c.get("gated") and c["verdict"] == "WORSE", c
        assert ("no run-to-run speed calibration" if gated else "--gate-cpu-speed") in c["reason"], c
    assert code == 0


def test_noise_margin_is_the_floor_or_three_times_the_measured_noise():
    from evalsuite.judge.noise import NoiseModel

    nm = NoiseModel(statistics={"ppl/w/int8-wo/kld_mean_rel": {"same_path": 0.01, "cross_path": 0.05}},
                    source="bench", calibrated=True)
    assert nm.margin("ppl/w/int8-wo/kld_mean_rel", False)[0] == pytest.approx(0.10)  # floor wins
    assert nm.margin("ppl/w/int8-wo/kld_mean_rel", True)[0] == pytest.approx(0.15)
    assert nm.margin("ppl/w/int4-wo-g128/kld_mean_rel", True)[0] == pytest.approx(0.15)  # another scheme's
    margin, why = NoiseModel().margin("ppl/w/fp/nll_shift", False)
    assert margin == pytest.approx(1e-3) and "uncalibrated" in why


def test_holm_keeps_the_family_wise_budget():
    from evalsuite.stats import holm_reject

    assert holm_reject([0.001, 0.02, 0.004], 0.01) == [True, False, True]
    assert holm_reject([0.004, 0.004, 0.004], 0.01) == [False, False, False]  # 0.004 > 0.01/3
    assert holm_reject([None, 0.001], 0.01) == [False, True]


def test_bench_aa_calibrates_from_finished_runs_and_baseline_update_embeds_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    from evalsuite.commands.cli import main
    from test_judge import make_results

    runs = []
    for i, label in enumerate(("default", "eager", "batch")):
        (tmp_path / label).mkdir()
        r = make_results(seed=10 + i)
        r.run["kernels"] = "eager" if label == "eager" else "fused"
        r.save(tmp_path / label / "results.json")
        runs.append(str(tmp_path / label / "results.json"))
    folder = tmp_path / "baselines"
    env = {**__import__("os").environ, "OUT": str(tmp_path / "out")}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_aa.py"), "--from", *runs,
                        "--write-baselines", str(folder)], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    noise = json.loads((folder / "SmolLM2-135M" / "cuda-bf16" / "noise.json").read_text())
    assert noise["schema"] == "evalsuite.noise/1" and "bench_aa" in noise["source"]
    kld = noise["statistics"]["ppl/wikitext2/int8-wo/kld_mean_rel"]
    assert kld["pairs"] == 2 and kld["cross_path"] > 0 and kld["gated"]
    assert (tmp_path / "out" / "bench_aa.json").is_file()
    report = json.loads((tmp_path / "out" / "bench_aa.json").read_text())
    assert report["task_flips"]["arc_easy/fp"]["eager"]["flipped"] > 0  # realistic reruns flip answers
    assert main(["baseline", "update", runs[0], "--dir", str(folder)]) == 0
    b = json.loads((folder / "SmolLM2-135M" / "cuda-bf16" / "int8-wo.json").read_text())
    assert b["noise"]["source"] == noise["source"] and b["noise"]["calibrated"]


def test_nightly_splits_the_false_alarm_budget_across_its_entries(tmp_path):
    from evalsuite.commands.nightly import expand_entries

    entries = expand_entries({"matrix": {"model": ["/m/a.gguf", "/m/b.gguf"], "quant": ["int8-wo", "int4-wo-g128"]}},
                             "test")
    cmds = [e.command(tmp_path / e.name, None) for e in entries]
    assert all(c[c.index("--alpha") + 1] == "0.0025" for c in cmds)
    (own,) = expand_entries({"entries": [{"model": "/m/a.gguf", "alpha": 0.05}]}, "test")
    cmd = own.command(tmp_path, None)
    assert cmd[cmd.index("--alpha") + 1] == "0.05"


def test_a_check_made_elsewhere_keeps_failing_on_fail_outside_the_holm_family():
    """Checks of other modules (e.g. completeness) that do not say whether they are gated keep the
    old rule, FAIL fails the run; reported checks never do."""
    other = ck.Check("run/complete", "run", ck.FAIL, "a stage is missing")
    reported = ck.Check("x", "baseline", ck.FAIL, "r", gated=False)
    weak = ck.Check("y", "baseline", ck.FAIL, "g", gated=True, p_value=0.009, fallback=(ck.WITHIN_NOISE, ""))
    strong = ck.Check("z", "baseline", ck.FAIL, "g", gated=True, p_value=0.001)
    fine = ck.Check("w", "baseline", ck.PASS, "g", gated=True, p_value=0.5)
    ck.finalize([other, reported, weak, strong, fine], strict=False, alpha=0.01)  # Holm: 0.009 > 0.01/2
    assert other.failing and not reported.failing and strong.failing
    assert not weak.failing and weak.verdict == ck.WITHIN_NOISE and "Holm over 3" in weak.reason
    assert ck.exit_code([c.to_dict() for c in (other, reported)]) == 1


def test_pooled_accuracy_of_a_scheme_known_lossy_by_its_baselines_is_not_permanently_red(tmp_path):
    from evalsuite.judge import judge
    from evalsuite.judge.baseline import from_results
    from evalsuite.judge.config import load_gate_config
    from test_judge import make_results

    lossy = dict(kld=0.1)  # flips ~20% of answers right→wrong: pooled drop far beyond 1 point
    base, cand = make_results(seed=1, **lossy), make_results(seed=2, **lossy)
    bls = [from_results(base, g) for g in ("fp", "int8-wo")]
    config = load_gate_config()
    alone = {c.check: c for c in judge(cand, config)}
    assert alone["tasks/pooled/int8-wo/delta_acc"].failing  # without a baseline the limit gates
    with_b = {c.check: c for c in judge(cand, config, bls)}
    pooled = with_b["tasks/pooled/int8-wo/delta_acc"]
    assert not pooled.failing and "known lossy" in pooled.reason
    assert with_b["baseline:tasks/pooled/int8-wo/acc_shift"].gated
