"""The run session: a CPU smoke run gives the records the code gave before the layers were redesigned;
every path through the session (run, --confirm, fix verification, evaluate) measures with one loop and
reports a stage's fault the same way; results.json records the run's config."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from test_fix import model_dirs  # noqa: F401  (a fixture: a tiny model with a planted bad layer, and an honest one)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smoke_run_records.json"
KEYS = ("stage", "task", "variant", "metric", "value", "unit", "n", "higher_is_better", "stderr", "ci95")


@pytest.mark.slow
def test_a_smoke_run_gives_the_records_it_gave_before_the_redesign(tmp_path, smollm2_path):
    """tests/fixtures/smoke_run_records.json was written by the code before #28's moves (commit in
    its ``produced_at``); the same command must give the same records, values and sample sizes
    (timings are not records; floats within REL/ABS below, counts exact)."""
    from evalsuite.commands.cli import main
    from evalsuite.results import Results

    ref = json.loads(FIXTURE.read_text())
    argv = shlex.split(ref["command"])[1:] + ["--model", str(smollm2_path), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    got = [{k: r.to_dict().get(k) for k in KEYS} for r in Results.load(tmp_path / "run" / "results.json").records]
    assert [(r["stage"], r["task"], r["variant"], r["metric"]) for r in got] == \
        [(r["stage"], r["task"], r["variant"], r["metric"]) for r in ref["records"]]
    for mine, theirs in zip(got, ref["records"]):
        assert _same(mine, theirs), (mine, theirs)


# Floats to 1e-3 relative or 1e-5 absolute: the fixture was written under the library versions of its
# commit; another transformers/numpy release reorders CPU arithmetic and moves the statistics (measured
# 2026-12-07 with transformers 5.25, torch 2.13: up to 3e-3 relative on near-zero differences such as
# int8-wo's ln_ppl_ratio, 3e-7 absolute; 8e-6 relative on perplexity). Counts, names and sample sizes stay
# exact, and a change of what is measured (windows, tokens, BOS, a stage's arithmetic) moves these records
# by far more than either bound.
REL, ABS = 1e-3, 1e-5


def _same(a: dict, b: dict) -> bool:
    for k in KEYS:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float):
            if x != pytest.approx(y, rel=REL, abs=ABS, nan_ok=True):
                return False
        elif isinstance(x, list) and isinstance(y, list):
            if x != pytest.approx(y, rel=REL, abs=ABS):
                return False
        elif x != y:
            return False
    return True


def test_the_fixture_comparison_tolerates_library_drift_but_not_a_changed_measurement():
    ref = {(r["metric"], r["variant"]): r for r in json.loads(FIXTURE.read_text())["records"]}
    ppl, kld = ref[("token_ppl", "fp")], ref[("kld_mean", "int8-wo")]
    assert _same(dict(ppl, value=ppl["value"] * (1 + 1e-5)), ppl)  # drift of a library release
    assert not _same(dict(ppl, value=ppl["value"] * 1.005), ppl)   # half a percent of perplexity
    assert not _same(dict(kld, value=kld["value"] * 1.05), kld)    # 5% of int8-wo's KLD
    assert not _same(dict(ppl, n=ppl["n"] + 1), ppl)                # one token more


# ------------------------------------------------------------------ one run loop, one way to fail
PLANTED = {"stage": "ppl", "variant": None, "message": "internal error: RuntimeError: planted fault in the ppl stage"}


def plant_fault(monkeypatch, on_call: int) -> list[int]:
    """The ppl stage raises on its ``on_call``-th measurement (1: the run's own; 2: the re-measurement
    of --confirm or a fix verification), and measures normally otherwise."""
    import dataclasses

    from evalsuite.measure import perplexity

    calls, real = [0], perplexity.STAGE.run

    def run(ctx):
        calls[0] += 1
        if calls[0] == on_call:
            raise RuntimeError("planted fault in the ppl stage")
        real(ctx)

    monkeypatch.setattr(perplexity, "STAGE", dataclasses.replace(perplexity.STAGE, run=run))
    return calls


def _errors(path: Path) -> list[dict]:
    return json.loads(path.read_text())["errors"]


@pytest.mark.parametrize("path", ["run", "confirm", "fix verification", "evaluate"])
def test_a_fault_in_a_stage_is_reported_the_same_by_every_path_through_the_session(path, model_dirs, data_dir,
                                                                                    tmp_path, monkeypatch, capsys):
    """run, --confirm's re-measurement, a fix verification and evaluate() all measure through
    app.session.measure_stages: a stage that raises is recorded in the results file that loop was
    filling, in the same words, and the command exits 3 (internal error) after writing what it has;
    evaluate() raises it."""
    from evalsuite.judge.checks import EXIT_INTERNAL
    from test_fix import _main, _run_argv

    out = tmp_path / "run"
    calls = plant_fault(monkeypatch, on_call=1 if path in ("run", "evaluate") else 2)
    if path == "evaluate":
        from evalsuite.commands.api import evaluate

        with pytest.raises(RuntimeError, match="planted fault"):
            evaluate(str(model_dirs["planted"]), stages=["ppl"], data_dir=data_dir, out=out, device="cpu",
                     ppl_context=64, ppl_windows=16, threads=1, no_progress=True)
        filled = out / "results.json"
    else:
        extra = {"run": [], "confirm": ["--confirm"], "fix verification": ["--suggest-fix"]}[path]
        assert _main(_run_argv(model_dirs["planted"], data_dir, out, *extra), monkeypatch) == EXIT_INTERNAL
        filled = out / {"run": "results.json", "confirm": "confirm/results.json",
                        "fix verification": "fix/int8-wo/results.json"}[path]
    assert calls[0] == (1 if path in ("run", "evaluate") else 2)
    assert PLANTED in _errors(filled)
    if path != "run" and path != "evaluate":  # the run's own judgement was written before the fault surfaced
        verdicts = json.loads((out / "results.json").read_text())["verdicts"]
        assert any(v["check"].endswith("int8-wo/kld_mean") and v["verdict"] == "FAIL" for v in verdicts)
    if path != "evaluate":  # the CLI's exit 3: the traceback on stderr
        assert "RuntimeError: planted fault in the ppl stage" in capsys.readouterr().err


def test_results_json_records_the_run_config_typed_and_versioned(model_dirs, data_dir, tmp_path, monkeypatch):
    """run.config: the RunConfig the run was built from (schema evalsuite.runconfig/1), and a results
    file without it (written before) still loads and judges."""
    from evalsuite.commands.cli import main
    from evalsuite.results import Results
    from test_fix import _main, _run_argv

    out = tmp_path / "run"
    assert _main(_run_argv(model_dirs["honest"], data_dir, out, "--ppl-batch", "2"), monkeypatch) == 0
    data = json.loads((out / "results.json").read_text())
    config = data["run"]["config"]
    assert config["schema"] == "evalsuite.runconfig/1"
    assert config["model"]["quant"] == "int8-wo" and config["model"]["device"] == "cpu"
    assert config["stages"]["spec"] == "ppl" and config["stages"]["options"]["ppl_context"] == 64
    assert config["stages"]["options"]["ppl_batch"] == 2 and config["data"]["data_dir"] == str(data_dir)
    assert config["output"]["out"] == str(out) and config["judge"]["no_history"] is True
    del data["run"]["config"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert Results.load(old).run.get("config") is None
    assert main(["gate", "--candidate", str(old), "--baselines", str(tmp_path / "none"), "--no-history"]) in (0, 4)
