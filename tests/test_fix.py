"""Fix suggestion: counterfactual sensitivity, the greedy search, the verification run, the CLI."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import torch

from conftest import make_tiny_llama
from evalsuite.app.fix import failing_checks, parse_budget, run_command
from evalsuite.measure.perplexity import paired_token_stats
from evalsuite.measure.sensitivity import (
    Counterfactuals,
    calibration_corpus,
    quantized_layer_names,
    restored,
)
from evalsuite.errors import EvalsuiteError
from evalsuite.quantize import parse_scheme, quantize_
from evalsuite.results import Results

BAD = "model.layers.0.mlp.down_proj"


def planted_model(vocab_size: int = 512, plant: bool = True, hidden: int = 64):
    """A tiny Llama whose logits depend on its layers enough for int8 errors to show (a sharper head,
    larger layer weights), with one planted bad layer: a large outlier in column 0 of every row of
    ``BAD``, so int8's per-row scale rounds the rest of that layer's weights to a few codes."""
    model = make_tiny_llama(vocab_size=vocab_size, hidden=hidden, layers=2, tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.mul_(2)
        if plant:
            model.get_submodule(BAD).weight[:, 0] = 6.0
    return model


def test_restored_swaps_fp_modules_in_and_back():
    fp = planted_model()
    q = quantize_(copy.deepcopy(fp), parse_scheme("int8-wo"))
    before = q.get_submodule(BAD)
    with restored(q, fp, [BAD]):
        assert q.get_submodule(BAD) is fp.get_submodule(BAD)
    assert q.get_submodule(BAD) is before


def test_restoring_a_layer_equals_quantizing_with_it_skipped():
    """The counterfactual is what ``--skip-layers`` builds: the same logits."""
    fp = planted_model()
    ids = torch.randint(0, 512, (1, 32))
    q = quantize_(copy.deepcopy(fp), parse_scheme("int8-wo"))
    skipped = quantize_(copy.deepcopy(fp), parse_scheme("int8-wo"), skip=(BAD,))
    with restored(q, fp, [BAD]):
        got = q(ids).logits
    assert torch.equal(got, skipped(ids).logits)
    assert not torch.equal(got, q(ids).logits)


def test_calibration_corpus_is_disjoint_from_the_evaluation_corpus():
    assert calibration_corpus("wikitext2", None) == "wikitext2-valid"
    assert calibration_corpus("wikitext2-valid", None) == "wikitext2"
    with pytest.raises(EvalsuiteError, match="fitted to the test"):
        calibration_corpus("wikitext2", "wikitext2")
    with pytest.raises(EvalsuiteError, match="give --fix-corpus"):
        calibration_corpus("my.txt", None)


@pytest.mark.parametrize("spec,value", [("25%", 0.25), ("10%", 0.1), ("0.5", 0.5), ("100%", 1.0)])
def test_parse_budget(spec, value):
    assert parse_budget(spec).fraction == pytest.approx(value) and parse_budget(spec).bits is None


@pytest.mark.parametrize("spec,bits", [("5.5bpw", 5.5), ("6 bits", 6.0), ("4.5BPW", 4.5)])
def test_parse_budget_in_bits_per_weight(spec, bits):
    assert parse_budget(spec).bits == bits and parse_budget(spec).fraction is None


@pytest.mark.parametrize("spec", ["0", "0%", "150%", "abc", "-1", "0bpw", "40bpw"])
def test_parse_budget_rejects(spec):
    with pytest.raises(EvalsuiteError, match="--fix-budget"):
        parse_budget(spec)


def test_run_command_replaces_scheme_skip_stages_and_out():
    argv = ["run", "--model", "m.gguf", "--quant", "int8-wo,int4-wo-g32", "--skip-layers=lm_head", "--stages", "all",
            "--ppl-context", "512", "--suggest-fix", "--out", "o"]
    cmd = run_command(argv, "/abs/m.gguf", "int4-wo-g32", ["lm_head", "model.layers.3.*"], ["ppl"], "o/fix/int4-wo-g32")
    assert cmd == ("evalsuite run --model /abs/m.gguf --ppl-context 512 --quant int4-wo-g32 "
                   "--skip-layers 'lm_head,model.layers.3.*' --stages ppl --out o/fix/int4-wo-g32")


def test_failing_checks_by_scheme_ignores_passing_and_baseline_checks():
    verdicts = [{"check": "a", "kind": "limit", "variant": "int8-wo", "failing": True, "stage": "ppl"},
                {"check": "b", "kind": "limit", "variant": "int4-wo-g32", "failing": False, "stage": "ppl"},
                {"check": "c", "kind": "baseline", "variant": "int4-wo-g32", "failing": True, "stage": "ppl"}]
    assert {k: [c["check"] for c in v] for k, v in failing_checks(verdicts).items()} == {"int8-wo": ["a"]}


# ---- end to end through the CLI, on a tiny model that shares SmolLM2's tokenizer

@pytest.fixture(scope="module")
def model_dirs(smollm2, tmp_path_factory):
    from safetensors.torch import save_model

    out = {}
    for name, plant in (("planted", True), ("honest", False)):
        d = tmp_path_factory.mktemp(name)
        model = planted_model(vocab_size=len(smollm2.tokenizer), plant=plant)
        model.config.save_pretrained(d)
        save_model(model, str(d / "model.safetensors"))
        smollm2.tokenizer.save_pretrained(d)
        out[name] = d
    return out


def _run_argv(model_dir, data_dir, out, *extra):
    return ["run", "--model", str(model_dir), "--stages", "ppl", "--quant", "int8-wo", "--device", "cpu",
            "--data-dir", str(data_dir), "--out", str(out), "--ppl-context", "64", "--ppl-windows", "16",
            "--no-progress", "--threads", "1", "--no-history", "--fix-tokens", "256", *extra]


def _main(argv, monkeypatch):
    from evalsuite.commands.cli import main

    monkeypatch.setattr("sys.argv", ["evalsuite", *argv])
    return main(argv)


@pytest.mark.slow
def test_cli_suggest_fix_raises_the_planted_layer_first_and_its_recipe_verifies(model_dirs, data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    out = tmp_path / "run"
    code = _main(_run_argv(model_dirs["planted"], data_dir, out, "--suggest-fix"), monkeypatch)
    assert code == 1  # the scheme as given failed
    results = Results.load(out / "results.json")
    assert any(v["check"].endswith("int8-wo/kld_mean") and v["verdict"] == "FAIL" for v in results.verdicts)
    fix = results.details["fix"]["int8-wo"]
    assert fix["set"][0] == BAD and fix["steps"][1]["moves"] == [f"{BAD}=fp"]
    assert fix["status"] == "verified" and fix["verified"]["pass"]
    assert fix["verified"]["metrics"]["kld_mean"]["value"] < 0.01
    assert fix["layers_raised"] < fix["layers_quantized"] and fix["bytes_extra"] <= fix["budget_bytes"]
    assert fix["calibration"]["source"].endswith("valid.txt")
    assert results.get("fix", BAD, "int8-wo", "kld_drop").value == max(fix["sensitivity"].values())
    assert results.get("fix", "suggestion", "int8-wo", "verified_pass").value == 1.0

    # the recipe file: evalsuite.recipe/1 beside results.json, the scheme by default, the planted layer raised
    recipe = json.loads((out / "fix" / "int8-wo.recipe.json").read_text())
    assert recipe["schema"] == "evalsuite.recipe/1" and recipe["default"] == "int8-wo"
    assert {"pattern": BAD, "scheme": "fp"} in recipe["layers"]
    # the recipe's effective bits per weight: between the scheme's and fp32's, as the verification recorded it
    verification = Results.load(out / "fix" / "int8-wo" / "results.json")
    assert all(v["verdict"] == "PASS" for v in verification.verdicts)
    assert verification.run["quant_details"]["int8-wo-fix"]["bits_per_weight"] == pytest.approx(fix["bits_per_weight"])
    assert fix["bits_per_weight_scheme"] < fix["bits_per_weight"] < 32
    # the verified step of the search is the recipe
    assert [st for st in fix["steps"] if "verdict" in st][-1]["bits_per_weight"] == pytest.approx(fix["bits_per_weight"])
    assert fix["search"] == "path" and fix["seconds_estimate"] > 0

    # the frontier: the visited points and the simple strategies, each with its bits and predicted KLD
    frontier = {p["strategy"]: p for p in fix["frontier"] if p["strategy"] != "search"}
    assert set(frontier) == {"q4_k_m-like", "lowest-sqnr", "first-last", "random-1234", "fp-only search"}
    # the fix as it was (each layer in the scheme or fp), searched to the same target: it keeps the planted
    # layer in fp too, and mixed formats never need more bytes than it does
    fp_only = frontier["fp-only search"]
    assert fp_only["target_met"] and fp_only["layers_raised"] >= 1
    assert fix["bits_per_weight"] <= fp_only["bits_per_weight"] + 1e-9
    assert all(p["bits_per_weight"] >= fix["bits_per_weight_scheme"] and p["predicted_kld_mean"] > 0
               for p in frontier.values())
    verified_points = [p for p in fix["frontier"] if p.get("verdict")]
    assert verified_points and verified_points[-1]["verified_kld_mean"] == fix["verified"]["metrics"]["kld_mean"]["value"]

    printed = capsys.readouterr().out
    assert fix["command"] in printed and f"--quant int8-wo-fix=recipe:{out / 'fix' / 'int8-wo.recipe.json'}" in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith("  verification checks: ") and "int8-wo-fix/kld_mean" in last and "limit 0.01: PASS" in last
    report = (out / "report.md").read_text()
    assert "Fix suggestion" in report and "q4_k_m-like" in report and "fix_frontier" in report

    # the printed command, run as a user would, passes the gate too
    argv = shlex.split(fix["command"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert _main([*argv, "--no-history"], monkeypatch) == 0


@pytest.mark.slow
def test_a_fix_stopped_by_sigterm_keeps_the_runs_results_and_says_the_fix_was_interrupted(model_dirs, data_dir,
                                                                                          tmp_path, monkeypatch, capsys):
    import signal

    from evalsuite.app import fix
    from evalsuite.errors import Interrupted

    def stopped(*args, **kwargs):  # as a CI job's cancellation arrives in the middle of the search
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(fix, "suggest", stopped)
    out = tmp_path / "run"
    assert _main(_run_argv(model_dirs["planted"], data_dir, out, "--suggest-fix"), monkeypatch) == 128 + signal.SIGTERM
    results = Results.load(out / "results.json")  # the run's own measurement and verdicts are kept
    assert any(v["check"].endswith("int8-wo/kld_mean") and v["verdict"] == "FAIL" for v in results.verdicts)
    assert results.details["fix"]["int8-wo"]["status"] == "interrupted by SIGTERM"
    assert "fix" in results.run["stage_seconds"]
    assert "interrupted by SIGTERM" in (out / "report.md").read_text()


@pytest.mark.slow
def test_fix_command_on_a_results_file_and_a_passing_scheme_gets_none(model_dirs, data_dir, tmp_path, monkeypatch,
                                                                       capsys):
    honest = tmp_path / "honest"
    assert _main(_run_argv(model_dirs["honest"], data_dir, honest, "--suggest-fix"), monkeypatch) == 0
    assert "fix" not in Results.load(honest / "results.json").details
    assert not (honest / "fix").exists()  # no recipe for a passing scheme
    assert _main(["fix", str(honest / "results.json")], monkeypatch) == 0
    assert "no fix needed" in capsys.readouterr().out

    planted = tmp_path / "planted"
    assert _main(_run_argv(model_dirs["planted"], data_dir, planted), monkeypatch) == 1
    assert "fix" not in Results.load(planted / "results.json").details
    # a budget smaller than the bad layer's next format: no recipe passes, and it says so with the best found
    code = _main(["fix", str(planted / "results.json"), "--fix-budget", "5%", "--fix-tokens", "256"], monkeypatch)
    assert code == 1
    fix = json.loads((planted / "results.json").read_text())["details"]["fix"]["int8-wo"]
    assert fix["status"] == "no recipe within the budget" and BAD not in fix["set"]
    assert fix["bytes_extra"] <= fix["budget_bytes"]
    printed = capsys.readouterr().out
    assert "no fix within the 5% budget; best found" in printed and "int8-wo-fix/kld_mean" in printed
    assert "gated checks not passed: ppl/wikitext2/int8-wo-fix/kld_mean" in printed
    # the greedy search (every move measured) from the same command
    assert _main(["fix", str(planted / "results.json"), "--fix-tokens", "256", "--fix-budget", "12bpw",
                  "--fix-search", "greedy"], monkeypatch) == 0
    fix = Results.load(planted / "results.json").details["fix"]["int8-wo"]
    assert fix["status"] == "verified" and fix["set"][0] == BAD and fix["bits_per_weight"] <= 12
    assert fix["search"] == "greedy" and fix["steps"][1]["moves"][0].startswith(f"{BAD}=")


def test_cli_rejects_bad_fix_options_before_loading(tmp_path, monkeypatch, capsys):
    assert _main(["run", "--stages", "ppl", "--suggest-fix", "--fix-budget", "0%", "--out", str(tmp_path)],
                 monkeypatch) == 2
    assert "--fix-budget" in capsys.readouterr().err
    assert _main(["run", "--stages", "ppl", "--suggest-fix", "--fix-corpus", "wikitext2", "--out", str(tmp_path)],
                 monkeypatch) == 2
    assert "fitted to the test" in capsys.readouterr().err
    assert _main(["run", "--stages", "ppl", "--suggest-fix", "--fix-search", "random", "--out", str(tmp_path)],
                 monkeypatch) == 2
    assert "--fix-search" in capsys.readouterr().err
    # evaluate()'s path has no argparse: the same option is checked before loading
    from evalsuite.app.config import FixConfig
    from evalsuite.app.fix import validate

    with pytest.raises(EvalsuiteError, match="--fix-search 'random'"):
        validate(FixConfig(suggest=True, search="random"))
    assert _main(["fix", str(tmp_path / "nope.json")], monkeypatch) == 2
    assert not (tmp_path / "results.json").exists()


@pytest.mark.gpu
def test_gpu_smollm2_int4_g128_gets_a_verified_recipe_or_says_none_fits(smollm2_path, data_dir, tmp_path, monkeypatch):
    """The issue's case on the device, in bf16, on 32 evaluation windows: int4-wo-g128 fails its ppl
    gate; the recipe is verified by its own re-run, or the report says none within 25% passes; a
    verified recipe has fewer bits per weight than bf16."""
    out = tmp_path / "run"
    # no baselines: the committed one marks int4-wo-g128 known lossy (gated on regression from it, exit 0)
    none = tmp_path / "no-baselines"
    none.mkdir()
    code = _main(["run", "--model", str(smollm2_path), "--quant", "int4-wo-g128", "--stages", "ppl", "--data-dir",
                  str(data_dir), "--out", str(out), "--ppl-windows", "32", "--no-history", "--suggest-fix",
                  "--baselines", str(none)], monkeypatch)
    results = Results.load(out / "results.json")
    # every assertion says what the run recorded: on the device only the output is left to read
    said = {"code": code, "errors": results.errors, "fix": {k: v for k, v in results.details.get("fix", {}).get(
        "int4-wo-g128", {}).items() if k not in ("sensitivity", "steps", "frontier", "raised", "set", "rounds")}}
    assert code == 1, said
    fix = results.details["fix"]["int4-wo-g128"]
    verification = Results.load(out / "fix" / "int4-wo-g128" / "results.json")
    assert fix["bytes_extra"] <= fix["budget_bytes"], said
    gated = [v for v in verification.verdicts if v.get("gated")]
    assert fix["verified"]["pass"] == (bool(gated) and all(v["verdict"] == "PASS" for v in gated)), (said, gated)
    assert fix["status"] in ("verified", "verification failed", "no recipe within the budget"), said
    assert (out / "fix" / "int4-wo-g128.recipe.json").is_file(), said
    if fix["status"] == "verified":
        assert fix["verified"]["metrics"]["kld_mean"]["value"] < 0.15, said
        assert fix["bits_per_weight_scheme"] < fix["bits_per_weight"] < 16, said
    assert fix["before"]["kld_mean"] > fix["predicted"]["kld_mean"], said


def test_known_lossy_scheme_beyond_its_limit_is_offered_a_fix_too():
    """A scheme gated on regression from its own (lossy) baseline passes the run, but --suggest-fix was
    asked for: its checks beyond the limit select it; passing and ungated-for-other-reasons ones do not."""
    verdicts = [
        {"check": "ppl/w/int4/kld_mean", "kind": "limit", "verdict": "WORSE", "variant": "int4", "failing": False,
         "extra": {"known_lossy": True}},
        {"check": "ppl/w/int8/kld_mean", "kind": "limit", "verdict": "PASS", "variant": "int8", "failing": False},
        {"check": "ppl/w/int8/kld_p99", "kind": "limit", "verdict": "WORSE", "variant": "int8", "failing": False},
        {"check": "baseline:ppl/w/dq/nll_shift", "kind": "baseline", "verdict": "FAIL", "variant": "dq", "failing": True},
        {"check": "ppl/w/g32/ppl_ratio", "kind": "limit", "verdict": "FAIL", "variant": "g32", "failing": True},
    ]
    fails = failing_checks(verdicts)
    assert list(fails) == ["int4", "g32"]
    assert [c["check"] for c in fails["int4"]] == ["ppl/w/int4/kld_mean"]


def test_not_verified_names_the_failing_check_when_only_a_tasks_accuracy_fails():
    """The planted case of issue #30: the verification's KLD and ppl ratio are inside their limits,
    its pooled accuracy drop is not; the fix is reported unfixed and the line names that check."""
    from evalsuite.app.fix import describe, exit_code

    metrics = {"kld_mean": {"task": "wikitext2", "value": 0.01, "ci95": [0.009, 0.011], "n": 100},
               "ppl_ratio": {"task": "wikitext2", "value": 1.005, "ci95": [1.004, 1.006], "n": 100}}
    checks = [
        {"check": "ppl/wikitext2/int4-wo-g128/kld_mean", "verdict": "PASS", "value": 0.01,
         "interval": [0.009, 0.011], "limit": 0.05},
        {"check": "ppl/wikitext2/int4-wo-g128/ppl_ratio", "verdict": "PASS", "value": 1.005,
         "interval": [1.004, 1.006], "limit": 1.01},
        {"check": "tasks/pooled/int4-wo-g128/delta_acc", "verdict": "FAIL", "value": -0.031,
         "interval": [-0.042, -0.02], "limit": -0.01},
    ]
    entry = {"status": "verification failed", "predicted": {"kld_mean": 0.008, "ppl_ratio": 1.004},
             "before": {"kld_mean": 0.09}, "verified": {"pass": False, "verdict": "FAIL", "metrics": metrics},
             "verification_checks": checks, "layers_raised": 3, "layers_quantized": 210, "bits_per_weight": 4.4,
             "bits_per_weight_scheme": 4.25, "layers_by_scheme": {"int4-wo-g128": 207, "int8-wo": 3},
             "raised": {"model.layers.0.mlp.down_proj": "int8-wo"}, "recipe": "o/fix/int4-wo-g128.recipe.json",
             "bytes_extra": 2**20, "budget": "25%", "seconds": {"rounds": 3},
             "command": "evalsuite run ... --quant int4-wo-g128-fix=recipe:o/fix/int4-wo-g128.recipe.json"}
    text = describe("int4-wo-g128", entry)
    head, last = text.splitlines()[0], text.splitlines()[-1]
    assert head.startswith("fix NOT verified int4-wo-g128: recipe at 4.4 bits/weight")
    assert head.endswith("FAIL after 3 verification rounds (1 of 3 gated checks not passed: tasks/pooled/int4-wo-g128/delta_acc)")
    assert "tasks/pooled/int4-wo-g128/delta_acc -0.031 [-0.042, -0.02] limit -0.01: FAIL" in last
    assert "ppl/wikitext2/int4-wo-g128/kld_mean 0.01 [0.009, 0.011] limit 0.05: PASS" in last
    assert "ppl_ratio 1.005 [1.004, 1.006] limit 1.01: PASS" in last
    assert exit_code({"int4-wo-g128": entry}) == 1


# ---- per-layer formats (issue #30): the search raises a layer's scheme, not only to fp

def test_candidate_schemes_fewest_bytes_first():
    from evalsuite.measure.sensitivity import candidate_schemes

    assert candidate_schemes("int4-wo-g128") == ["int4-wo-g128", "int4-wo-g32", "int8-wo", "fp"]
    assert candidate_schemes("int4-wo-g32") == ["int4-wo-g32", "int8-wo", "fp"]
    assert candidate_schemes("int8-wo") == ["int8-wo", "fp"]


def planted_formats(rows: int):
    """The planted model at width 128 (int4-g128 pads no layer), its int4-wo-g128 quantization, their
    counterfactuals on ``rows`` random windows, and each quantized layer's candidate formats."""
    from evalsuite.measure.sensitivity import candidate_schemes, layer_formats

    fp = planted_model(hidden=128)
    q = quantize_(copy.deepcopy(fp), parse_scheme("int4-wo-g128"))
    ids = torch.randint(0, 512, (rows, 64), generator=torch.Generator().manual_seed(0))
    cf = Counterfactuals(fp, q, ids, torch.device("cpu"), paired_token_stats)
    return fp, ids, cf, layer_formats(fp, quantized_layer_names(q), candidate_schemes("int4-wo-g128"))


