"""Report: terminal tables, report.md / report.html / junit.xml from one results file, the
partial-run banner, the guilty layer named, and a headless-Chromium screenshot of the HTML."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from evalsuite.commands.cli import build_parser, main
from evalsuite.results import Results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_judge import MODULES, make_results, save  # noqa: E402  (the shared synthetic-run builder)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> tuple[Path, Results]:
    """A partial run with one broken layer (reported) and a KLD over its limit (gated: FAIL), judged and
    reported through ``evalsuite report``."""
    d = tmp_path_factory.mktemp("report")
    res = make_results(seed=4, kld=0.03, broken_layer=MODULES[9], limit=20,
                       errors=[{"stage": "ppl", "variant": "fp@noise", "message": "noise floor unavailable: test"}])
    src = save(res, d / "in" / "results.json")
    assert main(["report", src, "--format", "all", "--out", str(d / "out")]) == 1
    return d / "out", Results.load(d / "out" / "results.json")


def test_every_format_is_written_and_results_carry_verdicts(judged):
    out, res = judged
    for name in ("results.json", "report.md", "report.html", "junit.xml"):
        assert (out / name).stat().st_size > 0
    assert res.verdicts and {v["verdict"] for v in res.verdicts} >= {"FAIL", "PASS", "INCOMPLETE"}  # a stage error: INCOMPLETE
    assert len(res.records) == len(make_results(seed=4, kld=0.03, limit=20).records)


def test_reports_name_the_guilty_layer_and_show_the_partial_banner(judged):
    out, res = judged
    worst = MODULES[9]
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, html):
        assert "PARTIAL RUN: --limit 20" in text
        assert worst in text.split("Guilty layers", 1)[1]
        assert "Overall verdict: FAIL" in text
        assert "noise floor unavailable: test" in text
    layer = next(v for v in res.verdicts if v["check"] == "layers/int8-wo/sqnr")
    assert layer["extra"]["worst"] == worst


def test_reports_state_definitions_intervals_and_noise_floors(judged):
    out, res = judged
    md = (out / "report.md").read_text()
    for m in res.records:
        if m.definition:
            assert m.definition.replace("|", "\\|") in md
    kld = res.get("ppl", "wikitext2", "int8-wo", "kld_mean")
    assert f"{kld.ci95[0]:.4g}" in md and f"{kld.ci95[1]:.4g}" in md
    floor = res.get("ppl", "wikitext2", "fp@noise", "kld_mean")
    assert "## Noise floors" in md and f"{floor.value:.4g}"[:5] in md.split("## Noise floors", 1)[1]
    for v in res.verdicts:  # the markdown states every check the HTML does
        assert v["check"] in md


def test_html_is_self_contained_with_inlined_plots(judged):
    out, _ = judged
    html = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert html.count('src="data:image/png;base64,') == 4  # KLD, layers, tasks, speed
    assert len(list((out / "figures").glob("*.png"))) == 4


def test_junit_has_one_case_per_check(judged):
    out, res = judged
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [v["check"] for v in res.verdicts]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == [v["check"] for v in res.verdicts if v["failing"]]
    assert int(suite.get("failures")) == len(failed) and int(suite.get("skipped")) == sum(
        v["verdict"] == "SKIPPED" for v in res.verdicts)


def summary_of(lines: list[str]) -> str:
    """The output's last block: the summary line, wrapped (continuation lines indented)."""
    start = max(i for i, ln in enumerate(lines) if ln.startswith("gate "))
    assert all(ln.startswith("  ") for ln in lines[start + 1:]), lines[start:]
    return " ".join(ln.strip() for ln in lines[start:])


def test_terminal_verdict_table_colours_only_on_request(judged):
    from evalsuite.report.table import render_verdicts

    _, res = judged
    plain, coloured = render_verdicts(res.verdicts), render_verdicts(res.verdicts, color=True)
    assert "\033[" not in plain and "\033[31;1mFAIL\033[0m" in coloured
    assert summary_of(plain.splitlines()).startswith("gate FAILED")


