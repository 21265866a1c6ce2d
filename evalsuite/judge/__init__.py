"""Stage 4 of the pipeline: judge. Gates turn results into verdicts; no model, no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from evalsuite.results import Results


def add_gate_arguments(g: argparse._ArgumentGroup) -> None:
    """Options of ``evalsuite run`` that configure the gates."""


def judge_and_report(results: Results, out_dir: Path, args: argparse.Namespace) -> int:
    """Annotate ``results`` with verdicts, write the reports into ``out_dir``, print the table.

    Returns the run's exit code: 1 when any gate failed, else 0.
    """
    from evalsuite.report.table import render_table

    results.save(out_dir / "results.json")
    print(render_table(results))
    print(f"results: {out_dir / 'results.json'}")
    return 1 if any(v.get("verdict") == "FAIL" for v in results.verdicts) else 0