def test_format_search_raises_the_planted_layer_first_and_its_recipe_runs_as_predicted(tmp_path):
    """int4-wo-g128 on the planted model: the outlier layer's format is raised first, the target is met
    within a fraction of the bytes that fp would add, and the recipe written from the assignment, run
    through --quant recipe:, gives the predicted KLD."""
    from evalsuite.measure.sensitivity import greedy_formats, to_recipe

    fp, ids, cf, formats = planted_formats(rows=2)
    assert [f.scheme for f in formats[BAD]] == ["int4-wo-g128", "int4-wo-g32", "int8-wo", "fp"]
    assert [f.bytes for f in formats[BAD]] == sorted(f.bytes for f in formats[BAD])
    search = greedy_formats(cf, formats, lambda m: m.kld_mean <= 0.9, budget_bytes=10**9, batch=1)
    assert search.steps[1]["moves"][0].startswith(f"{BAD}=")
    assert search.assignment[BAD] != "int4-wo-g128"
    assert search.met and search.baseline.kld_mean > 2 * 0.9 and search.metrics.kld_mean <= 0.9
    total_fp = sum(f[-1].bytes - f[0].bytes for f in formats.values())
    assert 0 < search.extra_bytes < total_fp / 10

    path = tmp_path / "fix.json"
    path.write_text(json.dumps(to_recipe("int4-wo-g128", search.assignment)))
    mixed = quantize_(copy.deepcopy(fp), parse_scheme(f"recipe:{path}"))
    again = Counterfactuals(fp, mixed, ids, torch.device("cpu"), paired_token_stats).measure_modules({})
    assert again.kld_mean == pytest.approx(search.metrics.kld_mean, rel=1e-5)


