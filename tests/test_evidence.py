"""A results file is evidence, checked before it is judged: edits that contradict the file itself or
its details are INVALID (exit 5), gaps INCOMPLETE (exit 2), never PASSED.

Built on one real run of a tiny Llama (ppl and two tasks, fp and int8-wo) whose results.json is
edited the way a hostile or careless hand would, then judged through the real CLI.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from conftest import make_tiny_llama
from evalsuite.commands.cli import main
from evalsuite.judge import judge
from evalsuite.judge.checks import EXIT_INCOMPLETE, EXIT_INVALID, INVALID, exit_code
from evalsuite.judge.config import load_gate_config
from evalsuite.judge.evidence import rederive
from evalsuite.results import Results

GATED = {("ppl", "kld_mean"), ("ppl", "ppl_ratio"), ("ppl", "nonfinite_tokens"), ("tasks", "delta_acc")}


@pytest.fixture(scope="module")
def run_file(tmp_path_factory, data_dir) -> Path:
    """results.json of a real run: ppl (6 windows of 64 tokens) and arc_easy, piqa (8 items), fp and int8-wo."""
    from test_robustness import _tokenizer

    d = tmp_path_factory.mktemp("evidence")
    tok = _tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=64, layers=2).save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")
    code = main(["run", "--model", str(d / "llama"), "--device", "cpu", "--stages", "ppl,tasks", "--quant", "int8-wo",
                 "--tasks", "arc_easy,piqa", "--task-limit", "8", "--ppl-context", "64", "--ppl-windows", "6",
                 "--data-dir", str(data_dir), "--no-history", "--no-progress", "--out", str(d / "run")])
    assert code == 0
    return d / "run" / "results.json"


@pytest.fixture
def data(run_file) -> dict:
    return json.loads(run_file.read_text())


def _record(d: dict, variant: str, metric: str, stage: str = "ppl", task: str | None = None) -> dict:
    return next(r for r in d["records"] if (r["stage"], r["variant"], r["metric"]) == (stage, variant, metric)
                and (task is None or r["task"] == task))


def _gate(tmp_path: Path, run_file: Path, d: dict, capsys, *extra: str) -> tuple[int, dict[str, str], str]:
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps(d))
    capsys.readouterr()
    code = main(["gate", str(cand), "--baseline", str(run_file), "--no-history", "--out", str(tmp_path / "g"),
                 "--formats", "json", *extra])
    out = capsys.readouterr().out
    verdicts = {v["check"]: v for v in Results.load(tmp_path / "g" / "results.json").verdicts}
    return code, verdicts, out


def test_the_unedited_run_passes(tmp_path, run_file, data, capsys):
    code, verdicts, out = _gate(tmp_path, run_file, data, capsys)
    assert code == 0, out
    assert verdicts["evidence/results"]["verdict"] == "PASS"
    assert "re-derived from the file's details" in verdicts["evidence/results"]["reason"]


def _invalid(tmp_path, run_file, d, capsys, *names: str) -> str:
    code, verdicts, out = _gate(tmp_path, run_file, d, capsys)
    assert code == EXIT_INVALID, out
    assert "gate INVALID" in out and "PASSED" not in out
    # nothing else is judged: only the evidence checks
    assert all(c.startswith("evidence/") for c in verdicts), verdicts
    reasons = " ".join(v["reason"] for v in verdicts.values() if v["verdict"] == INVALID)
    for name in names:
        assert name in reasons, reasons
    return reasons


def test_a_value_edited_inside_an_untouched_interval_is_invalid(tmp_path, run_file, data, capsys):
    _record(data, "int8-wo", "kld_mean")["value"] = 5
    reasons = _invalid(tmp_path, run_file, data, capsys, "ppl/wikitext2/int8-wo/kld_mean")
    assert "outside its own 95% CI" in reasons and "its details give" in reasons


def test_a_value_outside_its_edited_interval_is_invalid(tmp_path, run_file, data, capsys):
    _record(data, "int8-wo", "kld_mean").update(value=0.05791, ci95=[0.0028, 0.0030])
    _invalid(tmp_path, run_file, data, capsys, "value 0.05791 outside its own 95% CI [0.0028, 0.003]")


def test_an_interval_narrowed_below_its_details_is_invalid(tmp_path, run_file, data, capsys):
    r = _record(data, "int8-wo", "ppl_ratio")
    r["ci95"] = [r["value"] - 1e-9, r["value"] + 1e-9]  # a consistent-looking, far too narrow interval
    _invalid(tmp_path, run_file, data, capsys, "ppl/wikitext2/int8-wo/ppl_ratio: recorded 95% CI")


def test_edited_values_with_their_details_deleted_are_invalid(tmp_path, run_file, data, capsys):
    _record(data, "int8-wo", "kld_mean")["value"] = 5
    _record(data, "int8-wo", "ppl_ratio")["value"] = 3
    _record(data, "int8-wo", "token_ppl")["value"] = 500
    del data["details"]
    _invalid(tmp_path, run_file, data, capsys, "details", "not evidence")


def test_a_detail_edited_alone_is_invalid(tmp_path, run_file, data, capsys):
    data["details"]["ppl"]["paired"]["int8-wo"]["kld_sum"][2] *= 3
    _invalid(tmp_path, run_file, data, capsys, "ppl/wikitext2/int8-wo/kld_mean: recorded")


def test_an_accuracy_flipped_in_the_details_is_invalid(tmp_path, run_file, data, capsys):
    acc = data["details"]["tasks"]["piqa"]["values"]["int8-wo"]["acc"]
    acc[0] = 1.0 - acc[0]
    _invalid(tmp_path, run_file, data, capsys, "tasks/piqa/int8-wo/acc", "tasks/piqa/int8-wo/delta_acc")


def test_duplicate_records_are_invalid(tmp_path, run_file, data, capsys):
    data["records"].append(dict(_record(data, "int8-wo", "kld_mean"), value=1e-9, ci95=[0.0, 2e-9]))
    _invalid(tmp_path, run_file, data, capsys, "2 records with one key")


@pytest.mark.parametrize("field,value,words", [
    ("value", -0.5, "a KL divergence is ≥ 0"),
    ("value", "nan", "a KL divergence is ≥ 0"),
    ("ci95", [1e-3, 1e-4], "low > high"),
    ("n", 0, "needs n ≥ 1"),
])
def test_a_record_outside_its_domain_is_invalid(tmp_path, run_file, data, capsys, field, value, words):
    _record(data, "int8-wo", "kld_mean")[field] = value
    _invalid(tmp_path, run_file, data, capsys, words)


@pytest.mark.parametrize("drop", ["every record", "its gated records"])
def test_a_scheme_without_its_gated_records_is_incomplete(tmp_path, run_file, data, capsys, drop):
    if drop == "every record":
        data["records"] = [r for r in data["records"] if r["variant"] != "int8-wo"]
    else:
        data["records"] = [r for r in data["records"] if not (r["variant"] == "int8-wo" and (r["stage"], r["metric"]) in GATED)]
    code, verdicts, out = _gate(tmp_path, run_file, data, capsys)
    assert code == EXIT_INCOMPLETE and "gate INCOMPLETE" in out, out
    reason = verdicts["evidence/gated"]["reason"]
    assert verdicts["evidence/gated"]["verdict"] == "INCOMPLETE"
    assert "ppl/int8-wo: no kld_mean record" in reason and "ppl/int8-wo: no ppl_ratio record" in reason
    assert "tasks/arc_easy/int8-wo" in reason and "tasks/piqa/int8-wo" in reason


def test_a_recorded_stage_error_is_incomplete(tmp_path, run_file, data, capsys):
    data["errors"] = [{"stage": "ppl", "variant": "int8-wo", "message": "CUDA error: an illegal memory access"}]
    code, verdicts, out = _gate(tmp_path, run_file, data, capsys)
    assert code == EXIT_INCOMPLETE and "gate INCOMPLETE" in out, out
    assert verdicts["run/errors"]["verdict"] == "INCOMPLETE"
    assert "ppl/int8-wo: CUDA error: an illegal memory access" in verdicts["run/errors"]["reason"]


def test_report_rejudge_checks_the_evidence(tmp_path, data, capsys):
    _record(data, "int8-wo", "kld_mean")["value"] = 5
    src = tmp_path / "in" / "results.json"
    src.parent.mkdir()
    src.write_text(json.dumps(data))
    assert main(["report", str(src), "--rejudge", "--format", "json", "--out", str(tmp_path / "out")]) == EXIT_INVALID
    assert {v["verdict"] for v in Results.load(tmp_path / "out" / "results.json").verdicts} == {INVALID}


def test_compare_refuses_duplicates_and_unknown_stages(tmp_path, run_file, data, capsys):
    data["records"].append(dict(_record(data, "int8-wo", "kld_mean")))
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(data))
    assert main(["compare", str(run_file), str(dup)]) == EXIT_INVALID
    assert "2 records with one key" in capsys.readouterr().out
    assert main(["compare", str(run_file), str(run_file), "--stage", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evalsuite: error: --stage bogus: neither results file holds it") and "\n" not in err
    assert main(["compare", str(run_file), str(run_file)]) == 0


@pytest.mark.parametrize("argv,match", [
    (["compare", "{a}", "{a}", "--sigma", "inf"], "--sigma inf: must be a positive finite number"),
    (["gate", "{a}", "--gates", "{gates}"], "kld_mean_max = nan: expected a finite number"),
])
def test_non_finite_limits_are_refused(tmp_path, run_file, capsys, argv, match):
    gates = tmp_path / "gates.yaml"
    gates.write_text("schemes:\n  int8-*: {kld_mean_max: .nan}\n")
    code = main([a.format(a=run_file, gates=gates) for a in argv] + (["--no-history"] if argv[0] == "gate" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("evalsuite: error:") and match in err and "\n" not in err


def test_a_limit_in_exponent_notation_is_a_number(tmp_path, run_file, capsys):
    gates = tmp_path / "gates.yaml"
    gates.write_text("schemes:\n  int8-*: {kld_mean_max: 1.0e9, ppl_ratio_max: 2e0}\n")  # PyYAML: both strings
    assert load_gate_config(gates).scheme("int8-wo")[1]["kld_mean_max"] == 1e9
    assert main(["gate", str(run_file), "--baseline", str(run_file), "--gates", str(gates), "--no-history"]) == 0


def test_gate_out_does_not_replace_a_runs_verdicts_without_force(tmp_path, run_file, capsys):
    before = run_file.read_text()
    code = main(["gate", str(run_file), "--baseline", str(run_file), "--no-history", "--out", str(run_file.parent)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a results.json" in err and "--force" in err
    assert run_file.read_text() == before


# ---- fuzz: no edit turns a FAIL into a PASS; every edit the details can see is INVALID ----

FAIL_GATES = "schemes:\n  int8-*: {kld_mean_max: 1.0e-7}\n"  # the run's KLD (~7.5e-7) is far beyond it


def _verdict(d: dict, config) -> int:
    return exit_code([c.to_dict() for c in judge(Results.from_dict(copy.deepcopy(d)), config)])


def _mutate(rng: random.Random, d: dict, derived: dict) -> tuple[str, bool, bool]:
    """Edit one field of ``d`` in place. Returns (what, whether the details must catch it (INVALID),
    whether it removed a gated record (at least INCOMPLETE))."""
    recs = d["records"]
    kind = rng.choice(["value", "n", "ci", "detail", "drop-detail", "drop-record", "other"])
    rederived = [r for r in recs if (r["stage"], r["task"], r["variant"], r["metric"]) in derived]
    if kind in ("value", "n", "ci"):
        r = rng.choice(rederived)
        key = (r["stage"], r["task"], r["variant"], r["metric"])
        if kind == "value":
            old = float(r["value"])
            r["value"] = old * (1 + rng.choice([-1, 1]) * rng.uniform(1e-6, 2.0)) if old else rng.uniform(1e-6, 1.0)
            return f"{key} value {old} -> {r['value']}", True, False
        if kind == "n":
            r["n"] = r["n"] + rng.choice([-1, 1]) * rng.randint(1, 50)
            return f"{key} n -> {r['n']}", True, False
        if derived[key]["ci"] is not None:
            lo, hi = r["ci95"]
            width = max(hi - lo, 1e-12)
            i = rng.randrange(2)
            r["ci95"][i] += rng.choice([-1, 1]) * rng.uniform(0.3, 3.0) * width
            return f"{key} ci95[{i}] -> {r['ci95']}", True, False
        r = rng.choice([r for r in recs if r.get("ci95")])
        r["ci95"][rng.randrange(2)] *= rng.uniform(0.5, 1.5)
        return f"{r['metric']} ci95 (consistency only) -> {r['ci95']}", False, False
    ppl, tasks = d["details"]["ppl"], d["details"]["tasks"]
    arrays = [(ppl["variants"][v], k) for v in ppl["variants"] for k in ("nll_sum", "n_finite")]
    arrays += [(ppl["paired"]["int8-wo"], k) for k in ("n", "kld_sum", "nll_ref_sum", "nll_sum", "same_top1",
                                                        "delta_p_sum", "delta_p_sq_sum", "kld_top1pct_sum")]
    arrays += [(tasks[t]["values"][v], "acc") for t in tasks for v in tasks[t]["values"]]
    if kind == "detail":
        entry, key = rng.choice(arrays)
        i = rng.randrange(len(entry[key]))
        x = entry[key][i]
        if key == "acc":
            entry[key][i] = 1.0 - x
        elif key in ("n", "n_finite"):
            entry[key][i] = x + rng.randint(1, 5)
        else:
            entry[key][i] = x * (1 + rng.choice([-1, 1]) * rng.uniform(1e-4, 1.0)) if x else 1e-3
        return f"details {key}[{i}] {x} -> {entry[key][i]}", True, False
    if kind == "drop-detail":
        entry, key = rng.choice(arrays)
        del entry[key]
        return f"details {key} deleted", True, False
    if kind == "drop-record":
        r = recs.pop(rng.randrange(len(recs)))
        gated = r["variant"] == "int8-wo" and (r["stage"], r["metric"]) in GATED
        # a re-derived record's loss is not seen by its details (nothing contradicts), only its gap if gated
        return f"record {r['stage']}/{r['task']}/{r['variant']}/{r['metric']} deleted", False, gated
    r = rng.choice([r for r in recs if (r["stage"], r["task"], r["variant"], r["metric"]) not in derived])
    if isinstance(r.get("value"), (int, float)):
        r["value"] = float(r["value"]) * rng.uniform(0.1, 10.0)
    return f"{r['metric']} (not re-derivable) value -> {r.get('value')}", False, False


def test_fuzz_no_edit_turns_a_fail_into_a_pass_and_the_details_catch_every_edit_they_can(tmp_path, data):
    gates = tmp_path / "fail.yaml"
    gates.write_text(FAIL_GATES)
    passing, failing = load_gate_config(), load_gate_config(gates)
    assert _verdict(data, passing) == 0 and _verdict(data, failing) == 1
    derived = rederive(Results.from_dict(copy.deepcopy(data))).by_key
    assert {k[3] for k in derived} >= {"kld_mean", "ppl_ratio", "token_ppl", "acc", "delta_acc", "nonfinite_tokens"}
    rng = random.Random(20261207)
    for i in range(200):
        d = copy.deepcopy(data)
        what, detectable, gap = _mutate(rng, d, derived)
        on_pass, on_fail = _verdict(d, passing), _verdict(d, failing)
        assert on_fail != 0, f"edit {i} ({what}) turned a FAIL into a PASS"
        if detectable:
            assert on_pass == on_fail == EXIT_INVALID, f"edit {i} ({what}) went undetected: {on_pass}, {on_fail}"
        if gap:
            assert on_pass in (EXIT_INCOMPLETE, EXIT_INVALID), f"edit {i} ({what}) removed a gated record and passed"


def test_a_roofline_above_one_is_a_measurement_not_a_contradiction():
    """Decode bandwidth over a copy timed at another moment: a model whose weights fit in the GPU's L2
    (or a loaded CPU) measures more than 1; the gate must not call unchanged code INVALID for it,
    while a negative one still is."""
    from evalsuite.judge.evidence import schema_problems
    from evalsuite.results import Results

    res = Results()
    res.add(stage="speed", task="decode_bs1", variant="fp", metric="roofline_fraction", value=1.3,
            unit="fraction", n=5, higher_is_better=True)
    assert schema_problems(res) == []
    res.add(stage="speed", task="decode_bs1", variant="fp", metric="roofline_fraction", value=-0.1,
            unit="fraction", n=5, higher_is_better=True)
    assert schema_problems(res)
