"""``evalsuite compare A.json B.json``: every shared metric of two results files, side by side.

A is the reference (the baseline), B the candidate. Each metric with a direction gets a verdict with
the same tolerances as ``gate``; metrics the gate excludes are shown too (``--all`` also shows
descriptive ones). Exit 1 when a metric got worse beyond its tolerance; 5 when either file fails as
evidence (``evidence``: it contradicts itself or its details); 2 when nothing was compared (no shared
metric) or a --stage / --variant names what neither file holds.
"""

from __future__ import annotations

import argparse
import sys

from evalsuite.app.judge_report import gate_config
from evalsuite.commands.gate import judge_config
from evalsuite.judge.baseline import check_identity, compare_metric, from_results, metric_key, variant_group
from evalsuite.errors import EvalsuiteError
from evalsuite.judge.checks import EXIT_INCOMPLETE, EXIT_INVALID, FAIL, IMPROVED, INVALID, VERDICTS, fmt
from evalsuite.judge.evidence import evidence_checks
from evalsuite.report.table import colour, colour_enabled, fit_table, terminal_width, visible_width
from evalsuite.results import Results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A.json", help="reference results file")
    p.add_argument("b", metavar="B.json", help="candidate results file")
    from evalsuite.commands.cli import CommaList

    p.add_argument("--variant", action=CommaList, help="only these variants (comma list or repeated)")
    p.add_argument("--stage", action=CommaList, help="only these stages (comma list or repeated)")
    p.add_argument("--all", action="store_true", help="also per-layer and descriptive metrics")
    p.add_argument("--any-model", action="store_true", help="allow comparing two different models")
    p.add_argument("--gates", metavar="FILE", help="gate config YAML (tolerances)")
    p.add_argument("--sigma", type=float, help="tolerance in standard errors (default 3)")
    p.add_argument("--strict", action="store_true", help="IMPROVED fails too")
    p.add_argument("--verbose", action="store_true", help="the full table (default: fit the terminal's width)")


def main(args: argparse.Namespace) -> int:
    from evalsuite.judge.protocol import mismatch_warning, results_protocol

    a, b = Results.load(args.a), Results.load(args.b)
    config = gate_config(judge_config(args))
    for name, wanted, held in (("--stage", args.stage, "stage"), ("--variant", args.variant, "variant")):
        have = {getattr(m, held) for m in (*a.records, *b.records)}
        unknown = [x for x in wanted or [] if x not in have]
        if unknown:
            raise EvalsuiteError(f"{name} {','.join(unknown)}: neither results file holds it (they hold "
                                 f"{', '.join(sorted(have)) or 'no records'})")
    bad = [(path, c) for path, res in ((args.a, a), (args.b, b)) for c in evidence_checks(res) if c.verdict == INVALID]
    if bad:
        for path, c in bad:
            print(f"INVALID  {path}: {c.reason}")
        print(f"compare INVALID: {len(bad)} contradiction check(s); nothing compared")
        return EXIT_INVALID
    warning = mismatch_warning(results_protocol(a), results_protocol(b), "A and B")
    if warning:
        print(warning, file=sys.stderr)
    if not args.any_model and a.records:
        check_identity(from_results(a, variant_group(a.records[0].variant), args.a), b, args.a)
    rows, failing = [], False
    for m in a.records:
        key = metric_key(m)
        if args.variant and m.variant not in args.variant or args.stage and m.stage not in args.stage:
            continue
        c = b.get(*m.key)
        gated = m.higher_is_better is not None and not config.excluded(key)
        if not args.all and not gated and m.higher_is_better is None:
            continue
        if not args.all and m.stage == "layers" and m.task != "all":
            continue
        if c is None or m.value is None or c.value is None:
            rows.append([key, fmt(m.value), fmt(c.value if c else None), "", "", "SKIPPED", "missing on one side"])
            continue
        diff = c.value - m.value
        rel = f"{diff / m.value:+.2%}" if m.value else ""
        if m.higher_is_better is None:
            rows.append([key, fmt(m.value), fmt(c.value), f"{diff:+.4g}", rel, "", "descriptive"])
            continue
        verdict, reason, tol = compare_metric(m, c, config)
        if not gated:
            reason = "(not gated) " + reason
        elif verdict == FAIL or (config.strict and verdict == IMPROVED):
            failing = True
        rows.append([key, fmt(m.value), fmt(c.value), f"{diff:+.4g}", rel, verdict, f"±{fmt(tol)}"])
    use_colour = colour_enabled()
    rows.sort(key=lambda r: VERDICTS.index(r[5]) if r[5] in VERDICTS else len(VERDICTS))
    for r in rows:
        r[5] = colour(r[5], use_colour)
    print(f"A = {args.a}\nB = {args.b}")
    width = None if args.verbose else terminal_width()
    text = fit_table(rows, ["metric", "A", "B", "Δ", "Δ%", "verdict", "tolerance / note"], width, wrap=(6,),
                     min_wrap=10) if rows else "(no shared metrics)"
    if width is not None and visible_width(text) > width:  # long metric names: each its own line, values under it
        text = "\n".join(f"{r[0]}\n    {r[1]} → {r[2]}  {r[3]} {r[4]}  {r[5]}  {r[6]}".rstrip() for r in rows)
    print(text)
    if not rows:
        return EXIT_INCOMPLETE  # nothing compared is no verdict
    return 1 if failing else 0
