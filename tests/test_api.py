"""The Python API: evaluate (a path or an in-memory model) on the smoke suite, quantize, Results.table/gate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evalsuite
from evalsuite.errors import EvalsuiteError

REPO = Path(__file__).resolve().parent.parent


def test_import_is_cheap_and_exposes_the_api():
    code = "import sys, evalsuite; print('torch' in sys.modules, 'lm_eval' in sys.modules, sorted(evalsuite.__all__))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.stdout.split(maxsplit=2)[:2] == ["False", "False"], p.stdout + p.stderr
    assert callable(evalsuite.evaluate) and callable(evalsuite.quantize) and evalsuite.Results


def test_quantize_returns_a_quantized_copy(tiny_llama):
    q = evalsuite.quantize(tiny_llama, "int8-wo")
    names = {type(m).__name__ for m in q.modules()}
    assert "WeightOnlyInt8Linear" in names
    assert "WeightOnlyInt8Linear" not in {type(m).__name__ for m in tiny_llama.modules()}  # original untouched
    with pytest.raises(EvalsuiteError, match="int9-wo"):
        evalsuite.quantize(tiny_llama, "int9-wo")


@pytest.fixture(scope="module")
def smoke_results(smollm2, tmp_path_factory):
    """SmolLM2 in memory, evaluated on the smoke suite: ppl (short windows) and one task."""
    before = {k: v.clone() for k, v in list(smollm2.model.state_dict().items())[:3]}
    res = evalsuite.evaluate(smollm2.model, tokenizer=smollm2.tokenizer, schemes=["int8-wo"],
                             stages=["ppl", "tasks"], suite="smoke", limit=2, tasks=["copa"], ppl_context=128,
                             out=tmp_path_factory.mktemp("api"))
    assert all(torch.equal(v, smollm2.model.state_dict()[k]) for k, v in before.items())
    return res


@pytest.mark.slow
def test_evaluate_an_in_memory_model_on_the_smoke_suite(smoke_results, smollm2):
    res = smoke_results
    assert res.run["suite"] == "smoke" and res.partial and res.run["model"]["format"] == "module"
    assert res.run["dtype"] == "fp32" and res.run["device"]["type"] == "cpu"
    ppl = res.get("ppl", "wikitext2", "fp", "token_ppl")
    assert ppl.n == 2 * 127 and 1 < ppl.value < 1000
    assert "128-token windows" in ppl.extra["protocol"]
    assert res.get("tasks", "copa", "int8-wo", "acc").n == 2
    assert res.verdicts and any(v["check"] == "baseline" and v["verdict"] == "SKIPPED" for v in res.verdicts)


@pytest.mark.slow
def test_results_table_and_gate(smoke_results, tmp_path):
    import copy

    res = copy.deepcopy(smoke_results)
    text = res.table(width=80)
    assert "SMOKE SUITE" in text and "token_ppl" in text and "copa" in text
    assert max(len(ln) for ln in text.splitlines()) <= 80
    # a smoke run never gates against baselines, whatever it is given
    res.gate(smoke_results)
    assert [v["verdict"] for v in res.verdicts if v["kind"] == "baseline"] == ["SKIPPED"]
    # a full run does: itself as the baseline fails nothing (two items and windows are too few to
    # judge a paired shift, so the gate may be incomplete), a planted regression fails
    res.run["suite"], res.run["partial"] = None, False
    assert res.gate(copy.deepcopy(res)).status in ("passed", "incomplete")
    worse = copy.deepcopy(res)
    # the gated baseline checks are paired item by item; this fixture has two ppl windows and two
    # items, too few to resolve any shift: a planted regression must then be INCONCLUSIVE or worse,
    # never a PASS (tests/test_judge_paired.py shows it FAILs at real sample sizes)
    for entry in worse.details["tasks"].values():
        vals = entry["values"]["int8-wo"]
        vals["acc"] = [0.0] * len(vals["acc"])
    worse.details["ppl"]["variants"]["int8-wo"]["nll_sum"] = [
        x * 1.05 for x in worse.details["ppl"]["variants"]["int8-wo"]["nll_sum"]]
    gate = worse.gate(res)
    # per-item data edited behind its records' back: the evidence check refuses the file before any
    # baseline check could pass it
    assert gate.status == "invalid" and not gate.passed, gate.status
    assert any(v["check"].startswith("evidence") and v["verdict"] == "INVALID" for v in worse.verdicts)


def test_evaluate_validates_before_loading():
    with pytest.raises(EvalsuiteError, match="unknown stage 'bogus'"):
        evalsuite.evaluate("/no/such/model.gguf", stages=["bogus"])
    with pytest.raises(EvalsuiteError, match="no such file"):
        evalsuite.evaluate("/no/such/model.gguf", stages=["ppl"])


def test_options_in_python_spelling_become_run_options(tmp_path):
    """evaluate()'s options land in the RunConfig it builds (no argv, no argparse namespace)."""
    from evalsuite.commands.api import run_config

    config = run_config(model="m.gguf", schemes=["int8-wo", "int4-wo-g128"], stages=["ppl", "tasks"], data_dir=None,
                        limit=3, out=tmp_path, baselines=None, history=None,
                        options={"ppl_noise_floor": "off", "tasks": ["arc_easy", "copa"], "speed_compile": True,
                                 "seed": 7, "gates": "g.yaml", "suggest_fix": True})
    assert config.option("ppl_noise_floor") == "off" and config.option("tasks") == "arc_easy,copa"
    assert config.option("speed_compile") is True and config.runtime.seed == 7 and config.option("seed") == 7
    assert config.model.quant_spec == "int8-wo,int4-wo-g128" and config.stages.spec == "ppl,tasks"
    assert config.judge.gates == "g.yaml" and config.fix.suggest and config.data.limit == 3
    assert config.judge.no_history and config.output.out == str(tmp_path)
    with pytest.raises(EvalsuiteError, match="unknown option 'ppl_windowz'"):
        evalsuite.evaluate(stages=["ppl"], ppl_windowz=2)


