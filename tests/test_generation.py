"""Stage gen: generation fidelity records, their noise floor, and a cache-only fault caught."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from evalsuite.judge.checks import FAIL, PASS, finalize
from evalsuite.judge.config import DEFAULTS, GateConfig
from evalsuite.judge.generation import generation_checks
from evalsuite.judge.within import ppl_checks, within_run_checks
from evalsuite.measure import generation as G
from evalsuite.measure import perplexity as P
from evalsuite.quantize import parse_schemes, quantize_
from tests.test_generate import sharp_tiny_llama
from tests.test_perplexity import make_ctx

pytestmark = pytest.mark.filterwarnings("ignore")

GEN = dict(gen_sources="wikitext2", gen_prompts=6, gen_new_tokens=12, gen_prefix_tokens=16)


def with_cached_position_fault(model):
    """A copy whose decode steps (one new token on a cache) get positions counted from 0 again after
    the prompt, a wrong offset: the prompt's forward, and any teacher-forced one, are untouched."""
    faulty = copy.deepcopy(model)
    forward = faulty.forward
    prompt_end = {}

    @functools.wraps(forward)
    def shifted(*args, position_ids=None, **kwargs):
        if position_ids is not None and position_ids.shape[-1] == 1 and "base" in prompt_end:
            position_ids = position_ids - prompt_end["base"][: position_ids.shape[0]]
        elif position_ids is not None:
            prompt_end["base"] = position_ids[:, -1:] + 1
        return forward(*args, position_ids=position_ids, **kwargs)

    faulty.forward = shifted
    return faulty


def _limits(variant):
    pattern, limits = GateConfig(copy.deepcopy(DEFAULTS)).scheme(variant)
    return pattern, limits


def test_a_cache_only_fault_fails_the_fidelity_check_while_ppl_passes(smollm2, tmp_path, data_dir):
    fp = smollm2.model
    (int8,) = parse_schemes("int8-wo")
    variants = {"fp": fp, "int8-wo": quantize_(copy.deepcopy(fp), int8), "fp-cachefault": with_cached_position_fault(fp)}
    ctx = make_ctx(variants, tmp_path, tokenizer=smollm2.tokenizer, ppl_windows=3,
                   **{**GEN, "gen_new_tokens": 10})  # 6 prompts: the FAIL stands after Holm with room to spare
    ctx.data_dir = data_dir
    P.run(ctx)
    G.run(ctx)
    res = ctx.results
    res.run["stages"] = ["ppl", "gen"]
    # teacher forcing cannot see it: no ppl check of the faulty copy fails. Its teacher-forced logits
    # are fp's exactly (KLD 0 in every window, a zero-width CI), which the judge reports as
    # INCONCLUSIVE (no uncertainty, no verdict), not PASS: the claim is that nothing fails
    pattern, limits = _limits("fp-cachefault")
    ppl = ppl_checks(res, "fp-cachefault", limits, pattern)
    assert ppl and not any(c.verdict == FAIL for c in ppl), [(c.check, c.verdict, c.reason) for c in ppl]
    assert res.get("ppl", "corpus", "fp-cachefault", "kld_mean").value == pytest.approx(0.0, abs=1e-9)
    assert res.get("gen", "generation", "fp-cachefault", "tf_kld_generated").value == pytest.approx(0.0, abs=1e-9)
    # the fidelity check does: a gated non-inferiority FAIL with a p-value, in the Holm family
    checks = {c.metric: c for c in generation_checks(res, "fp-cachefault", limits, pattern)}
    agreement = checks["decode_agreement"]
    assert agreement.verdict == FAIL, agreement.reason
    assert agreement.gated and agreement.p_value is not None, agreement
    assert res.get("gen", "generation", "fp-cachefault", "identical_fraction").value < 0.5
    # and it still fails after Holm over the run's whole family of gated checks, while no ppl one does
    judged = finalize(within_run_checks(res, GateConfig(copy.deepcopy(DEFAULTS))), strict=False)
    failing = {c.check for c in judged if c.failing}
    assert "gen/fp-cachefault/decode_agreement" in failing, [(c.check, c.verdict, c.reason) for c in judged]
    assert not any(name.startswith("ppl/") and "/fp-cachefault/" in name for name in failing), failing
    # and raises no alarm on a correct variant, nor on fp's own decoding
    pattern, limits = _limits("int8-wo")
    honest = {c.metric: c for c in generation_checks(res, "int8-wo", limits, pattern)}
    assert honest["decode_agreement"].verdict == PASS, honest["decode_agreement"].reason
    assert res.get("gen", "generation", "fp", "decode_agreement").value == 1.0
    assert res.get("gen", "generation", "int8-wo", "identical_fraction").value > \
        res.get("gen", "generation", "fp-cachefault", "identical_fraction").value