def test_run_pipeline_judge_writes_reports_and_history(tmp_path, capsys):
    from evalsuite.app.judge_report import judge_and_report
    from evalsuite.commands.run import config_from_args
    from evalsuite.judge.history import load_series

    db = tmp_path / "h.sqlite"
    args = build_parser("run").parse_args(["run", "--out", str(tmp_path / "run"), "--history", str(db),
                                           "--baselines", str(tmp_path / "none")])
    res = make_results(seed=5)
    code = judge_and_report(res, tmp_path / "run", config_from_args(args).judge)
    out = capsys.readouterr().out
    assert code == 0 and "gate PASSED" in out and "no baseline at" in out
    assert (tmp_path / "run" / "report.html").is_file()
    (s,) = load_series(db, metric="kld_mean", variant="int8-wo")
    assert s.points[0].value == pytest.approx(res.get("ppl", "wikitext2", "int8-wo", "kld_mean").value)


def test_report_cli_rejects_unknown_format(tmp_path):
    src = save(make_results(seed=6), tmp_path / "r.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "evalsuite", "report", src, "--format", "pdf"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--format pdf" in p.stderr


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="needs the Debian package chromium")
def test_html_report_screenshot_in_headless_chromium(judged, tmp_path):
    from matplotlib import image

    out, _ = judged
    png = tmp_path / "shot.png"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_report.py"), str(out / "report.html"),
                        str(png), "--height", "2400"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    img = image.imread(png)
    assert img.shape[:2] == (2400, 1280)
    # the page is not blank: the red FAIL badge and the table text are there
    rgb = img[..., :3]
    assert rgb.std() > 0.05
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    assert red.sum() > 500


# ------------------------------------------------------------------------------ terminal width
def two_scheme_results(seed: int = 7, **kw) -> Results:
    """A synthetic run with int8-wo and a second scheme (its records copied), the wide case."""
    import dataclasses

    res = make_results(seed=seed, **kw)
    res.run["schemes"] = ["int8-wo", "int4-wo-g128"]
    res.extend([dataclasses.replace(m, variant="int4-wo-g128") for m in res.records if m.variant == "int8-wo"])
    for entry in [res.details["ppl"]["variants"], res.details["ppl"]["paired"],
                  *(t["values"] for t in res.details["tasks"].values())]:  # the details behind the records too
        entry["int4-wo-g128"] = entry["int8-wo"]
    return res


@pytest.mark.parametrize("columns", [80, 120])
def test_run_output_fits_the_terminal_and_ends_with_the_summary(tmp_path, capsys, monkeypatch, columns):
    from evalsuite.app.judge_report import judge_and_report
    from evalsuite.commands.run import config_from_args

    monkeypatch.setenv("COLUMNS", str(columns))
    args = build_parser("run").parse_args(["run", "--out", str(tmp_path / "run"), "--no-history",
                                           "--baselines", str(tmp_path / "none")])
    res = two_scheme_results(kld=0.03, broken_layer=MODULES[9], limit=20)  # a gated KLD limit fails
    code = judge_and_report(res, tmp_path / "run", config_from_args(args).judge)
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and summary_of(lines).startswith("gate FAILED")
    # every line fits, except the commands printed to be copied (never cut) and the paths (a path
    # longer than the room has a line of its own, whole)
    wide = [ln for ln in lines if len(ln) > columns and not ln.startswith(("  evalsuite ", "reports: "))
            and len(ln.split()) > 1]
    assert wide == []
    # the names of the checks that decided the run are whole: each appears on one line
    from evalsuite.report.table import decides

    assert [v for v in res.verdicts if decides(v)]
    for v in res.verdicts:
        assert not decides(v) or any(v["check"] in ln for ln in lines), v["check"]
    # the full table is one --verbose away, with every row and the intervals the fitted one drops
    capsys.readouterr()
    args.verbose = True
    judge_and_report(res, tmp_path / "run", config_from_args(args).judge)
    full = capsys.readouterr().out
    assert max(len(ln) for ln in full.splitlines()) > columns and " ± " in full
    assert all(v["check"] in full for v in res.verdicts)


def test_long_check_names_put_their_reasons_underneath_never_cut():
    from evalsuite.report.table import render_verdicts

    name = "baseline:" + "x" * 70 + "/kld_mean"
    reason = "a reason " * 30
    verdicts = [{"check": name, "verdict": "FAIL", "reason": reason, "failing": True},
                {"check": "ppl/ok", "verdict": "PASS", "reason": "fine"}]
    text = render_verdicts(verdicts, width=80)
    lines = text.splitlines()
    assert f"FAIL  {name}" in lines and all(len(ln) <= 80 for ln in lines if name not in ln)
    under = lines[1:next(i for i, ln in enumerate(lines) if i and not ln.startswith("    "))]
    assert " ".join(ln.strip() for ln in under).split() == reason.split()