def _judged_smoke_run() -> "evalsuite.Results":
    """A finished smoke run whose within-run KLD check passes clearly (a wide margin, many windows),
    with the per-window details behind its records (the evidence check re-derives them)."""
    from test_judge import make_results

    r = make_results(seed=3, device="cpu")
    r.records = [m for m in r.records if m.stage == "ppl"]
    r.details = {k: v for k, v in r.details.items() if k == "ppl"}
    r.run.update(suite="smoke", stages=["ppl"], partial=True)
    return evalsuite.Results.from_dict(r.to_dict())


def test_gate_of_a_smoke_run_against_baselines_is_not_passed(tmp_path):
    """Smoke results are never compared with baselines: asked to gate on them, the API said passed
    (True) for a comparison it never made. Now the gate is incomplete, exit 4."""
    res = _judged_smoke_run()
    within = res.gate()
    assert within.judged and within.passed and within.status == "passed" and within.exit_code == 0
    gate = res.gate(tmp_path)  # a baseline folder: the smoke run is not compared with it
    assert gate.judged and not gate.passed and not gate.failed and not res.passed
    assert gate.status == "incomplete" and gate.exit_code == 4 and not gate
    assert any(v["verdict"] == "INCOMPLETE" and "comparable" in v["reason"] for v in res.verdicts)


def test_gate_result_says_passed_failed_or_not_judged():
    from evalsuite.judge.checks import GateResult

    judged_pass = {"check": "a", "verdict": "PASS", "gated": True}
    assert GateResult([judged_pass]).status == "passed"
    assert GateResult([{"check": "a", "verdict": "FAIL", "gated": True, "failing": True}]).failed
    nothing = GateResult([{"check": "a", "verdict": "INCONCLUSIVE", "gated": True},
                          {"check": "complete/run", "verdict": "PASS", "kind": "run"}])
    assert not nothing.judged and not nothing.passed and nothing.status == "incomplete" and nothing.exit_code == 4
    assert GateResult([judged_pass, {"check": "e", "verdict": "INVALID"}]).status == "invalid"
    assert GateResult([]).status == "incomplete"


def test_readme_python_example_names_what_the_api_has(tiny_llama):
    """The README's Python example compiles, every attribute it reads exists, and its quantize line
    runs as written (on a tiny model; evaluate is exercised by the tests above)."""
    import re
    from pathlib import Path

    from evalsuite.judge.checks import GateResult

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    compile(block, "README.md", "exec")
    for name in re.findall(r"\bgate\.(\w+)", block):
        assert hasattr(GateResult([]), name), name
    for name in re.findall(r"\bevalsuite\.(\w+)\(", block):
        assert callable(getattr(evalsuite, name)), name
    line = next(ln for ln in block.splitlines() if "evalsuite.quantize(" in ln).split("#")[0].strip()
    scope = {"evalsuite": evalsuite, "model": tiny_llama}
    exec(line, scope)
    assert scope["q"] is not tiny_llama and type(scope["q"]) is type(tiny_llama)