def test_records_their_definitions_and_the_bf16_noise_floor(tmp_path, data_dir):
    fp32 = sharp_tiny_llama(seed=5)
    fp = copy.deepcopy(fp32).to(torch.bfloat16)
    (int8,) = parse_schemes("int8-wo")
    variants = {"fp": fp, "int8-wo": quantize_(copy.deepcopy(fp), int8)}
    ctx = make_ctx(variants, tmp_path, dtype=torch.bfloat16, reload=lambda dtype: copy.deepcopy(fp32).to(dtype), **GEN)
    ctx.data_dir = data_dir
    G.run(ctx)
    res = ctx.results
    for variant in ("int8-wo", G.NOISE):
        for metric in ("identical_fraction", "divergence_tokens_median", "tf_kld_prompt", "tf_kld_generated"):
            rec = res.get("gen", "generation", variant, metric)
            assert rec is not None and rec.definition and rec.ci95 is not None, (variant, metric)
            assert rec.ci95[0] <= rec.value <= rec.ci95[1]
    gens = res.details["gen"]["generations"]
    same = sum(a == b for a, b in zip(gens["fp"], gens["int8-wo"]))
    assert res.get("gen", "generation", "int8-wo", "identical_fraction").value == pytest.approx(same / 6)
    assert res.get("gen", "generation", G.NOISE, "tf_kld_prompt").value > 0  # bf16 rounding is measured
    assert "float32" in res.get("gen", "generation", G.NOISE, "identical_fraction").definition
    assert res.details["gen"]["noise_floor"].startswith("measured")
    # each prompt named by its source and tokens, so that a baseline pairs only with the same prompts
    keys = res.details["gen"]["prompt_keys"]
    assert len(keys) == 6 and len(set(keys)) == 6 and G.prompt_key("wikitext2", [1, 2]) != G.prompt_key("gsm8k", [1, 2])


@pytest.mark.parametrize("options, message", [
    ({"gen_sources": "gsm8k,books"}, "--gen-sources: unknown books"),
    ({"gen_prompts": 0}, "--gen-prompts must be at least 1"),
    ({"gen_new_tokens": 0}, "--gen-new-tokens must be at least 1"),
])
def test_bad_options_are_refused_before_the_model_loads(options, message):
    from evalsuite.app.config import RunConfig
    from evalsuite.errors import EvalsuiteError

    with pytest.raises(EvalsuiteError, match=message):
        G.validate(RunConfig.of_options(**{"gen_sources": None, "gen_prompts": None, "gen_new_tokens": None,
                                           "gen_prefix_tokens": None, **options}))


def test_the_stage_is_registered_opt_in_and_selectable_by_name():
    from evalsuite.measure import DEFAULT_STAGES, OPT_IN, STAGE_MODULES, get_stage, parse_stages

    assert "gen" in STAGE_MODULES and get_stage("gen").name == "gen"
    # opt-in: its default limits are not yet checked against honest GPU reruns, so "all" leaves it out
    assert "gen" in OPT_IN and "gen" not in DEFAULT_STAGES
    assert "gen" not in parse_stages("all") and parse_stages("all") == ["ppl", "tasks", "layers", "speed"]
    assert parse_stages("gen") == ["gen"]
    assert parse_stages("speed,gen,ppl") == ["ppl", "gen", "speed"]  # pipeline order


