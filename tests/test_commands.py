"""Daily use of the commands: one spelling per concept (old ones still accepted), defaults that
match their help, printed suggestions that work as printed, protocol-mismatch warnings."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import pytest

from evalsuite.commands.cli import build_parser, main
from evalsuite.results import Results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_judge import make_results, save  # noqa: E402


def with_ppl_protocol(res: Results, context: int) -> Results:
    """Stamp the ppl records with the window rule the ppl stage writes into every record."""
    rule = f"data/wikitext-2/test.txt: disjoint {context}-token windows scoring positions 1..{context - 1}, BOS first, " \
           "40 windows, 10,000 scored of 10,000 tokens (0 after the last window unscored)"
    res.records = [dataclasses.replace(m, extra={**(m.extra or {}), "protocol": rule}) if m.stage == "ppl" else m
                   for m in res.records]
    return res


def printed_commands(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("evalsuite ")]


def run_printed(command: str, monkeypatch, tmp_path) -> int:
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)
    assert argv[0] == "evalsuite"
    return main(argv[1:])


# ------------------------------------------------------------------------------ printed suggestions
@pytest.mark.parametrize("limit", [None, 4])
def test_missing_baseline_command_works_as_printed(tmp_path, capsys, monkeypatch, limit):
    from evalsuite.app.judge_report import judge_and_report
    from evalsuite.commands.run import config_from_args

    res = make_results(seed=11, limit=limit)
    run_dir = tmp_path / "run"
    res.save(run_dir / "results.json")
    args = build_parser("run").parse_args(["run", "--out", str(run_dir), "--no-history",
                                           "--baselines", str(tmp_path / "bl")])
    judge_and_report(res, run_dir, config_from_args(args).judge)
    commands = printed_commands(capsys.readouterr().out)
    assert len(commands) == 2 and all("--allow-partial" in c for c in commands) == (limit is not None)
    for c in commands:
        assert run_printed(c, monkeypatch, tmp_path) == 0, c
    # the baselines it made are found by the next run's judge: no "missing" left
    judge_and_report(res, run_dir, config_from_args(args).judge)
    out = capsys.readouterr().out
    assert "to create the missing baselines" not in out and "no baseline at" not in out


def test_accept_command_of_a_failing_gate_works_as_printed(tmp_path, capsys, monkeypatch):
    base = save(make_results(seed=12), tmp_path / "a" / "results.json")
    assert main(["baseline", "update", base, "--baselines", str(tmp_path / "bl")]) == 0
    worse = save(make_results(seed=13, kld=5e-3), tmp_path / "b" / "results.json")
    capsys.readouterr()
    assert main(["gate", worse, "--baselines", str(tmp_path / "bl"), "--no-history"]) == 1
    commands = printed_commands(capsys.readouterr().out)
    assert commands
    for c in commands:
        assert run_printed(c, monkeypatch, tmp_path) == 0, c
    capsys.readouterr()
    main(["gate", worse, "--baselines", str(tmp_path / "bl"), "--no-history"])
    out = capsys.readouterr().out  # the accepted values are the baseline now: no baseline check fails
    assert not [ln for ln in out.splitlines() if ln.startswith("FAIL") and "baseline:" in ln]
    assert "to accept the new values" not in out


def test_history_hints_at_hidden_partial_runs_with_a_command_that_shows_them(tmp_path, capsys, monkeypatch):
    db = tmp_path / "h.sqlite"
    assert main(["history", "--history", str(db), "--add", save(make_results(seed=14, limit=4), tmp_path / "r.json"),
                 "--metric", "kld_mean"]) == 0
    out = capsys.readouterr().out
    assert "(no matching series); 1 partial run(s) match, hidden by default" in out
    (command,) = printed_commands(out)
    assert run_printed(command, monkeypatch, tmp_path) == 0
    shown = capsys.readouterr().out
    assert "kld_mean" in shown and "no matching series" not in shown


def test_data_check_suggestion_works_as_printed(tmp_path, capsys, monkeypatch):
    import shutil

    from evalsuite.data import SMOKE_DIR, mirror
    from test_data import fake_hub

    d = tmp_path / "m"
    shutil.copytree(SMOKE_DIR, d)
    (d / "downstream" / "copa.jsonl").unlink()
    assert main(["data", "check", str(d)]) == 1
    (command,) = [c.split("re-fetch: ", 1)[1] for c in capsys.readouterr().out.splitlines() if "re-fetch: " in c]
    monkeypatch.setattr(mirror, "hub_loader", fake_hub([]))  # no Hub here: a fake one serves the rows
    monkeypatch.setattr(mirror.fetch, "__defaults__", (fake_hub([]), None, print))
    assert run_printed(command, monkeypatch, tmp_path) == 0
    assert main(["data", "check", str(d)]) == 0


# ------------------------------------------------------------------------------ spellings and defaults
def test_one_spelling_per_concept_old_ones_hidden_but_accepted(tmp_path, capsys):
    gate_help = build_parser("gate").parse_known_args  # noqa: F841  (parsers are built per command)
    for command, old in (("gate", "--candidate"), ("gate", "--formats"), ("baseline", "--dir"), ("history", "--db")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert old not in capsys.readouterr().out, (command, old)
    with pytest.raises(SystemExit):
        main(["baseline", "--help"])
    assert "save" not in capsys.readouterr().out
    r = save(make_results(seed=15), tmp_path / "r.json")
    # old and new spellings do the same thing
    assert main(["baseline", "save", r, "--dir", str(tmp_path / "old"), "--variant", "fp"]) == 0
    assert main(["baseline", "update", r, "--baselines", str(tmp_path / "new"), "--variant", "fp"]) == 0
    assert sorted(p.relative_to(tmp_path / "old") for p in (tmp_path / "old").rglob("*.json")) == \
        sorted(p.relative_to(tmp_path / "new") for p in (tmp_path / "new").rglob("*.json"))
    assert main(["gate", "--candidate", r, "--baselines", str(tmp_path / "new"), "--no-history"]) == \
        main(["gate", r, "--baselines", str(tmp_path / "new"), "--no-history"]) == 0


def test_list_options_take_comma_lists_and_repeats_alike():
    p = build_parser("compare")
    a = p.parse_args(["compare", "a", "b", "--variant", "fp,int8-wo", "--stage", "ppl", "--stage", "tasks"])
    assert a.variant == ["fp", "int8-wo"] and a.stage == ["ppl", "tasks"]
    b = build_parser("baseline").parse_args(["baseline", "update", "r", "--variant", "fp", "--variant", "int8-wo"])
    assert b.variant == ["fp", "int8-wo"]


def test_gate_default_baselines_match_its_help(tmp_path, monkeypatch, capsys):
    """'gate RESULTS' alone reads reports/baselines, as --help says."""
    from evalsuite.judge.baseline import DEFAULT_DIR

    with pytest.raises(SystemExit):
        main(["gate", "--help"])
    assert f"(default {DEFAULT_DIR})" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)
    r = save(make_results(seed=16), tmp_path / "r.json")
    assert main(["baseline", "update", r]) == 0
    assert (tmp_path / DEFAULT_DIR).is_dir()
    capsys.readouterr()
    assert main(["gate", r, "--no-history"]) == 0
    assert "no baseline at" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ protocol warnings
def test_compare_warns_in_one_line_when_protocols_differ(tmp_path, capsys):
    a = save(with_ppl_protocol(make_results(seed=17), 2048), tmp_path / "a.json")
    b = save(with_ppl_protocol(make_results(seed=18, limit=40), 256), tmp_path / "b.json")
    main(["compare", a, b])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: A and B were measured differently")
    assert "2048-token windows" in err[0] and "256-token windows" in err[0] and "limit: none vs 40" in err[0]


def test_compare_and_gate_are_silent_when_protocols_agree(tmp_path, capsys):
    a = save(with_ppl_protocol(make_results(seed=19), 2048), tmp_path / "a.json")
    b = save(with_ppl_protocol(make_results(seed=20), 2048), tmp_path / "b.json")
    main(["compare", a, b])
    main(["gate", b, "--baseline", a, "--no-history"])
    assert capsys.readouterr().err == ""


def test_gate_warns_when_the_baseline_was_measured_differently(tmp_path, capsys):
    a = save(with_ppl_protocol(make_results(seed=21), 2048), tmp_path / "a.json")
    assert main(["baseline", "update", a, "--baselines", str(tmp_path / "bl")]) == 0
    b = save(with_ppl_protocol(make_results(seed=22), 256), tmp_path / "b.json")
    capsys.readouterr()
    main(["gate", b, "--baselines", str(tmp_path / "bl"), "--no-history"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the baseline and the candidate were measured differently" in err[0]
    assert "ppl: disjoint 2048-token windows scoring positions 1..2047, BOS first vs disjoint 256-token" in err[0]


def test_gate_history_help_says_what_gate_does(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["gate", "--help"])
    assert "SQLite history (default: none)" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)
    main(["gate", save(make_results(seed=23), tmp_path / "r.json"), "--baselines", str(tmp_path / "bl")])
    assert not list(tmp_path.rglob("*.sqlite"))


@pytest.mark.parametrize("columns", [80, 120])
def test_compare_table_fits_the_terminal(tmp_path, capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    a = save(make_results(seed=24), tmp_path / "a.json")
    b = save(make_results(seed=25, kld=5e-3), tmp_path / "b.json")
    assert main(["compare", a, b]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert max(len(ln) for ln in lines[2:]) <= columns
    assert any("ppl/wikitext2/int8-wo/kld_mean" in ln for ln in lines)  # metric names whole