def test_wrapped_reasons_keep_every_word():
    from evalsuite.report.table import render_verdicts

    reason = " ".join(f"word{i}" for i in range(60))
    text = render_verdicts([{"check": "tasks/arc_easy/int8-wo/delta_acc", "verdict": "WITHIN-NOISE",
                             "reason": reason, "gated": True}], width=80, summary=False)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert [w for ln in text.splitlines()[2:] for w in ln.split()[2 if ln.startswith("WITHIN") else 0:]] == reason.split()


def test_report_prints_the_paths_it_wrote_only(tmp_path):
    src = save(make_results(seed=8), tmp_path / "in" / "r.json")
    p = subprocess.run([sys.executable, "-m", "evalsuite", "report", src, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(tmp_path / "out" / "report.md"), str(tmp_path / "out" / "report.html")]


def test_summary_says_how_many_gated_checks_passed_and_what_was_not_judged():
    from evalsuite.report.table import summary_line

    def v(verdict, gated, failing=False):
        return {"check": "c", "verdict": verdict, "gated": gated, "failing": failing}

    verdicts = ([v("INCONCLUSIVE", False)] * 6 + [v("WORSE", False)] * 2 + [v("SKIPPED", False)] * 83
                + [v("PASS", True)] * 3)
    line = summary_line(verdicts)
    assert line == ("gate PASSED: 3 gated checks passed; 6 INCONCLUSIVE and 83 SKIPPED were not judged; "
                    "reported, not gated: 2 WORSE")
    wrapped = summary_line(verdicts, 80).splitlines()
    assert len(wrapped) > 1 and all(len(ln) <= 80 for ln in wrapped) and " ".join(
        ln.strip() for ln in wrapped) == line
    # a failing run: the failures first; a gated check that is WITHIN-NOISE is neither passed nor failed
    failed = summary_line([v("FAIL", True, True), v("PASS", True), v("WITHIN-NOISE", True), v("PASS", False)])
    assert failed == ("gate FAILED: 1 gated check failed, 1 passed, 1 WITHIN-NOISE (gated, not failing); "
                      "reported, not gated: 1 PASS")
    assert summary_line([v("SKIPPED", None)]) == "gate PASSED: no gated check was judged; 1 SKIPPED was not judged"


# ------------------------------------------------------------------------------ what a log shows
def run_and_print(tmp_path, capsys, res: Results, *extra: str) -> tuple[int, list[str]]:
    from evalsuite.app.judge_report import judge_and_report
    from evalsuite.commands.run import config_from_args

    args = build_parser("run").parse_args(["run", "--out", str(tmp_path / "run"), "--no-history",
                                           "--baselines", str(tmp_path / "none"), *extra])
    code = judge_and_report(res, tmp_path / "run", config_from_args(args).judge)
    return code, capsys.readouterr().out.splitlines()


def test_stages_not_asked_for_are_one_line_and_every_check_stays_in_the_results(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    full = two_scheme_results(seed=11)
    base = save(full, tmp_path / "base" / "results.json")  # its tasks/layers/speed metrics: SKIPPED here
    res = two_scheme_results(seed=11)
    res.records = [m for m in res.records if m.stage == "ppl"]
    res.details = {k: v for k, v in res.details.items() if k == "ppl"}
    res.run["stages"] = ["ppl"]
    code, lines = run_and_print(tmp_path, capsys, res, "--baseline", base)
    skipped = [v for v in res.verdicts if v["verdict"] == "SKIPPED" and v.get("stage") in ("tasks", "layers", "speed")]
    assert len(skipped) >= 6 and all(v["extra"]["stage_not_requested"] for v in skipped)
    assert not [ln for ln in lines if "SKIPPED" in ln and ("tasks" in ln or "layers" in ln or "speed" in ln)
                and not ln.startswith("stages not asked for")], lines
    (line,) = [ln for ln in lines if ln.startswith("stages not asked for")]
    assert line.startswith(f"stages not asked for (tasks, layers, speed): {len(skipped)} SKIPPED")
    # results.json and the reports keep every one
    saved = Results.load(tmp_path / "run" / "results.json").verdicts
    md = (tmp_path / "run" / "report.md").read_text()
    assert all(v["check"] in md for v in skipped) and len(saved) == len(res.verdicts)


def test_a_log_is_laid_out_at_120_columns_with_paths_whole(tmp_path, capsys, monkeypatch):
    from evalsuite.report.table import render_verdicts, terminal_width

    monkeypatch.delenv("COLUMNS", raising=False)
    assert terminal_width() == 120  # stdout is captured: not a terminal
    monkeypatch.setenv("COLUMNS", "24")  # a CI runner's narrow pseudo-terminal size: never below 80
    assert terminal_width() == 80
    monkeypatch.delenv("COLUMNS")
    path = "/builds/ci/runner-0123456789/reports/runs/SmolLM2-135M-20261201-010203/baselines/int8-wo.json"
    reason = f"no comparable record in {path}: " + "the baseline was measured on another card " * 4
    verdicts = [{"check": "baseline:ppl/wikitext2/int8-wo/kld_mean_rel", "verdict": "FAIL", "failing": True,
                 "gated": True, "reason": reason},
                {"check": "ppl/wikitext2/int8-wo/kld_mean", "verdict": "PASS", "gated": True, "reason": "fine " * 40}]
    lines = render_verdicts(verdicts).splitlines()
    assert all(len(ln) <= 120 for ln in lines), [ln for ln in lines if len(ln) > 120]
    assert any(path in ln for ln in lines)  # whole, on one line
    assert " ".join(" ".join(lines).split()).count(" ".join(reason.split())) == 1
    # a whole run piped to a file: 120 columns, not the 80 of a missing terminal
    code, out = run_and_print(tmp_path, capsys, two_scheme_results(kld=0.03, limit=20))
    assert max(len(ln) for ln in out if not ln.startswith(("  evalsuite ", "reports: "))) > 80
    assert all(len(ln) <= 120 or len(ln.split()) == 1 or ln.startswith(("  evalsuite ", "reports: ")) for ln in out)


def test_the_verdict_leads_with_what_decided_the_run_and_counts_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    res = two_scheme_results(kld=0.03, limit=20)
    code, lines = run_and_print(tmp_path, capsys, res)
    text = "\n".join(lines)
    assert code == 1
    for v in res.verdicts:
        if v.get("failing"):  # every failure with its reason's start
            assert v["check"] in text and v["reason"].split()[0] in text
        elif v.get("gated") is False:  # a reported check is counted, not listed
            assert v["check"] not in text
    ungated = [v for v in res.verdicts if v.get("gated") is False]
    counted = next(ln for ln in lines if ln.startswith("not gated: "))
    assert sum(int(n) for n in re.findall(r"(\d+) [A-Z]", counted)) == len(ungated)
    # a failing within-run limit names the next command
    assert f"  evalsuite fix {tmp_path / 'run' / 'results.json'}" in lines


def test_evalsuite_fix_is_named_only_for_what_it_can_fix():
    from evalsuite.app import fix
    from evalsuite.report.table import FIXABLE_STAGES, render_verdicts

    assert FIXABLE_STAGES == fix.FIXABLE_STAGES

    def check(stage, kind="limit"):
        return {"check": f"{stage}/x/int4-wo/m", "verdict": "FAIL", "failing": True, "gated": True, "kind": kind,
                "stage": stage, "variant": "int4-wo", "reason": "beyond its limit"}

    assert "evalsuite fix r.json" in render_verdicts([check("ppl")], width=120, results_path="r.json")
    assert "evalsuite fix" not in render_verdicts([check("speed")], width=120, results_path="r.json")
    assert "evalsuite fix" not in render_verdicts([check("ppl", kind="baseline")], width=120)


def test_no_progress_silences_every_progress_bar_lm_evals_included():
    import io

    from lm_eval.api import task as lm_task
    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    from evalsuite.measure.context import progress_bars_off

    def drawn() -> str:
        buf = io.StringIO()
        for bar in (lm_task.tqdm(range(50), file=buf, mininterval=0), tqdm(range(50), file=buf, disable=False),
                    auto_tqdm(range(50), file=buf, mininterval=0)):
            for _ in bar:
                pass
        return buf.getvalue()

    assert "\r" in drawn()  # the bars draw when not told otherwise
    with progress_bars_off():
        assert drawn() == ""
    assert "\r" in drawn()  # and again after the run


@pytest.mark.parametrize("columns", [80, 120])
def test_the_smoke_runs_verdict_fits_in_60_lines(columns):
    """The verdicts of a real ``evalsuite run --suite smoke --device cpu`` (stored: the run takes
    minutes on a CPU): 18 checks, whose table printed ~200 lines at 80 columns before."""
    import json

    from evalsuite.report.table import render_verdicts

    verdicts = json.loads((Path(__file__).parent / "smoke_verdicts.json").read_text())
    lines = render_verdicts(verdicts, width=columns).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    assert all(len(ln) <= columns for ln in lines)
    assert all(v["check"] in "\n".join(lines) for v in verdicts if v.get("gated"))


def test_timing_table_shows_each_stage_with_its_device_idle_fraction():
    from evalsuite.report.table import render_timing, timing_rows

    res = make_results()
    res.run["stage_seconds"] = {"load": 2.0, "ppl": 10.0, "speed": 30.0, "layers": 1.0}
    res.run["stage_idle"] = {"ppl": {"fraction": 0.25, "busy_s": 7.5, "wall_s": 10.0},
                             "speed": {"fraction": None, "reason": "not measured: it would perturb the timing"},
                             "layers": {"fraction": 0.0, "busy_s": 1.0, "wall_s": 1.0}}
    header, rows = timing_rows(res)
    assert header == ["stage", "seconds", "device idle"]
    assert rows == [["load", "2.0", "–"], ["ppl", "10.0", "25%"], ["speed", "30.0", "n/a"], ["layers", "1.0", "0%"]]
    assert "n/a: not measured: it would perturb the timing" in render_timing(res)


def test_device_busy_is_a_fraction_of_the_stage_on_cuda_and_nothing_on_a_cpu():
    import torch

    from evalsuite.measure.phase_timer import NO_IDLE_ON_CPU, DeviceBusy

    model = torch.nn.Linear(8, 8)
    with DeviceBusy([model], "cpu") as busy:
        model(torch.zeros(1, 8))
    assert busy.record() == {"fraction": None, "reason": NO_IDLE_ON_CPU}
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_device_busy_times_the_decoder_blocks_too_for_paths_that_run_them_without_the_model():
    """The tasks stage's packed forwards call the blocks, not the model: their time is the device's too."""
    from conftest import make_tiny_llama
    from evalsuite.measure.phase_timer import DeviceBusy

    model = make_tiny_llama(layers=3)
    timed = DeviceBusy([model, model], "cpu")._timed_modules()
    assert timed[0] is model and timed[1:] == list(model.model.layers)


@pytest.mark.gpu
def test_device_busy_counts_the_blocks_of_a_packed_path_and_nothing_twice_inside_a_forward():
    import torch

    from conftest import make_tiny_llama
    from evalsuite.measure.phase_timer import DeviceBusy

    model = make_tiny_llama(layers=3).cuda()
    ids = torch.randint(0, 256, (1, 16), device="cuda")
    with DeviceBusy([model], "cuda") as busy:
        model(ids)  # one span: the blocks inside it record nothing
    assert busy.record()["forwards"] == 1
    with DeviceBusy([model], "cuda") as busy, torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        cos_sin = model.model.rotary_emb(hidden, torch.arange(16, device="cuda")[None])
        for layer in model.model.layers:  # as measure.packed runs them
            hidden = layer(hidden, position_embeddings=cos_sin)
    rec = busy.record()
    assert rec["forwards"] == 3 and rec["busy_s"] > 0


@pytest.mark.gpu
def test_device_busy_counts_forwards_and_not_the_host_time_between_them():
    import time

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 4096)).cuda()
    x = torch.randn(4096, 4096, device="cuda")
    from evalsuite.measure.phase_timer import DeviceBusy

    with DeviceBusy([model, model], "cuda") as busy:
        for _ in range(20):
            model(x)
        torch.cuda.synchronize()
        time.sleep(0.5)  # host work: the device idles
    rec = busy.record()
    assert rec["forwards"] == 20  # the outermost forward only, a model listed twice counted once
    assert 0 < rec["busy_s"] < rec["wall_s"] and 0.3 < rec["fraction"] < 1.0
    assert not model._forward_hooks