# ------------------------------------------------------------------------------ judged against the noise floor
def synthetic_gen_run(identical: dict[str, list[int]], kld: float = 1e-3, seed: int = 0):
    """A judged-ready gen run: per variant (fp@noise included) its per-prompt identical flags, a
    teacher-forced KLD ``kld`` with a tight interval and a perfect decode agreement."""
    import numpy as np

    from evalsuite.results import Results
    from evalsuite.stats import wilson_interval

    rng = np.random.default_rng(seed)
    res = Results(run={"stages": ["gen"], "schemes": [v for v in identical if v != G.NOISE], "dtype": "bf16",
                       "finished": "now"})
    res.details["gen"] = {"noise_floor": "measured: fp in the run's dtype vs fp in float32", "paired": {}}
    for variant, flags in identical.items():
        n = len(flags)
        div = [64.0 if f else float(rng.integers(0, 64)) for f in flags]
        res.details["gen"]["paired"][variant] = {"identical": list(flags), "divergence": div}
        res.add(stage="gen", task="generation", variant=variant, metric="identical_fraction", value=sum(flags) / n,
                unit="fraction", n=n, ci95=wilson_interval(sum(flags), n), higher_is_better=True)
        res.add(stage="gen", task="generation", variant=variant, metric="tf_kld_generated", value=kld, unit="nats",
                n=n * 64, ci95=[kld * 0.8, kld * 1.2], higher_is_better=False)
        res.add(stage="gen", task="generation", variant=variant, metric="decode_agreement", value=0.999,
                unit="fraction", n=n * 64, ci95=[0.995, 1.0], higher_is_better=True)
    return res


def _noise_level(n: int, rate: float, rng) -> list[int]:
    return [int(x) for x in rng.random(n) < rate]


def test_a_variant_that_ruins_generation_fails_while_its_kld_passes():
    import numpy as np

    rng = np.random.default_rng(1)
    noise = _noise_level(64, 0.66, rng)
    ruined = [1 if i < 3 else 0 for i in range(64)]  # 3 of 64 generations equal fp's; KLD stays tiny
    res = synthetic_gen_run({G.NOISE: noise, "int8-wo": ruined})
    judged = finalize(within_run_checks(res, GateConfig(copy.deepcopy(DEFAULTS))), strict=False)
    by_name = {c.check: c for c in judged}
    check = by_name["gen/int8-wo/identical_vs_noise"]
    assert check.verdict == FAIL and check.failing and check.gated and check.p_value < 1e-6, check.reason
    assert "Holm over" in check.extra["family"]  # in the run's one family of primary checks
    assert check.limit == pytest.approx(0.5 * sum(noise) / 64)  # int8's 0.5 × the measured floor
    assert by_name["gen/int8-wo/tf_kld_generated"].verdict == PASS
    assert by_name["gen/int8-wo/decode_agreement"].verdict == PASS
    assert "fp@noise" in check.reason and "median tokens to the first divergence" in check.reason


def test_no_false_alarm_for_fp_itself_or_a_variant_at_the_noise_level():
    import numpy as np

    pattern, limits = _limits("int8-wo")
    rng = np.random.default_rng(2)
    # fp against itself: every generation identical; with a floor of all-identical too (every d_i
    # alike: the unpaired Wilson fallback, not a zero-width interval)
    for noise in (_noise_level(64, 0.66, rng), [1] * 64):
        res = synthetic_gen_run({G.NOISE: noise, "int8-wo": [1] * 64})
        (check,) = [c for c in generation_checks(res, "int8-wo", limits, pattern) if c.check.endswith("vs_noise")]
        assert check.verdict == PASS, check.reason
    # a variant whose generations diverge at the rate rounding alone gives: no FAIL over 300 runs
    verdicts = []
    for seed in range(300):
        rng = np.random.default_rng(100 + seed)
        res = synthetic_gen_run({G.NOISE: _noise_level(64, 0.66, rng), "int8-wo": _noise_level(64, 0.66, rng)})
        (check,) = [c for c in generation_checks(res, "int8-wo", limits, pattern) if c.check.endswith("vs_noise")]
        verdicts.append(check.verdict)
    assert FAIL not in verdicts and verdicts.count(PASS) > 250


def test_without_a_measured_floor_the_identical_fraction_is_not_judged():
    pattern, limits = _limits("int8-wo")
    res = synthetic_gen_run({"int8-wo": [0] * 64})
    res.details["gen"]["noise_floor"] = "trivial: the run's dtype is float32, the reference precision itself"
    (check,) = [c for c in generation_checks(res, "int8-wo", limits, pattern) if c.check.endswith("vs_noise")]
    assert check.verdict == "SKIPPED" and "gen_identical_min" in check.reason and not check.gated