def test_format_search_stops_at_its_byte_budget():
    from evalsuite.measure.sensitivity import greedy_formats

    fp, ids, cf, formats = planted_formats(rows=1)
    budget = formats[BAD][1].bytes - formats[BAD][0].bytes - 1  # not even the planted layer's next format
    search = greedy_formats(cf, formats, lambda m: m.kld_mean <= 1e-6, budget_bytes=budget)
    assert not search.met and search.extra_bytes <= budget and search.assignment[BAD] == "int4-wo-g128"


class FakeCounterfactuals:
    """KLD with a set of layers in fp, from a table: a and b remove the same error (redundant), c another."""

    KLD = {(): 1.0, ("a",): 0.5, ("b",): 0.55, ("c",): 0.7, ("a", "b"): 0.5, ("a", "c"): 0.2, ("b", "c"): 0.25,
           ("a", "b", "c"): 0.2}

    def __init__(self):
        self.forwards = 0

    def measure_modules(self, modules):
        from evalsuite.measure.sensitivity import Metrics

        self.forwards += 1
        return Metrics(self.KLD[tuple(sorted(modules))], 0.0, 100)


def test_format_search_re_measures_interactions_instead_of_adding_leave_one_out_drops():
    """By leave-one-out drops b (0.45) comes before c (0.3); once a is in fp b removes nothing more,
    and the re-measured search takes c and meets the target with two layers raised."""
    from evalsuite.measure.sensitivity import Format, greedy_formats

    formats = {n: [Format("int8-wo", None, 10, 10), Format("fp", object(), 20, 10)] for n in "abc"}
    search = greedy_formats(FakeCounterfactuals(), formats, lambda m: m.kld_mean <= 0.25, budget_bytes=30)
    assert search.assignment == {"a": "fp", "b": "int8-wo", "c": "fp"} and search.met
    assert search.metrics.kld_mean == 0.2 and search.extra_bytes == 20


