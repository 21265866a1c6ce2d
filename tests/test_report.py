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
    assert res.verdicts and {v["verdict"] for v in res.verdicts} >= {"FAIL", "PASS", "SKIPPED"}
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
    from evalsuite.judge.history import load_series

    db = tmp_path / "h.sqlite"
    args = build_parser("run").parse_args(["run", "--out", str(tmp_path / "run"), "--history", str(db),
                                           "--baselines", str(tmp_path / "none")])
    res = make_results(seed=5)
    code = judge_and_report(res, tmp_path / "run", args)
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
    return res


@pytest.mark.parametrize("columns", [80, 120])
def test_run_output_fits_the_terminal_and_ends_with_the_summary(tmp_path, capsys, monkeypatch, columns):
    from evalsuite.app.judge_report import judge_and_report

    monkeypatch.setenv("COLUMNS", str(columns))
    args = build_parser("run").parse_args(["run", "--out", str(tmp_path / "run"), "--no-history",
                                           "--baselines", str(tmp_path / "none")])
    res = two_scheme_results(kld=0.03, broken_layer=MODULES[9], limit=20)  # a gated KLD limit fails
    code = judge_and_report(res, tmp_path / "run", args)
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and summary_of(lines).startswith("gate FAILED")
    # every line fits, except the commands printed to be copied (never cut) and the paths
    wide = [ln for ln in lines if len(ln) > columns and not ln.startswith(("  evalsuite ", "reports: "))]
    assert wide == []
    # check names are whole: each appears on one line
    for v in res.verdicts:
        assert any(v["check"] in ln for ln in lines), v["check"]
    # the full table is one --verbose away, with the intervals the fitted one drops
    capsys.readouterr()
    args.verbose = True
    judge_and_report(res, tmp_path / "run", args)
    full = capsys.readouterr().out
    assert max(len(ln) for ln in full.splitlines()) > columns and " ± " in full


def test_long_check_names_put_their_reasons_underneath_never_cut():
    from evalsuite.report.table import render_verdicts

    name = "baseline:" + "x" * 70 + "/kld_mean"
    reason = "a reason " * 30
    verdicts = [{"check": name, "verdict": "FAIL", "reason": reason, "failing": True},
                {"check": "ppl/ok", "verdict": "PASS", "reason": "fine"}]
    text = render_verdicts(verdicts, width=80)
    lines = text.splitlines()
    assert f"FAIL  {name}" in lines and all(len(ln) <= 80 for ln in lines if name not in ln)
    assert " ".join(ln.strip() for ln in lines[1:-3]).split() == reason.split()


def test_wrapped_reasons_keep_every_word():
    from evalsuite.report.table import render_verdicts

    reason = " ".join(f"word{i}" for i in range(60))
    text = render_verdicts([{"check": "tasks/arc_easy/int8-wo/delta_acc", "verdict": "WITHIN-NOISE",
                             "reason": reason}], width=80, summary=False)
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