def test_gen_limits_are_known_keys_of_a_gates_file(tmp_path):
    from evalsuite.errors import EvalsuiteError
    from evalsuite.judge.config import load_gate_config

    f = tmp_path / "g.yaml"
    f.write_text('schemes:\n  "int4-*": {gen_identical_vs_noise_min: 0.1, gen_kld_max: 0.2, gen_identical_min: 0.05}\n')
    assert load_gate_config(f).scheme("int4-wo")[1]["gen_identical_vs_noise_min"] == 0.1
    f.write_text('schemes:\n  "int4-*": {gen_identical_vs_noise_min: "low"}\n')
    with pytest.raises(EvalsuiteError, match="gen_identical_vs_noise_min"):
        load_gate_config(f)


# ------------------------------------------------------------------------------ judged against a stored baseline
def gen_baseline_run(identical: dict[str, list[int]], seed: int = 0, new_tokens: int = 64):
    """``synthetic_gen_run`` with what a baseline needs: the model, the card and the prompts' keys."""
    res = synthetic_gen_run(identical, seed=seed)
    n = len(next(iter(identical.values())))
    res.run.update(model={"name": "tiny-gen", "sha256": "c" * 64}, device={"type": "cuda", "name": "synthetic"},
                   started=f"2026-12-01T00:{seed % 60:02d}:00+00:00", git_revision=f"rev{seed}",
                   stages_finished=["gen"], argv=["run"])
    res.details["gen"].update(prompt_keys=[f"{i:016x}" for i in range(n)], new_tokens=new_tokens,
                              protocol=f"{n} prompts (wikitext2 {n}), greedy, up to {new_tokens} new tokens")
    return res


def _gate_on(tmp_path, baseline, candidate):
    """``evalsuite baseline update`` from ``baseline``, then ``evalsuite gate`` of ``candidate``."""
    import json

    from evalsuite.commands.cli import main

    base, cand, folder, out = (tmp_path / x for x in ("base.json", "cand.json", "baselines", "out"))
    baseline.save(base)
    candidate.save(cand)
    assert main(["baseline", "update", str(base), "--dir", str(folder)]) == 0
    code = main(["gate", "--baselines", str(folder), "--candidate", str(cand), "--out", str(out), "--formats", "json",
                 "--no-history"])
    return code, {v["check"]: v for v in json.loads((out / "results.json").read_text())["verdicts"]}


def _flip(flags: list[int], rate: float, rng) -> list[int]:
    """An honest rerun: a ``rate`` of prompts flips identical↔diverged, as often one way as the other."""
    import numpy as np

    x = np.asarray(flags, dtype=bool)
    q = x.mean()
    p = np.where(x, rate / (2 * q), rate / (2 * (1 - q))) if 0 < q < 1 else np.full(x.size, rate / 2)
    return [int(v) for v in x ^ (rng.random(x.size) < np.minimum(p, 1.0))]