# ---- a failure only a task's accuracy shows (issue #30): the fix tightens and goes on, or names the check

K_PROJ = "model.layers.1.self_attn.k_proj"


class PlantedTask:
    """What ``variant_records`` reads of an lm-eval task: its aggregations and directions."""

    def aggregation(self):
        from lm_eval.api.metrics import mean

        return {"acc": mean}

    def higher_is_better(self):
        return {"acc": True}


def planted_tasks_stage(plant: str, items: int = 200, wrong: int = 40):
    """The tasks stage replaced by a planted one: fp answers all ``items`` right; a variant whose layer
    ``plant`` is still quantized (not raised to fp) answers the first ``wrong`` wrong. Its records and
    per-item values are the real stage's (``paired_records``), so the real judge gates them."""
    import dataclasses

    from evalsuite.measure import tasks
    from evalsuite.quantize.base import QuantizedLinear

    def run(ctx):
        ctx.results.run["tasks_requested"] = ["planted"]
        entry = ctx.results.details.setdefault("tasks", {}).setdefault(
            "planted", {"n": items, "limit": None, "doc_ids": list(range(items)), "seconds": {}, "values": {},
                        "loglikelihoods": "not applicable"})
        fp_docs = [{"acc": 1.0}] * items
        for variant, model in ctx.variants.items():
            bad = variant != "fp" and isinstance(model.get_submodule(plant), QuantizedLinear)
            docs = [{"acc": 0.0}] * wrong + [{"acc": 1.0}] * (items - wrong) if bad else fp_docs
            entry["values"][variant] = {"acc": [d["acc"] for d in docs]}
            for rec in tasks.variant_records(PlantedTask(), "planted", variant, docs, {}):
                ctx.results.add(**rec)
            if variant != "fp":
                for rec in tasks.paired_records("planted", variant, fp_docs, docs, {}):
                    ctx.results.add(**rec)

    return dataclasses.replace(tasks.STAGE, run=run, validate=None)


