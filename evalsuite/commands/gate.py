"""``evalsuite gate RESULTS [--baseline FILE | --baselines DIR]``: judge a results file against a baseline
(by default the stored ones in reports/baselines).

Checks the file as evidence first (``evidence``: INVALID, exit 5, when it contradicts itself or
its details), then runs the within-run limits and the baseline comparison, prints the verdict table, optionally writes
the reports (``--out``) and a JUnit file (``--junit``). Exit 1 when any check fails, 2 when the
candidate is INCOMPLETE (interrupted, a stage or task without records, nothing comparable).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evalsuite.errors import EvalsuiteError
from evalsuite.app.config import JudgeConfig
from evalsuite.app.judge_report import gate_config, history_path
from evalsuite.judge import DEFAULT_HISTORY, annotate, judge, resolve_baselines
from evalsuite.judge.baseline import DEFAULT_DIR
from evalsuite.judge.checks import exit_code
from evalsuite.results import Results


def judge_config(args: argparse.Namespace) -> JudgeConfig:
    """The judge options of ``evalsuite gate``, ``compare`` (those it has) as a JudgeConfig."""
    a = vars(args)
    variants = a.get("variant")
    return JudgeConfig(gates=a.get("gates"), strict=bool(a.get("strict")), sigma=a.get("sigma"), alpha=a.get("alpha"),
                       gate_cpu_speed=bool(a.get("gate_cpu_speed")), baseline=a.get("baseline"),
                       baselines=a.get("baselines"), variants=tuple(variants) if variants else None,
                       history=a.get("history"), no_history=bool(a.get("no_history")), verbose=bool(a.get("verbose")))


def add_gate_arguments(g: argparse._ArgumentGroup) -> None:
    """Options of ``evalsuite run`` (and ``gate``) that configure the gates."""
    g.add_argument("--gates", metavar="FILE", help="YAML file overriding the default gate limits (see reports/README.md)")
    g.add_argument("--strict", action="store_true", help="an IMPROVED check fails too")
    g.add_argument("--sigma", type=float, help="tolerance of reported baseline metrics in standard errors (default 3)")
    g.add_argument("--alpha", type=float,
                   help="family-wise false-alarm budget of the gated checks per run, Holm (default 0.01)")
    g.add_argument("--gate-cpu-speed", action="store_true",
                   help="gate speed baselines on a CPU too (default: CPU timings are informational)")
    g.add_argument("--baseline", metavar="FILE",
                   help="gate against this baseline file (or a results.json) instead of the --baselines folder")
    g.add_argument("--baselines", metavar="DIR", default=None,
                   help=f"baseline folder, looked up by model, device-dtype and variant (default {DEFAULT_DIR})")
    g.add_argument("--history", metavar="PATH", default=os.environ.get("EVALSUITE_HISTORY"),
                   help=f"append the run to this SQLite history (default {DEFAULT_HISTORY} when --out is not given)")
    g.add_argument("--no-history", action="store_true", help="do not append the run to the history")
    g.add_argument("--verbose", action="store_true", help="print the full tables (default: fit the terminal's width)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from evalsuite.commands.cli import CommaList, hidden_alias

    p.add_argument("candidate", nargs="?", metavar="RESULTS", help="results.json of the run to judge")
    hidden_alias(p, "--candidate", "candidate_option")  # the positional, when given, is consumed last
    p.add_argument("--variant", action=CommaList, help="only these baseline variants (comma list or repeated)")
    p.add_argument("--out", metavar="DIR", help="write results.json (with verdicts), report.md/html and junit.xml here")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a results.json already there (a run's verdicts)")
    p.add_argument("--format", default="json,md,html,junit", help="what --out gets (default json,md,html,junit)")
    hidden_alias(p, "--formats", "format")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML file with one test case per check")
    add_gate_arguments(p.add_argument_group("gates"))
    for action in p._actions:  # gate, unlike run, appends to a history only when asked
        if action.dest == "history":
            action.help = "append the judged run to this SQLite history (default: none)"


def main(args: argparse.Namespace) -> int:
    from evalsuite.report.junit import write_junit
    from evalsuite.report.table import colour_enabled, render_verdicts, summary_line, terminal_width

    args.candidate = args.candidate or getattr(args, "candidate_option", None)
    if not args.candidate:
        raise EvalsuiteError("gate needs the results file to judge: evalsuite gate RESULTS")
    if args.out and (Path(args.out) / "results.json").exists() and not args.force:
        raise EvalsuiteError(f"--out {args.out} holds a results.json (a run's verdicts); pass --force to replace it, "
                             f"or another --out")
    candidate = Results.load(args.candidate)
    baselines, missing, directory = resolve_baselines(candidate, args.baseline, args.baselines, args.variant, args.candidate)
    if args.baseline and not baselines:
        raise EvalsuiteError(f"{args.baseline}: no baseline for variant(s) {', '.join(args.variant or [])}")
    from evalsuite.judge.protocol import baseline_protocol, mismatch_warning, results_protocol

    warnings = dict.fromkeys(mismatch_warning(baseline_protocol(b), results_protocol(candidate),
                                              "the baseline and the candidate") for b in baselines)
    for w in filter(None, warnings):
        print(w, file=sys.stderr)
    checks = judge(candidate, gate_config(judge_config(args)), baselines, results_path=args.candidate,
                   baseline_dir=directory, extra_checks=missing, baseline_requested=True)
    annotate(candidate, checks)
    print(render_verdicts(candidate.verdicts, color=colour_enabled(), verbose=args.verbose, summary=False))
    if args.out:
        from evalsuite.report import FORMATS, write_reports

        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        if not formats or any(f not in FORMATS for f in formats):
            raise EvalsuiteError(f"--format {args.format}: choose from {', '.join(FORMATS)}")
        written = write_reports(candidate, Path(args.out), formats)
        print("reports: " + ", ".join(str(p) for p in written))
    if args.junit:
        write_junit(candidate, Path(args.junit))
    hist = history_path(judge_config(args), None)
    if hist is not None:
        from evalsuite.judge.history import append_run

        print(f"history: run {append_run(hist, candidate, source=args.candidate)} appended to {hist}")
    print(summary_line(candidate.verdicts, None if args.verbose else terminal_width()))
    return exit_code(candidate.verdicts)