def test_the_same_run_as_its_own_baseline_passes_its_paired_gen_check(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    run = gen_baseline_run({G.NOISE: _noise_level(64, 0.66, rng), "int8-wo": _noise_level(64, 0.6, rng)})
    code, v = _gate_on(tmp_path, run, run)
    check = v["baseline:gen/generation/int8-wo/identical_shift"]
    assert check["verdict"] == PASS and check["gated"] and check["p_value"] is not None, check
    assert "default margin: no measured gen noise" in check["reason"] and "64 prompts" in check["reason"]
    assert check["tolerance"] == pytest.approx(0.10)
    assert not v["baseline:gen/generation/fp@noise/identical_shift"]["gated"]  # the dtype's rounding: reported
    assert not v["baseline:gen/generation/int8-wo/divergence_shift"]["gated"]
    assert code == 0, {k: c["verdict"] for k, c in v.items()}


def test_a_rerun_with_noise_level_prompt_flips_never_fails_the_paired_gen_check():
    import numpy as np

    from evalsuite.judge.noise import NoiseModel
    from evalsuite.judge.paired import paired_arrays, paired_checks

    rng = np.random.default_rng(4)
    noise, flags = _noise_level(64, 0.66, rng), _noise_level(64, 0.6, rng)
    base = paired_arrays(gen_baseline_run({G.NOISE: noise, "int8-wo": flags}), "int8-wo")
    verdicts = []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        rerun = gen_baseline_run({G.NOISE: noise, "int8-wo": _flip(flags, rng.uniform(0.05, 0.3), rng)}, seed=seed)
        checks = finalize(paired_checks(base, paired_arrays(rerun, "int8-wo"), "int8-wo", NoiseModel(), [], 0.01),
                          strict=False)
        (check,) = [c for c in checks if c.check == "baseline:gen/generation/int8-wo/identical_shift"]
        verdicts.append(check.verdict)
    assert FAIL not in verdicts and verdicts.count(PASS) > 150, verdicts


def test_a_collapsed_identical_fraction_fails_against_the_baseline(tmp_path):
    import numpy as np

    rng = np.random.default_rng(5)
    noise = _noise_level(64, 0.66, rng)
    base = gen_baseline_run({G.NOISE: noise, "int8-wo": [int(i >= 4) for i in range(64)]})  # 60 of 64 identical
    # 24 of 64: from 0.94 to 0.38, yet not below 0.5 × fp@noise's within the run: only the baseline sees it
    collapsed = gen_baseline_run({G.NOISE: noise, "int8-wo": [int(i % 8 < 3) for i in range(64)]}, seed=1)
    code, v = _gate_on(tmp_path, base, collapsed)
    check = v["baseline:gen/generation/int8-wo/identical_shift"]
    assert check["verdict"] == FAIL and check["gated"] and check["p_value"] < 1e-3, check
    assert "Holm over" in check["extra"]["family"] and "identical→diverged 39" in check["reason"]
    assert code == 1


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(prompt_keys=[f"{i + 1:016x}" for i in range(64)]),
     "different prompts: baseline 64, this run 64, 63 in common"),
    (lambda d: d.update(new_tokens=32), "another token budget: baseline up to 64 new tokens, this run 32"),
    (lambda d: d.pop("prompt_keys"), "this run does not name its gen prompts"),
])
def test_other_prompts_or_another_budget_are_not_paired(change, message):
    import numpy as np

    from evalsuite.judge.noise import NoiseModel
    from evalsuite.judge.paired import paired_arrays, paired_checks

    rng = np.random.default_rng(6)
    flags = {G.NOISE: _noise_level(64, 0.66, rng), "int8-wo": _noise_level(64, 0.6, rng)}
    base = paired_arrays(gen_baseline_run(flags), "int8-wo")
    cand = gen_baseline_run({**flags, "int8-wo": [0] * 64})
    change(cand.details["gen"])
    checks = paired_checks(base, paired_arrays(cand, "int8-wo"), "int8-wo", NoiseModel(), [], 0.01)
    assert [(c.check, c.verdict) for c in checks] == [("baseline:gen/generation/int8-wo/paired", "SKIPPED")]
    assert message in checks[0].reason


def test_a_baseline_written_before_gen_arrays_were_kept_is_skipped_never_pass(tmp_path):
    import hashlib
    import io
    import json

    import numpy as np

    rng = np.random.default_rng(7)
    run = gen_baseline_run({G.NOISE: _noise_level(64, 0.66, rng), "int8-wo": _noise_level(64, 0.6, rng)})
    code, v = _gate_on(tmp_path, run, run)
    stored = tmp_path / "baselines" / "tiny-gen" / "cuda-bf16"
    with np.load(stored / "int8-wo.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert {"gen/generation/prompt_keys", "gen/generation/int8-wo/identical"} <= set(arrays)
    # the same baseline as older code wrote it: paired data of other stages only
    old = {k: v for k, v in arrays.items() if not k.startswith("gen/")} or {"ppl/x/window_start": np.arange(2)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **old)
    (stored / "int8-wo.npz").write_bytes(buf.getvalue())
    meta = json.loads((stored / "int8-wo.json").read_text())
    meta["paired"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (stored / "int8-wo.json").write_text(json.dumps(meta))
    from evalsuite.commands.cli import main

    out = tmp_path / "out2"
    main(["gate", "--baselines", str(tmp_path / "baselines"), "--candidate", str(tmp_path / "cand.json"), "--out",
          str(out), "--formats", "json", "--no-history"])
    v = {x["check"]: x for x in json.loads((out / "results.json").read_text())["verdicts"]}
    check = v["baseline:gen/generation/int8-wo/identical_shift"]
    assert check["verdict"] == "SKIPPED" and "holds no per-window / per-item / per-prompt gen data" in check["reason"]
