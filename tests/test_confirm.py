"""``evalsuite run --confirm``: a failing gated check is re-measured once with another batch plan in the
same process; only a failure that reproduces pages (exit 1), one that does not is reported as WORSE
with "not confirmed by a re-measurement with ..."."""

from __future__ import annotations

import dataclasses
import json

from evalsuite.measure import perplexity

KLD = ("ppl", "wikitext2", "int8-wo", "kld_mean")


def plant_kld_regression(monkeypatch, times: int) -> list[int]:
    """The ppl stage's first ``times`` measurements report int8-wo's mean KLD 1000x too large (with
    its interval and the per-window sums it is computed from): a regression when every measurement has it, a one-off glitch when only the first."""
    calls = [0]
    real = perplexity.STAGE.run

    def run(ctx):
        real(ctx)
        calls[0] += 1
        if calls[0] <= times:
            m = ctx.results.get(*KLD)
            m.value *= 1000
            m.ci95 = [x * 1000 for x in m.ci95]
            paired = ctx.results.details["ppl"]["paired"]["int8-wo"]  # and the per-window sums behind it
            paired["kld_sum"] = [x * 1000 for x in paired["kld_sum"]]

    monkeypatch.setattr(perplexity, "STAGE", dataclasses.replace(perplexity.STAGE, run=run))
    return calls


def run_confirmed(tmp_path, smollm2, data_dir, confirm: bool = True) -> tuple[int, dict, dict]:
    """SmolLM2 (loaded once a session) through the whole pipeline, ppl only on two short windows."""
    from evalsuite.commands.api import evaluate
    from evalsuite.judge.checks import exit_code

    out = tmp_path / "run"
    res = evaluate(smollm2.model, tokenizer=smollm2.tokenizer, stages=["ppl"], data_dir=data_dir, limit=2,
                   ppl_context=128, ppl_noise_floor="off", fp_cache="off", out=out, confirm=confirm, quiet=False)
    data = json.loads((out / "results.json").read_text())
    return exit_code(res.verdicts), data, {v["check"]: v for v in data["verdicts"]}


def test_reproduced_regression_is_a_confirmed_fail(tmp_path, smollm2, data_dir, monkeypatch):
    calls = plant_kld_regression(monkeypatch, times=2)
    code, data, v = run_confirmed(tmp_path, smollm2, data_dir)
    kld = v["ppl/wikitext2/int8-wo/kld_mean"]
    assert code == 1 and kld["verdict"] == "FAIL" and kld["failing"]
    assert calls[0] == 2  # --confirm measured ppl a second time, in the same process
    assert kld["extra"]["confirmed"] is True and "confirmed by a re-measurement with --ppl-batch 2" in kld["reason"]
    assert data["run"]["confirm"]["confirmed"] == ["ppl/wikitext2/int8-wo/kld_mean"]
    again = json.loads((tmp_path / "run" / "confirm" / "results.json").read_text())
    assert again["details"]["ppl"]["protocol"]["batch_size"] == 2  # another batch plan (the run's was 1)


def test_one_off_glitch_is_not_confirmed_and_is_reported(tmp_path, smollm2, data_dir, monkeypatch, capsys):
    calls = plant_kld_regression(monkeypatch, times=1)
    code, data, v = run_confirmed(tmp_path, smollm2, data_dir)
    kld = v["ppl/wikitext2/int8-wo/kld_mean"]
    assert calls[0] == 2 and code == 0
    assert kld["verdict"] == "WORSE" and not kld["failing"] and kld["extra"]["confirmed"] is False
    assert kld["reason"].startswith("not confirmed by a re-measurement with --ppl-batch 2 (was 1)")
    assert "first measurement:" in kld["reason"]  # what the first measurement said is kept
    assert data["run"]["confirm"]["not_confirmed"] == ["ppl/wikitext2/int8-wo/kld_mean"]
    printed = " ".join(capsys.readouterr().out.split())  # the summary wraps at the terminal's width
    assert "--confirm: re-measuring ppl" in printed and "1 failure not confirmed by the re-measurement" in printed



def test_a_failure_the_remeasurement_did_not_judge_stands():
    """A re-measurement that lost the record (a stage error, a missing task) gives no second opinion:
    the failure keeps failing the run instead of passing unchecked; a judged non-failure is not
    confirmed (WORSE)."""
    from evalsuite.judge.checks import FAIL, PASS, SKIPPED, Check
    from evalsuite.app.confirm import confirm
    from evalsuite.results import Results

    def failing(name):
        return Check(name, "limit", FAIL, "kld beyond the limit", stage="ppl", variant="int8-wo", gated=True,
                     failing=True)

    first = [failing("ppl/w/int8-wo/kld_mean"), failing("ppl/w/int8-wo/ppl_ratio"), failing("ppl/w/int8-wo/kld_p99")]
    second = [Check("ppl/w/int8-wo/kld_mean", "limit", PASS, "fine", stage="ppl", variant="int8-wo", gated=True),
              Check("ppl/w/int8-wo/ppl_ratio", "limit", SKIPPED, "no record", stage="ppl", variant="int8-wo")]
    checks, fault = confirm(Results(run={}), first, lambda stages, variants: (Results(run={}), "--ppl-batch 2"),
                            lambda again: second)
    assert fault is None
    by = {c.check: c for c in checks}
    assert by["ppl/w/int8-wo/kld_mean"].verdict == "WORSE" and not by["ppl/w/int8-wo/kld_mean"].failing
    for lost in ("ppl/w/int8-wo/ppl_ratio", "ppl/w/int8-wo/kld_p99"):  # SKIPPED there, and absent there
        assert by[lost].verdict == FAIL and by[lost].failing and "so it stands" in by[lost].reason
