"""Issue #32: a quantizer must quantize, baselines are protected, every path refuses what it cannot do.

Each probe is a real ``evalsuite run`` (or ``baseline update``) on a tiny random Llama with its own
small tokenizer, in this process: what it once passed (exit 0) or crashed on (traceback, exit 3) is
now one line on stderr and exit 2, with what was computed kept.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import make_tiny_llama
from evalsuite.commands.cli import main
from evalsuite.results import Results


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from test_robustness import _tokenizer

    d = tmp_path_factory.mktemp("tiny") / "llama"
    tok = _tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=64, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run_args(model: Path, out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out),
            "--stages", "ppl", "--limit", "2", "--ppl-context", "128", "--no-history", "--no-progress", *extra]


def one_line(capsys, code: int, *match: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("evalsuite: error:"), (code, err)
    for m in match:
        assert m in err[0], err[0]
    return err[0]


# --- a handler is the user's code: whatever it does is its error, not evalsuite's end ----------------

HANDLERS = '''
import sys
import torch

def exits(model):
    sys.exit(0)

def interrupts(model):
    raise KeyboardInterrupt

def forty_two(model):
    return 42

def unchanged(model):
    return model

def spins(model):
    while True:
        pass

class ConvertsToAString:
    def __init__(self, mod):
        self.mod = mod
    def create_quantized_state_dict(self):
        return self.mod.state_dict()
    def convert_for_runtime(self):
        return "done"
'''


@pytest.mark.parametrize("name, extra, match", [
    ("exits", [], "called sys.exit(0)"),
    ("interrupts", [], "raised KeyboardInterrupt (not a Ctrl-C"),
    ("forty_two", [], "forty_two() returned a value of type 'int'"),
    ("ConvertsToAString", [], "ConvertsToAString.convert_for_runtime() returned a value of type 'str'"),
    ("unchanged", [], "no layer differs from fp (0 layers changed"),
    ("spins", ["--handler-timeout", "0.5"], "did not finish within --handler-timeout 0.5 s"),
], ids=["sys-exit", "own-keyboard-interrupt", "returns-42", "convert-returns-str", "returns-model-unchanged",
        "timeout"])
def test_a_handler_that_does_not_quantize_is_one_line_and_keeps_the_results(name, extra, match, tiny_dir, tmp_path,
                                                                             data_dir, capsys):
    (tmp_path / "h.py").write_text(HANDLERS)
    out = tmp_path / "run"
    # named like the built-in scheme: the name must not make a no-op pass as int8
    code = main(run_args(tiny_dir, out, data_dir, "--quant", f"int8-wo={tmp_path}/h.py:{name}", *extra))
    line = one_line(capsys, code, match, "int8-wo")
    saved = Results.load(out / "results.json")
    assert f"results so far saved to {out / 'results.json'}" in line
    assert "load" in saved.run["stage_seconds"] and not saved.records and "finished" in saved.run
    assert match in saved.errors[0]["message"]


def test_a_handler_file_that_exits_at_import_is_one_line_before_the_model_loads(tiny_dir, tmp_path, capsys):
    (tmp_path / "h.py").write_text("import sys\nsys.exit(3)\n")
    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_dir), "--quant", f"{tmp_path}/h.py:q", "--stages", "none", "--out", str(out)])
    one_line(capsys, code, "importing", "called sys.exit(3)")
    assert not out.exists()


def test_handler_timeout_without_a_handler_is_refused(tiny_dir, tmp_path, capsys):
    code = main(["run", "--model", str(tiny_dir), "--quant", "int8-wo", "--handler-timeout", "5", "--stages", "none",
                 "--out", str(tmp_path / "run")])
    one_line(capsys, code, "--handler-timeout bounds a --quant FILE.py:Name")


# --- a variant must differ from the reference, and --skip-layers must name layers -------------------

def test_the_model_itself_as_a_variant_model_is_refused(tiny_dir, tmp_path, data_dir, capsys):
    code = main(run_args(tiny_dir, tmp_path / "a", data_dir, "--variant-model", f"same={tiny_dir}"))
    one_line(capsys, code, f"--variant-model same={tiny_dir}: is --model itself")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    code = main(run_args(tiny_dir, tmp_path / "b", data_dir, "--variant-model", f"same={copy}"))
    one_line(capsys, code, "the same weights as --model")
    assert not Results.load(tmp_path / "b" / "results.json").records


def test_a_skip_pattern_that_matches_no_layer_is_refused(tiny_dir, tmp_path, data_dir, capsys):
    code = main(run_args(tiny_dir, tmp_path / "run", data_dir, "--skip-layers", "model.layers.0.*,nomatch*"))
    line = one_line(capsys, code, "--skip-layers nomatch*: matches no linear layer")
    assert "model.layers.0.*" not in line.split(":")[1]  # the pattern that matches is not blamed


# --- --resume compares every option that changes a kept measurement ----------------------------------

def test_resume_with_another_ppl_context_is_refused_naming_it(tiny_dir, tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert main(run_args(tiny_dir, out, data_dir)) in (0, 1)
    capsys.readouterr()
    code = main(run_args(tiny_dir, out, data_dir, "--resume", "--ppl-context", "256"))
    one_line(capsys, code, "differs in --ppl-context", "was 128, now 256")
    code = main(run_args(tiny_dir, out, data_dir, "--resume", "--quant", "int8-wo=int4-wo-g32"))
    one_line(capsys, code, "--quant")
    # an option of a stage the resumed run does not keep may differ: that stage is measured anew
    args = [a if a != "ppl" else "ppl,layers" for a in run_args(tiny_dir, out, data_dir)]
    assert main([*args, "--resume", "--layer-tokens", "128", "--layer-seq-len", "64"]) in (0, 1)
    assert Results.load(out / "results.json").run["resumed_from"]["kept_stages"] == ["ppl"]


# --- --out that cannot be written: one line, and the results go elsewhere ---------------------------

def test_out_that_cannot_be_created_is_one_line(tiny_dir, capsys):
    one_line(capsys, main(["run", "--model", str(tiny_dir), "--stages", "none", "--out", "/proc/evalsuite-x"]),
             "--out /proc/evalsuite-x: cannot write there")


def test_out_that_turns_into_a_file_mid_run_saves_the_results_elsewhere(tiny_dir, tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    (tmp_path / "h.py").write_text(f'''
import shutil
from evalsuite.quantize import parse_scheme, quantize_

def q(model):
    shutil.rmtree({str(out)!r})
    open({str(out)!r}, "w").write("not a folder")
    return quantize_(model, parse_scheme("int8-wo"))
''')
    code = main(run_args(tiny_dir, out, data_dir, "--quant", f"{tmp_path}/h.py:q"))
    line = one_line(capsys, code, f"--out {out}: cannot write", "results so far saved to ")
    rescued = Path(line.rsplit("results so far saved to ", 1)[1].rstrip(")"))
    assert rescued.is_file() and not str(rescued).startswith(str(tmp_path))
    assert Results.load(rescued).run["quantized_layers"] == {"h.q": 14}


def test_results_and_reports_are_written_with_the_users_umask(tiny_dir, tmp_path, data_dir):
    old = os.umask(0o022)
    try:
        assert main(run_args(tiny_dir, tmp_path / "run", data_dir)) in (0, 1)
    finally:
        os.umask(old)
    for name in ("results.json", "report.md", "report.html", "junit.xml"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


# --- baselines are protected -------------------------------------------------------------------------

def judged(seed: int, kld: float, path: Path) -> str:
    from test_judge import make_results

    import evalsuite

    res = evalsuite.Results.from_dict(make_results(seed=seed, kld=kld).to_dict())
    res.gate()  # sets its verdicts
    res.save(path)
    return str(path)


def test_baseline_update_refuses_a_failing_run_unless_accepted(tmp_path, capsys):
    bad = judged(3, 0.5, tmp_path / "bad.json")
    assert not Results.load(bad).passed
    folder = tmp_path / "bl"
    code = main(["baseline", "update", bad, "--baselines", str(folder)])
    line = one_line(capsys, code, "not a sound baseline", "FAIL", "--accept-regression")
    assert not folder.exists()
    accept = line.split("accept it: ", 1)[1]
    assert accept.startswith("evalsuite baseline update") and "--accept-regression" in accept
    assert main(["baseline", "update", bad, "--baselines", str(folder), "--accept-regression"]) == 0


def test_baseline_update_refuses_an_unfinished_run(tmp_path, capsys):
    from test_judge import make_results

    res = make_results(seed=4)
    del res.run["finished"]
    res.save(tmp_path / "r.json")
    code = main(["baseline", "update", str(tmp_path / "r.json"), "--baselines", str(tmp_path / "bl")])
    one_line(capsys, code, "never finished")


def test_baseline_update_over_a_baseline_shows_the_change_and_keeps_the_old_file(tmp_path, capsys):
    folder = tmp_path / "bl"
    good = judged(5, 1e-3, tmp_path / "good.json")
    assert main(["baseline", "update", good, "--baselines", str(folder), "--variant", "int8-wo"]) == 0
    path = next(folder.rglob("int8-wo.json"))
    before = path.read_bytes()
    worse = judged(6, 5e-3, tmp_path / "worse.json")
    capsys.readouterr()
    assert main(["baseline", "update", worse, "--baselines", str(folder), "--variant", "int8-wo"]) == 0
    printed = capsys.readouterr().out
    old_kld = next(m["value"] for m in json.loads(before)["metrics"] if m["metric"] == "kld_mean")
    new_kld = next(m["value"] for m in json.loads(path.read_text())["metrics"] if m["metric"] == "kld_mean")
    assert old_kld != new_kld
    assert any(ln.strip().startswith("ppl/wikitext2/int8-wo/kld_mean:") and " → " in ln for ln in printed.splitlines())
    assert (path.parent / "int8-wo.json.bak").read_bytes() == before


def test_a_failing_gate_prints_an_update_command_that_accepts_it(tmp_path, capsys):
    folder = tmp_path / "bl"
    assert main(["baseline", "update", judged(7, 1e-3, tmp_path / "good.json"), "--baselines", str(folder)]) == 0
    worse = judged(8, 5e-3, tmp_path / "worse.json")
    capsys.readouterr()
    assert main(["gate", worse, "--baselines", str(folder), "--no-history"]) == 1
    commands = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("evalsuite baseline")]
    assert commands and all("--accept-regression" in c for c in commands), commands


def test_a_cpu_run_records_no_idle_fraction_and_says_why_in_its_timing_table(tiny_dir, tmp_path, data_dir, capsys):
    import re

    from evalsuite.measure.phase_timer import NO_IDLE_ON_CPU

    out = tmp_path / "run"
    code = main(run_args(tiny_dir, out, data_dir, "--no-ppl-noise-floor"))
    assert code in (0, 4), capsys.readouterr().err
    run = Results.load(out / "results.json").run
    assert run["stage_idle"] == {"ppl": {"fraction": None, "reason": NO_IDLE_ON_CPU}}
    err = capsys.readouterr().err
    assert re.search(r"^ppl\s+[\d.]+\s+n/a$", err, re.M) and "device idle" in err, err
    assert f"n/a: {NO_IDLE_ON_CPU}" in err
