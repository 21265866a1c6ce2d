"""``evalsuite nightly``: a matrix of runs, one broken entry not stopping the others, resume, the
summary and its exit code, and config validation."""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from evalsuite.commands import nightly
from evalsuite.commands.cli import main as cli
from evalsuite.errors import EvalsuiteError
from evalsuite.results import Results

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def nightly_cli(*argv: str) -> int:
    return cli(["nightly", *argv])


# ---------------------------------------------------------------------------------------------
# config validation: one line, exit 2, nothing run

@pytest.mark.parametrize("text,message", [
    ("entries: [{name: a, stages: ppx}]", "unknown stage 'ppx'"),
    ("entries: [{name: a, quant: int3-wo}]", "int3-wo"),
    ("entries: [{name: a, colour: red}]", "unknown key 'colour'"),
    ("entries: [{name: a, limit: many}]", "limit = 'many' has the wrong type"),
    ("entries: [{name: a, nproc: 0}]", "nproc and limit must be at least 1"),
    ("entries: [{name: a, nproc: 3, tp: 2}]", "tp must be at least 1 and divide nproc (3)"),
    ("entries: [{name: a, tp: 2}]", "tp must be at least 1 and divide nproc (1)"),
    ("entries: [{name: a}, {name: a}]", "duplicate entry name 'a'"),
    ("entries: [{name: 'a b'}]", "entry name 'a b'"),
    ("entries: []", "no entries"),
    ("entrys: [{name: a}]", "unknown top-level keys entrys"),
    ("schema: evalsuite.nightly/9\nentries: [{name: a}]", "not supported"),
    ("entries: [{name: a, device: tpu}]", "device must be"),
    ("- just\n- a list", "expected a mapping at the top level"),
    ("entries: [{name: a, stages: [ppl}", "not valid YAML"),
])
def test_invalid_config_exits_2_with_one_line(tmp_path, capsys, text, message):
    config = write(tmp_path / "m.yaml", text)
    assert nightly_cli("--config", str(config), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(config) in err, err
    assert not (tmp_path / "out").exists()


def test_missing_or_unsupported_config_file_exits_2(tmp_path, capsys):
    assert nightly_cli("--config", str(tmp_path / "nope.yaml")) == 2
    assert "no such file" in capsys.readouterr().err
    assert nightly_cli("--config", str(write(tmp_path / "m.json", "{}"))) == 2
    assert ".toml" in capsys.readouterr().err


def test_only_selects_entries_and_an_unknown_name_exits_2(tmp_path, capsys):
    config = write(tmp_path / "m.yaml", "entries: [{name: a}, {name: b, nproc: 2}, {name: c}]")
    assert nightly_cli("--config", str(config), "--only", "d", "--dry-run") == 2
    assert "no entries named d" in capsys.readouterr().err
    assert nightly_cli("--config", str(config), "--only", "b,a", "--dry-run", "--out", str(tmp_path / "o")) == 0
    printed = capsys.readouterr().out
    assert [ln for ln in printed.splitlines() if ln.startswith("#")] == ["# a", "# b"]
    assert "torch.distributed.run" in printed.split("# b")[1] and "torch.distributed.run" not in printed.split("# b")[0]
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


# ---------------------------------------------------------------------------------------------
# matrix expansion and commands

def test_matrix_expands_the_product_of_its_axes_under_the_defaults(tmp_path):
    data = nightly.load_config(write(tmp_path / "m.toml", """
[defaults]
limit = 8
device = "cuda"

[[matrix]]
model = ["/m/llama-8b", "/m/qwen-7b.gguf"]
quant = ["int8-wo", "int4-wo-g128,int8-dq"]
stages = "ppl"
limit = 4

[[entries]]
name = "smoke"
stages = "none"
"""))
    entries = nightly.expand_entries(data, "m.toml")
    names = [e.name for e in entries]
    assert names == ["llama-8b_int8-wo_ppl", "llama-8b_int4-wo-g128-int8-dq_ppl", "qwen-7b_int8-wo_ppl",
                     "qwen-7b_int4-wo-g128-int8-dq_ppl", "smoke"]
    by = {e.name: e.options for e in entries}
    assert by["qwen-7b_int4-wo-g128-int8-dq_ppl"] == {"limit": 4, "device": "cuda", "model": "/m/qwen-7b.gguf",
                                                       "quant": "int4-wo-g128,int8-dq", "stages": "ppl"}
    assert by["smoke"] == {"limit": 8, "device": "cuda", "stages": "none"}


def test_matrix_name_is_a_prefix_and_unset_variables_are_refused(tmp_path, monkeypatch):
    data = nightly.load_config(write(tmp_path / "m.yaml", """
matrix:
  name: smol
  quant: [int8-wo, int8-dq]
  stages: ppl,tasks
"""))
    assert [e.name for e in nightly.expand_entries(data, "m.yaml")] == ["smol_int8-wo_ppl-tasks", "smol_int8-dq_ppl-tasks"]
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    data = {"entries": [{"name": "a", "model": "${NO_SUCH_VAR_X}/llama"}]}
    with pytest.raises(EvalsuiteError, match="environment variable NO_SUCH_VAR_X is not set"):
        nightly.expand_entries(data, "m.yaml")
    monkeypatch.setenv("NO_SUCH_VAR_X", "/models")
    assert nightly.expand_entries(data, "m.yaml")[0].options["model"] == "/models/llama"


def test_shipped_configs_validate():
    for config in sorted((REPO / "configs").glob("*.yaml")):
        assert nightly.expand_entries(nightly.load_config(config), str(config))


def test_entry_command_maps_options_and_uses_torchrun_for_several_gpus(tmp_path):
    data = nightly.load_config(write(tmp_path / "m.yaml", """
entries:
  - name: big
    model: /m/llama-70b
    quant: [int8-wo, int4-wo-g128]
    stages: [ppl, tasks]
    nproc: 2
    tp: 2
    gates: {strict: true}
    baseline: reports/baselines/x.json
    args: --ppl-context 512
"""))
    (entry,) = nightly.expand_entries(data, "m.yaml")
    cmd = entry.command(tmp_path / "e", history=None)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    joined = " ".join(cmd)
    for part in ("evalsuite run", "--model /m/llama-70b", "--quant int8-wo,int4-wo-g128", "--stages ppl,tasks",
                 f"--gates {tmp_path / 'e' / 'gates.yaml'}", "--baseline reports/baselines/x.json",
                 "--no-history", "--ppl-context 512", f"--out {tmp_path / 'e'}", "--tp 2"):
        assert part in joined
    assert entry.fingerprint(cmd) != entry.fingerprint(entry.command(tmp_path / "e", history=Path("h.sqlite")))


# ---------------------------------------------------------------------------------------------
# classification of one entry and the matrix exit code

def _results_file(path: Path, verdicts: list[dict], finished: bool = True) -> Path:
    r = Results(run={"started": "t0", **({"finished": "t1"} if finished else {})}, verdicts=verdicts)
    return r.save(path)


@pytest.mark.parametrize("rc,verdicts,finished,status", [
    (0, [{"check": "a", "verdict": "PASS"}], True, "PASS"),
    (1, [{"check": "ppl/x", "verdict": "FAIL", "failing": True, "reason": "kld too high"}], True, "FAIL"),
    (1, [{"check": "a", "verdict": "IMPROVED", "failing": True, "reason": "strict"}], True, "FAIL"),
    (1, [{"check": "a", "verdict": "PASS"}], True, "ERROR"),   # exit 1 without a failing gate: a crash
    (1, [], False, "ERROR"),                                    # crashed mid-run (e.g. CUDA OOM)
    (2, [], False, "ERROR"),                                    # usage / input error
    (0, [], False, "ERROR"),                                    # exit 0 but no finished results
    (None, [], False, "ERROR"),                                 # timed out
])
def test_classify_entry(tmp_path, rc, verdicts, finished, status):
    log = write(tmp_path / "run.log", "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory\n")
    results = _results_file(tmp_path / "results.json", verdicts, finished)
    outcome = nightly.classify(rc, results, log, timeout=30)
    assert outcome.status == status
    if status == "FAIL":
        assert outcome.message == verdicts[0]["check"] and outcome.failing_checks[0]["reason"] == verdicts[0]["reason"]
    if rc == 1 and not finished:
        assert "OutOfMemoryError" in outcome.message
    if rc is None:
        assert "timed out after 30 s" in outcome.message


@pytest.mark.parametrize("statuses,code", [
    (["PASS", "PASS"], 0),
    (["PASS", "ERROR"], 4),  # an incomplete matrix: INCOMPLETE, not a usage error
    (["PASS", "NOT-RUN"], 4),
    (["FAIL", "PASS"], 1),
    (["ERROR", "FAIL"], 1),  # a regression outranks an incomplete matrix
    ([], 0),
])
def test_matrix_exit_code_precedence(statuses, code):
    assert nightly.matrix_exit_code([nightly.Outcome(name=str(i), status=s) for i, s in enumerate(statuses)]) == code


# ---------------------------------------------------------------------------------------------
# real runs of SmolLM2 (no measurement stage: load + quantize + judge, a few seconds each)

MATRIX = """
defaults:
  device: cpu
  stages: none
  args: ["--threads", "1"]
entries:
  - name: smollm2-int8
    model: {model}
    quant: int8-wo
  - name: broken
    model: {missing}
"""


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_broken_entry_does_not_stop_the_matrix_and_resume_skips_finished(tmp_path, smollm2_path, capsys):
    config = write(tmp_path / "m.yaml", MATRIX.format(model=smollm2_path, missing=tmp_path / "no-such-model.gguf"))
    out, history = tmp_path / "out", tmp_path / "history.sqlite"
    assert nightly_cli("--config", str(config), "--out", str(out), "--history", str(history)) == 4
    printed = capsys.readouterr().out
    summary = _summary(out)
    by = {e["name"]: e for e in summary["entries"]}
    assert [e["name"] for e in summary["entries"]] == ["smollm2-int8", "broken"]
    assert by["smollm2-int8"]["status"] == "PASS" and by["broken"]["status"] == "ERROR"
    assert "no-such-model.gguf: no such file or directory" in by["broken"]["message"]
    assert summary["exit_code"] == 4 and summary["pending"] == []
    ok = Results.load(by["smollm2-int8"]["results"])
    assert ok.run["model"]["sha256"] and ok.run["schemes"] == ["int8-wo"] and ok.run["world_size"] == 1
    for name in ("smollm2-int8", "broken"):
        assert name in printed and name in (out / "summary.md").read_text()
    junit = ET.parse(out / "junit.xml").getroot().find("testsuite")  # the run's JUnit writer: one suite
    assert junit.get("tests") == "2" and junit.get("errors") == "1"
    assert junit.find("testcase[@name='broken']/error") is not None
    assert junit.find("testcase[@name='smollm2-int8']/error") is None
    with sqlite3.connect(history) as db:  # the finished entry landed in the history
        tables = [t for (t,) in db.execute("select name from sqlite_master where type='table'")]
        assert sum(db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables) > 0

    # resume: the finished entry is not run again, the broken one is
    entry_json = out / "entries" / "smollm2-int8" / "entry.json"
    before = (entry_json.stat().st_mtime_ns, Path(by["smollm2-int8"]["results"]).stat().st_mtime_ns)
    assert nightly_cli("--config", str(config), "--out", str(out), "--history", str(history)) == 4
    assert "smollm2-int8: PASS (finished earlier" in capsys.readouterr().out
    after = (entry_json.stat().st_mtime_ns, Path(by["smollm2-int8"]["results"]).stat().st_mtime_ns)
    assert after == before
    resumed = {e["name"]: e for e in _summary(out)["entries"]}
    assert resumed["smollm2-int8"]["resumed"] and not resumed["broken"]["resumed"]

    # the release gate reads the outcomes without running anything
    (out / "entries" / "broken" / "run.log").unlink()
    assert nightly_cli("--config", str(config), "--out", str(out), "--history", str(history), "--report-only") == 4
    gate = {e["name"]: e["status"] for e in _summary(out)["entries"]}
    assert gate == {"smollm2-int8": "PASS", "broken": "NOT-RUN"}
    assert not (out / "entries" / "broken" / "run.log").exists()

    # --only runs just the named entry; the summary keeps the other's recorded outcome
    assert nightly_cli("--config", str(config), "--out", str(out), "--history", str(history), "--only", "broken") == 4
    assert (out / "entries" / "broken" / "run.log").exists()
    assert (entry_json.stat().st_mtime_ns, Path(by["smollm2-int8"]["results"]).stat().st_mtime_ns) == before
    assert {e["name"]: e["status"] for e in _summary(out)["entries"]} == {"smollm2-int8": "PASS", "broken": "ERROR"}


@pytest.mark.slow
def test_regression_outranks_a_broken_entry(tmp_path, smollm2_path, data_dir, capsys):
    """An entry whose gate fails (an impossible KLD limit) gives exit code 1 even beside a broken
    entry; its failing check is named in the summary and in the JUnit file."""
    config = write(tmp_path / "m.yaml", f"""
defaults:
  device: cpu
  data_dir: {data_dir}
  args: ["--threads", "1"]
entries:
  - name: impossible-gate
    model: {smollm2_path}
    quant: int8-wo
    stages: ppl
    limit: 2
    gates:
      schemes: {{"int8-*": {{kld_mean_max: 1.0e-9}}}}
    args: ["--threads", "1", "--ppl-context", "64"]
  - name: broken
    model: {tmp_path / 'missing'}
""")
    out = tmp_path / "out"
    assert nightly_cli("--config", str(config), "--out", str(out), "--no-history") == 1
    by = {e["name"]: e for e in _summary(out)["entries"]}
    assert by["impossible-gate"]["status"] == "FAIL" and by["broken"]["status"] == "ERROR"
    assert "ppl/wikitext2/int8-wo/kld_mean" in by["impossible-gate"]["message"]
    results = Results.load(by["impossible-gate"]["results"])
    kld = results.get("ppl", "wikitext2", "int8-wo", "kld_mean")
    assert kld is not None and kld.value > 1e-9  # the gate failed for the reason it names
    assert "kld_mean" in (out / "summary.md").read_text()
    junit = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert junit.find("testcase[@name='ppl/wikitext2/int8-wo/kld_mean']/failure") is not None


def test_shipped_nightly_gates_loosen_int8_dq_only():
    """The shipped matrix's gates file: int8-dq (W8A8, measured KLD ~0.026 on SmolLM2) at the generic
    tier, every other scheme at exactly the defaults' limits (int8-wo stays at 99% of fp)."""
    from evalsuite.judge.config import load_gate_config

    data = nightly.load_config(REPO / "configs" / "nightly.yaml")
    (gates,) = {e.options["gates"] for e in nightly.expand_entries(data, "nightly.yaml")
                if str(e.options.get("gates", "")).endswith(".yaml")}
    shipped, defaults = load_gate_config(REPO / gates), load_gate_config(None)
    for scheme in ("int8-wo", "int4-wo-g128", "int4-wo-g32", "fp8-x"):
        assert shipped.scheme(scheme)[1] == defaults.scheme(scheme)[1], scheme
    dq, generic = shipped.scheme("int8-dq")[1], defaults.scheme("some-new-scheme")[1]
    assert dq == generic and dq["kld_mean_max"] > defaults.scheme("int8-dq")[1]["kld_mean_max"]
