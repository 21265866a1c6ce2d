"""``evalsuite report RESULTS.json --format md|html|json|junit``: render a results file; prints the paths written.

Reads only the results file (no model, no torch). A file the judge has not annotated yet is judged
with the within-run gates first, so its report carries verdicts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evalsuite.errors import EvalsuiteError
from evalsuite.report import FORMATS, write_reports
from evalsuite.results import Results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", metavar="RESULTS.json")
    p.add_argument("--format", default="md,html", help=f"comma separated from {', '.join(FORMATS)}, or 'all' (default md,html)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: beside the results file)")
    p.add_argument("--gates", metavar="FILE", help="gate config for judging a results file that has no verdicts")
    p.add_argument("--rejudge", action="store_true", help="recompute the within-run verdicts even if present")


def main(args: argparse.Namespace) -> int:
    from evalsuite.judge import annotate, judge, load_gate_config
    from evalsuite.judge.checks import exit_code

    formats = FORMATS if args.format == "all" else tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise EvalsuiteError(f"--format {args.format}: choose from {', '.join(FORMATS)} or all")
    results = Results.load(args.results)
    if not results.verdicts or args.rejudge:
        annotate(results, judge(results, load_gate_config(args.gates)))
    out_dir = Path(args.out) if args.out else Path(args.results).parent
    if "json" in formats and out_dir.resolve() == Path(args.results).resolve().parent and args.out is None:
        # never overwrite the input silently; its verdicts go into a sibling file
        formats = tuple(f for f in formats if f != "json")
        results.save(out_dir / "results.judged.json")
        print(out_dir / "results.judged.json")
    for path in write_reports(results, out_dir, formats):
        print(path)
    return exit_code(results.verdicts)
