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
    its interval): a regression when every measurement has it, a one-off glitch when only the first."""
    calls = [0]
    real = perplexity.STAGE.run

    def run(ctx):
        real(ctx)
        calls[0] += 1
        if calls[0] <= times:
            m = ctx.results.get(*KLD)
            m.value *= 1000
            m.ci95 = [x * 1000 for x in m.ci95]

    monkeypatch.setattr(perplexity, "STAGE", dataclasses.replace(perplexity.STAGE, run=run))
    return calls


def run_confirmed(tmp_path, smollm2, data_dir, confirm: bool = True) -> tuple[int, dict, dict]:
    """SmolLM2 (loaded once a session) through the whole pipeline, ppl only on two short windows."""
    from evalsuite.api import evaluate
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

