"""A variant of the user's naming is held to its format's limits, and a handler that leaves layers it
was given unquantized is said so (seen on an H100: torchao's Int4WeightOnlyConfig(group_size=128)
quantized 30 of SmolLM2's 210 layers, in_features 576 not being a multiple of 128, and its variant
``ao-int4`` was judged by the catch-all's int8-like limits)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from evalsuite.app.session import describe_coverage, layer_coverage
from evalsuite.judge.config import GateConfig, load_gate_config as load_gates
from evalsuite.judge.within import coverage_checks, within_run_checks
from tests.test_judge import make_results

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")


def test_a_name_of_the_users_own_takes_the_limits_of_its_format():
    gates = load_gates(None)
    pattern, limits = gates.scheme("ao-int4", "int4-wo-g128")
    assert pattern == "int4-* (as int4-wo-g128)"
    assert limits["kld_mean_max"] == 0.15 and limits["ppl_ratio_max"] == 1.15
    assert gates.scheme("ao-int4") == ("*", gates.data["schemes"]["*"])  # no format known: the catch-all
    # the variant's own name wins where it matches a pattern (int4-mine is int4 whatever it says it is)
    assert gates.scheme("int4-mine", "int8-wo")[0] == "int4-*"


def test_a_gates_pattern_naming_the_variant_beats_its_format(tmp_path):
    f = tmp_path / "gates.yaml"
    f.write_text('schemes:\n  "ao-*": {kld_mean_max: 0.3}\n')
    pattern, limits = load_gates(str(f)).scheme("ao-int4", "int4-wo-g128")
    assert pattern == "ao-*" and limits["kld_mean_max"] == 0.3


def _renamed(res, old: str, new: str, **details):
    for m in res.records:
        if m.variant == old:
            m.variant = new
    res.run["schemes"] = [new]
    res.run["quant_details"] = {new: details} if details else {}
    return res


def _ppl_verdict(res, variant):
    checks = {c.check: c for c in within_run_checks(res, GateConfig(load_gates(None).data))}
    return checks[f"ppl/wikitext2/{variant}/kld_mean"]


def test_the_judge_reads_the_format_from_the_runs_quant_details():
    # KLD ~0.09: over the catch-all's 0.05, well under int4's 0.15 (as torchao int4 on SmolLM2, 0.10)
    plain = _ppl_verdict(_renamed(make_results(kld=0.09), "int8-wo", "ao"), "ao")
    assert plain.verdict == "FAIL" and plain.limit == 0.05
    as_int4 = _ppl_verdict(_renamed(make_results(kld=0.09), "int8-wo", "ao", limits_as="int4-wo-g128"), "ao")
    assert as_int4.verdict == "PASS" and as_int4.limit == 0.15
    assert "int4-* (as int4-wo-g128)" in as_int4.source


@needs_torchao
def test_torchao_configs_map_to_the_builtin_format():
    import torchao.quantization as q

    from evalsuite.quantize.torchao_config import limits_as

    assert limits_as(q.Int4WeightOnlyConfig(group_size=32)) == "int4-wo-g32"
    assert limits_as(q.Int8WeightOnlyConfig()) == "int8-wo"
    assert limits_as(q.Int8DynamicActivationInt8WeightConfig()) == "int8-dq"
    assert limits_as(q.Float8WeightOnlyConfig()) == "fp8-wo"
    assert limits_as(q.Float8DynamicActivationFloat8WeightConfig()) == "fp8-dq-tensor"  # torchao's default: per tensor
    assert limits_as(q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())) == "fp8-dq"
    assert limits_as(object()) is None


class _Cfg:
    """What layer_coverage reads of a torchao config: the head policy and the config's group size."""

    include_head = False

    def __init__(self, group_size=None):
        self.config = type("C", (), {"group_size": group_size})()


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(576, 64)   # 576 = 4.5 x 128
        self.b = nn.Linear(1536, 64)  # 1536 = 12 x 128
        self.c = nn.Linear(576, 192)