@pytest.mark.slow
@pytest.mark.parametrize("plant,budget", [(BAD, "25%"), (K_PROJ, "25%"), (K_PROJ, "11.5bpw")])
def test_a_failure_only_a_tasks_accuracy_shows_is_fixed_by_its_own_target_or_named(plant, budget, model_dirs, data_dir,
                                                                                   tmp_path, monkeypatch, capsys):
    """KLD and ppl limits loose (only the planted accuracy drop fails): round 1's target comes from the
    run's failing accuracy check (its interval is wider than the limit: the floor, a tenth of the
    scheme's KLD), not from the loose KLD limit. Planted on the KLD-worst layer, round 1 raises it first
    and passes; planted on a layer of small KLD, the verification fails on delta_acc alone and the
    target is tightened round after round until the layer is reached or the rounds end; where the
    budget cannot reach it, the fix ends unfixed, naming the accuracy check."""
    from evalsuite.measure import tasks

    monkeypatch.setattr(tasks, "STAGE", planted_tasks_stage(plant))
    gates = tmp_path / "gates.yaml"
    gates.write_text('schemes:\n  "int8-wo*": {kld_mean_max: 10, ppl_ratio_max: 10, max_acc_drop: 0.05}\n')
    out = tmp_path / "run"
    argv = _run_argv(model_dirs["planted"], data_dir, out, "--suggest-fix", "--gates", str(gates),
                     "--fix-budget", budget)
    argv[argv.index("--stages") + 1] = "ppl,tasks"
    assert _main(argv, monkeypatch) == 1
    results = Results.load(out / "results.json")
    failing = [v["check"] for v in results.verdicts if v.get("failing")]
    assert failing == ["tasks/pooled/int8-wo/delta_acc"]
    fix = results.details["fix"]["int8-wo"]
    rounds = fix["rounds"]
    first = fix["first_target"]
    assert first["checks"] == ["tasks/pooled/int8-wo/delta_acc"] and first["factor"] == 0.1
    assert rounds[0]["target"]["kld_mean"] == pytest.approx(0.1 * first["scheme_kld_calibration"])
    assert rounds[0]["target"]["kld_mean"] < 0.8 * 10 and rounds[0]["recipe"]["layers"]
    assert len(rounds) <= 3 and fix["seconds"]["rounds"] == len(rounds)
    for earlier, later in zip(rounds, rounds[1:]):  # each failed round's task check tightens the next
        assert [c["check"] for c in earlier["verification_checks"] if c["verdict"] != "PASS" and c["gated"]] == \
            ["tasks/pooled/int8-wo-fix/delta_acc"]
        assert "tasks/pooled/int8-wo-fix/delta_acc" in earlier["tightened"]
        assert later["target"]["kld_mean"] < earlier["predicted"]["kld_mean"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "tasks/pooled/int8-wo-fix/delta_acc" in last and "ppl/wikitext2/int8-wo-fix/kld_mean" in last
    if plant == BAD:
        assert fix["status"] == "verified" and len(rounds) == 1 and fix["set"][0] == BAD
        assert "tasks/pooled/int8-wo-fix/delta_acc 0 [-0.01885, 0.01885] limit -0.05: PASS" in last
    elif budget == "25%":
        assert len(rounds) >= 2 and (fix["status"] == "verified") == (K_PROJ in fix["raised"])
    else:
        assert fix["status"] != "verified" and K_PROJ not in fix["raised"] and BAD in fix["raised"]
        assert "tasks/pooled/int8-wo-fix/delta_acc -0.2" in last and "limit -0.05: FAIL" in last
        assert fix["bits_per_weight"] <= 11.5


def test_prior_estimates_find_the_planted_layer_first_in_fewer_forwards_than_every_move():
    """The Fisher estimates (no counterfactual forward) seed the greedy's ratios; it still takes the
    planted layer first, and measures far fewer moves than the 3 per layer the first round would
    measure without them."""
    from evalsuite.measure.sensitivity import fisher_estimates, fisher_prior, greedy_formats

    fp, ids, cf, formats = planted_formats(rows=1)
    prior, sensitivity = fisher_prior(fisher_estimates(fp, formats, [ids])[0], formats)
    assert max(sensitivity, key=sensitivity.get) == BAD and cf.forwards == 0
    search = greedy_formats(cf, formats, lambda m: m.kld_mean <= 0.9, budget_bytes=10**9, rerank=4, prior=prior)
    assert search.met and search.steps[1]["moves"][0].startswith(f"{BAD}=")
    moves = sum(len(fs) - 1 for fs in formats.values())
    assert cf.forwards < moves


def test_simple_strategies_follow_their_rules_within_the_budget():
    from evalsuite.measure.sensitivity import extra_bytes, simple_strategies

    fp, ids, cf, formats = planted_formats(rows=1)
    # room for one block's layers in int8-wo
    budget = sum(fs[2].bytes - fs[0].bytes for n, fs in formats.items() if n.startswith("model.layers.0."))
    got = simple_strategies(fp, formats, budget, seed=7)
    assert got["q4_k_m-like"]["assignment"] == {"model.layers.0.self_attn.v_proj": "int8-wo", BAD: "int8-wo"}
    sqnr = got["lowest-sqnr"]["assignment"]
    assert BAD in sqnr and set(sqnr.values()) == {"int8-wo"}  # the outlier layer has the lowest weight SQNR
    assert sorted(got["first-last"]["assignment"]) == sorted(n for n in formats if n.startswith("model.layers.0."))
    assert got["random-7"] == simple_strategies(fp, formats, budget, seed=7)["random-7"]
    assert got["random-7"] != simple_strategies(fp, formats, budget, seed=8)["random-8"]
    for name in ("lowest-sqnr", "first-last", "random-7"):
        assert 0 < extra_bytes(formats, got[name]["assignment"]) <= budget


# ---- the path search (--fix-search path, the default): Fisher estimates, then a measured bisection

def test_fisher_estimate_of_one_layer_is_the_kld_that_layer_alone_causes():
    """The estimate is second order and diagonal: on the planted model with int8-wo (small errors), the
    layers' estimated KLDs rank as the KLDs measured with only that layer quantized (Spearman >= 0.7),
    the planted layer's is the largest, their median ratio to the measured is near 1 (a factor 2 off,
    as a lost 1/2 would be, fails), and fp's is 0."""
    import numpy as np
    from scipy.stats import spearmanr

    from evalsuite.measure.sensitivity import candidate_schemes, fisher_estimates, layer_formats

    fp = planted_model(hidden=128)
    q = quantize_(copy.deepcopy(fp), parse_scheme("int8-wo"))
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    names = quantized_layer_names(q)
    formats = layer_formats(fp, names, candidate_schemes("int8-wo"), q)
    with torch.inference_mode():  # the fix measures under inference mode, so its windows are inference tensors
        windows = [ids[:8].clone(), ids[8:].clone()]
    est, n = fisher_estimates(fp, formats, windows, seed=0)
    assert n == 16 * 63
    assert all(est[(name, 1)] == 0 for name in names)  # fp
    cf = Counterfactuals(fp, q, ids, torch.device("cpu"), paired_token_stats)
    # only this layer quantized: every other layer restored to fp
    alone = {name: cf.measure_modules({o: fp.get_submodule(o) for o in names if o != name}).kld_mean for name in names}
    assert max(alone, key=alone.get) == BAD == max(names, key=lambda name: est[(name, 0)])
    assert spearmanr([est[(name, 0)] for name in names], [alone[name] for name in names]).correlation >= 0.7
    assert 0.6 < float(np.median([est[(name, 0)] / alone[name] for name in names])) < 1.35
    # the estimate leaves the model as it found it: no gradients kept, flags restored
    assert all(not p.requires_grad and p.grad is None for p in fp.parameters())


def _formats(table: dict[str, list[int]]):
    """Layers with formats of these byte counts (the first the scheme's), modules named by layer and index."""
    from evalsuite.measure.sensitivity import Format

    return {n: [Format(f"s{j}" if j < len(bs) - 1 else "fp", f"{n}{j}", b, 10) for j, b in enumerate(bs)]
            for n, bs in table.items()}


def test_estimated_path_is_the_knapsack_greedy_within_the_budget():
    """Moves by estimated reduction per extra byte; once a layer moved, its larger formats compete by
    what they remove beyond it per byte beyond it; a move over the budget is passed over, not the end."""
    from evalsuite.measure.sensitivity import estimated_path

    formats = _formats({"a": [10, 20, 40], "b": [10, 30], "c": [10, 11]})
    # a: s1 removes 5 (0.5/byte), fp removes 6 in all (0.2/byte; 1 beyond s1 over 20 bytes: 0.05/byte);
    # b: fp removes 8 (0.4/byte); c: fp removes 0.1 (0.1/byte)
    ratio = {("a", 1): 0.5, ("a", 2): 0.2, ("b", 1): 0.4, ("c", 1): 0.1}
    assert estimated_path(formats, ratio, budget_bytes=100) == [("a", 1), ("b", 1), ("c", 1), ("a", 2)]
    # 25 bytes: a to s1 (10), b's 20 does not fit, c (1) does, a's last 20 does not
    assert estimated_path(formats, ratio, budget_bytes=25) == [("a", 1), ("c", 1)]
    # a start already spending bytes: the path goes on from it
    assert estimated_path(formats, ratio, budget_bytes=100, start={"a": "s1"}) == [("b", 1), ("c", 1), ("a", 2)]


class PathCounterfactuals:
    """KLD = 1 - 0.1 x the layers not in their first format (a path of 10 one-format layers), counted."""

    def __init__(self):
        self.forwards = 0

    def measure_modules(self, modules):
        from evalsuite.measure.sensitivity import Metrics

        self.forwards += 1
        return Metrics(1.0 - 0.1 * len(modules), 0.0, 100)


def test_path_search_bisects_to_the_shortest_prefix_that_meets_the_target():
    from evalsuite.measure.sensitivity import path_search

    formats = _formats({f"l{i}": [10, 20] for i in range(10)})
    ratio = {(f"l{i}", 1): 1.0 - i / 100 for i in range(10)}  # l0 first
    cf = PathCounterfactuals()
    known: dict = {}
    s = path_search(cf, formats, lambda m: m.kld_mean <= 0.55, 1000, ratio, known=known)
    assert s.met and s.metrics.kld_mean == pytest.approx(0.5) and s.stop_reason == "target met"
    assert sorted(n for n, v in s.assignment.items() if v == "fp") == [f"l{i}" for i in range(5)]
    assert cf.forwards <= 2 + 4  # the start, the whole path, a bisection of 10
    assert s.steps[s.chosen]["prefix"] == 5 and [st["prefix"] for st in s.steps] == sorted(st["prefix"] for st in s.steps)
    # a tightened target goes on along the same path: only the prefixes not yet measured cost a forward
    before = cf.forwards
    s2 = path_search(cf, formats, lambda m: m.kld_mean <= 0.25, 1000, ratio, path=s.path, known=known)
    assert s2.metrics.kld_mean == pytest.approx(0.2) and cf.forwards - before <= 3
    assert all(st["prefix"] > 5 for st in s2.steps)
    # the whole path within the budget falls short: the budget is spent, the longest prefix returned
    cf = PathCounterfactuals()
    s3 = path_search(cf, formats, lambda m: m.kld_mean <= 0.05, 30, ratio)
    assert not s3.met and s3.stop_reason == "byte budget spent" and s3.extra_bytes == 30 and cf.forwards == 2
    # the start meets it: nothing raised
    s4 = path_search(PathCounterfactuals(), formats, lambda m: m.kld_mean <= 1.0, 1000, ratio)
    assert s4.met and s4.extra_bytes == 0


def test_path_search_on_the_planted_model_raises_the_planted_layer_first_in_a_few_forwards():
    """int4-wo-g128 on the planted model: Fisher estimates (one forward and backward) put the planted
    layer first on the path; the bisection meets the target in about log2(moves) + 2 forwards, against
    the greedy's one a layer plus its re-measurements; the recipe's measured KLD meets the target."""
    import math

    from evalsuite.measure.sensitivity import fisher_estimates, fisher_prior, greedy_formats, path_search

    fp, ids, cf, formats = planted_formats(rows=2)
    est, _ = fisher_estimates(fp, formats, [ids])
    prior, sensitivity = fisher_prior(est, formats)
    assert max(sensitivity, key=sensitivity.get) == BAD
    search = path_search(cf, formats, lambda m: m.kld_mean <= 0.9, 10**9, prior)
    assert search.met and search.metrics.kld_mean <= 0.9 and search.path[0][0] == BAD
    moves = len(search.path)
    assert cf.forwards <= math.ceil(math.log2(moves)) + 3
    f0 = cf.forwards
    greedy = greedy_formats(cf, formats, lambda m: m.kld_mean <= 0.9, budget_bytes=10**9, rerank=4, prior=prior)
    assert greedy.met and cf.forwards - f0 > f0


def test_tightening_scales_the_target_by_each_failing_checks_own_distance_from_its_limit():
    """The H100 round of 2026-12-08: KLD and ppl ratio passed, the pooled accuracy drop was INCONCLUSIVE
    (-0.0307, interval [-0.0356, -0.0258], limit -0.03): the target drops to margin x ((0.03 - half-width)
    / drop)^2 = 0.53 of the prediction (the drop as the square root of the KLD), not a flat half; a KLD
    check over its limit, a layer check, a far miss and a near miss each give their own factor, within
    [0.1, 0.8]."""
    import math

    from evalsuite.app.fix import tightened

    predicted = {"kld_mean": 0.108, "ln_ppl_ratio": 0.111}
    task = {"check": "tasks/pooled/x/delta_acc", "verdict": "INCONCLUSIVE", "value": -0.030684,
            "interval": [-0.035603, -0.025762], "limit": -0.03, "gated": True}
    passing = {"check": "ppl/w/x/kld_mean", "verdict": "PASS", "value": 0.1058, "limit": 0.15, "gated": True}
    ungated = {**task, "check": "tasks/copa/x/delta_acc", "interval": [-0.12, 0.0], "gated": False}
    kld, ln_ratio, why = tightened(0.12, 0.112, predicted, [passing, task, ungated], 0.8)
    f = 0.8 * ((0.03 - (0.035603 - 0.030684)) / 0.030684) ** 2
    assert f == pytest.approx(0.5345, abs=1e-3)
    assert kld == pytest.approx(f * 0.108) and ln_ratio == pytest.approx(f * 0.111)
    assert why.startswith("x0.53 ") and "tasks/pooled/x/delta_acc" in why and "copa" not in why
    over = {"check": "ppl/w/x/kld_mean", "verdict": "FAIL", "value": 0.2, "limit": 0.15, "gated": True}
    assert tightened(0.12, 0.112, predicted, [over], 0.8)[0] == pytest.approx(0.6 * 0.108)
    ratio = {"check": "ppl/w/x/ppl_ratio", "verdict": "FAIL", "value": 1.2, "limit": 1.15, "gated": True}
    assert tightened(0.12, 0.112, predicted, [ratio], 0.8)[0] == pytest.approx(0.8 * math.log(1.15) / math.log(1.2) * 0.108)
    layer = {"check": "layers/x/min_sqnr_db", "verdict": "FAIL", "value": 10, "limit": 20, "gated": True}
    assert tightened(0.12, 0.112, predicted, [layer, task], 0.8)[0] == pytest.approx(0.5 * 0.108)
    far = {**task, "verdict": "FAIL", "value": -0.45, "interval": [-0.5, -0.4]}
    assert tightened(0.12, 0.112, predicted, [far], 0.8)[0] == pytest.approx(0.1 * 0.108)
    near = {**task, "interval": [-0.0309, -0.02]}
    assert tightened(0.12, 0.112, predicted, [near], 0.95)[0] == pytest.approx(0.8 * 0.108)  # at least x0.8
    # a target already below the tightened value stays
    assert tightened(0.01, 0.112, predicted, [task], 0.8)[0] == 0.01


def test_round_one_aims_where_the_runs_own_failing_task_check_would_pass():
    """The H100 run of 2026-12-08: int4-wo-g128's pooled drop -0.0637 [-0.0697, -0.0576] at limit -0.03
    sets round 1's factor to 0.8 x ((0.03 - 0.0061) / 0.0637)^2 = 0.113 of the scheme's KLD (0.432 x
    0.113 = 0.049, where that run passed only in round 2 at 0.064); no task check, no factor; a
    per-task check counts, a KLD check does not; the smallest wins; the floor is 0.1; a drop that is
    not one (an improvement whose interval reaches the limit) gives no factor."""
    from evalsuite.app.fix import accuracy_factor, first_target

    pooled = {"check": "tasks/pooled/s/delta_acc", "stage": "tasks", "verdict": "FAIL", "value": -0.06366,
              "interval": [-0.06973, -0.05759], "limit": -0.03}
    kld = {"check": "ppl/wikitext2/s/kld_mean", "stage": "ppl", "verdict": "FAIL", "value": 0.432,
           "interval": [0.43, 0.44], "limit": 0.15}
    factor, names = first_target([kld, pooled], 0.8)
    assert factor == pytest.approx(0.8 * ((0.03 - (0.06973 - 0.06366)) / 0.06366) ** 2) and names == [pooled["check"]]
    assert 0.11 < factor < 0.12 and 0.045 < factor * 0.432 < 0.052
    assert first_target([kld], 0.8) is None and accuracy_factor(kld, 0.8) is None
    closer = {**pooled, "check": "tasks/piqa/s/delta_acc", "value": -0.04, "interval": [-0.05, -0.03]}
    assert first_target([pooled, closer], 0.8)[0] == pytest.approx(factor)  # the smallest factor wins
    wide = {**pooled, "value": -0.2, "interval": [-0.26, -0.14]}  # half-width 0.06 > 0.03: only no drop passes
    assert accuracy_factor(wide, 0.8) == 0.0 and first_target([wide], 0.8)[0] == 0.1
    better = {**pooled, "value": 0.01, "interval": [-0.04, 0.06]}
    assert accuracy_factor(better, 0.8) is None and first_target([better], 0.8) is None


def test_fisher_estimates_run_on_a_gpt_fast_model_too():
    """A gpt-fast checkpoint (no get_input_embeddings): the estimate starts its graph at tok_embeddings,
    ranks a planted outlier layer first and leaves the model as it found it."""
    from evalsuite.load import gptfast
    from evalsuite.measure.sensitivity import candidate_schemes, fisher_estimates, layer_formats

    torch.manual_seed(0)
    model = gptfast.Transformer(gptfast.ModelArgs(block_size=64, vocab_size=256, n_layer=2, n_head=4, dim=64)).eval()
    bad = "layers.1.feed_forward.w2"
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.get_submodule(bad).weight[:, 0] = 20.0
    model.requires_grad_(False)
    q = quantize_(copy.deepcopy(model), parse_scheme("int8-wo"))
    names = quantized_layer_names(q)
    formats = layer_formats(model, names, candidate_schemes("int8-wo"), q)
    est, n = fisher_estimates(model, formats, [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))])
    assert n == 2 * 31 and max(names, key=lambda name: est[(name, 0)]) == bad
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_path_search_from_a_start_measures_the_scheme_once_across_rounds():
    """Layers forced to fp by a failing layer check start raised: the scheme's own metrics (the
    baseline) cost one forward in the first round and none in a tightened one on the same path."""
    from evalsuite.measure.sensitivity import path_search

    formats = _formats({f"l{i}": [10, 20] for i in range(10)})
    ratio = {(f"l{i}", 1): 1.0 - i / 100 for i in range(10)}
    cf, known = PathCounterfactuals(), {}
    s = path_search(cf, formats, lambda m: m.kld_mean <= 0.55, 1000, ratio, start={"l9": "fp"}, known=known)
    assert s.baseline.kld_mean == 1.0 and s.assignment["l9"] == "fp" and s.met and s.metrics.kld_mean == pytest.approx(0.5)
    assert [st["prefix"] for st in s.steps] == sorted(st["prefix"] for st in s.steps) and min(st["prefix"] for st in s.steps) >= 0
    before = cf.forwards
    s2 = path_search(cf, formats, lambda m: m.kld_mean <= 0.25, 1000, ratio, start={"l9": "fp"}, path=s.path, known=known)
    assert s2.baseline.kld_mean == 1.0 and s2.metrics.kld_mean == pytest.approx(0.2)
    assert cf.forwards - before == 2  # the bisection's two new prefixes only, no second baseline