def test_layers_a_handler_left_alone_are_counted_with_their_shapes_and_why():
    fp = _Two()
    c = layer_coverage(fp, {"b"}, _Cfg(group_size=128), skip=())
    assert c["chosen"] == 3 and c["quantized"] == 1 and c["left"] == 2
    assert c["left_shapes"] == {"576->64": 1, "576->192": 1}
    assert c["why"] == "in_features 576 not a multiple of group_size 128"
    assert c["fraction_quantized"] == pytest.approx(1 / 3, abs=1e-4)
    line = describe_coverage("ao-int4", "torchao:Int4WeightOnlyConfig(group_size=128)", c, torch.bfloat16)
    assert "quantized 1 of the 3 linear layers chosen; 2 stay bfloat16" in line and "\n" not in line
    # every chosen layer changed, or the uncovered ones skipped on purpose: nothing to say
    assert layer_coverage(fp, {"a", "b", "c"}, _Cfg(128), skip=()) is None
    assert layer_coverage(fp, {"b"}, _Cfg(128), skip=("a", "c")) is None
    # no group size: the shapes, no guessed reason
    assert "why" not in layer_coverage(fp, {"b"}, _Cfg(None), skip=())


def test_partial_coverage_is_reported_worse_and_not_gated_and_full_coverage_says_nothing():
    res = make_results(kld=0.004)
    assert coverage_checks(res, "int8-wo") == []
    res.run["quant_coverage"] = {"int8-wo": {"chosen": 210, "quantized": 30, "left": 180, "fraction_quantized": 0.1429,
                                             "left_shapes": {"576->576": 60}, "why": "in_features 576 ..."}}
    [check] = coverage_checks(res, "int8-wo")
    assert check.verdict == "WORSE" and check.gated is False and check.value == 0.1429
    assert "30 of the 210" in check.reason
    assert check.check in {c.check for c in within_run_checks(res, GateConfig(load_gates(None).data))}


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    """A tiny Llama of hidden size 96: in_features 96 (attention, gate/up) is not a multiple of 64,
    192 (down) is."""
    from conftest import make_tiny_llama
    from test_robustness import _tokenizer

    d = tmp_path_factory.mktemp("odd") / "llama"
    tok = _tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=96, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@needs_torchao
@pytest.mark.slow
def test_torchao_int4_run_records_its_coverage_and_int4_limits(odd_dir, data_dir, tmp_path, capsys):
    """End to end on the CPU: torchao int4 at a group size most of the model's widths do not divide."""
    from evalsuite.commands.cli import main
    from evalsuite.results import Results

    if importlib.util.find_spec("mslk") is not None:
        pytest.skip("mslk is installed: another packing runs")
    out = tmp_path / "run"
    (tmp_path / "none").mkdir()
    code = main(["run", "--model", str(odd_dir), "--device", "cpu", "--quant",
                 "ao=torchao:Int4WeightOnlyConfig(group_size=64)", "--stages", "ppl", "--limit", "2",
                 "--ppl-context", "64", "--data-dir", str(data_dir), "--out", str(out), "--no-history",
                 "--no-progress", "--baselines", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code in (0, 1, 4), err
    res = Results.load(out / "results.json")
    assert res.run["quant_details"]["ao"]["limits_as"] == "int4-wo-g64"
    kld = next(v for v in res.verdicts if v["check"] == "ppl/wikitext2/ao/kld_mean")
    assert kld["limit"] == 0.15 and "int4-*" in kld["source"]
    cov = res.run["quant_coverage"]["ao"]
    assert cov["chosen"] == 14 and cov["quantized"] == res.run["quantized_layers"]["ao"] == 2  # the two down_proj
    assert cov["why"] == "in_features 96 not a multiple of group_size 64"
    assert "--quant ao (torchao:Int4WeightOnlyConfig(group_size=64)): quantized 2 of the 14" in err
    assert any(v["check"] == "quantize/ao/coverage" and v["verdict"] == "WORSE" for v in res.verdicts)
