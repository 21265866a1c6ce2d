"""Stage 4 of the pipeline: judge. Gates turn results into verdicts; no model, no torch.

Two kinds of gate: within a run, each quantized variant against the fp reference measured beside
it (``within``); across runs, this run against a stored baseline (``baseline``). Every check knows
its noise: limits are judged on 95% intervals, baseline moves on the runs' own standard errors.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from evalsuite.judge.baseline import DEFAULT_DIR, Baseline, baseline_checks, find_baselines, load_baselines
from evalsuite.judge.checks import SKIPPED, Check, exit_code, finalize
from evalsuite.judge.config import GateConfig, load_gate_config
from evalsuite.judge.within import within_run_checks
from evalsuite.results import Results

DEFAULT_HISTORY = Path("reports") / "history.sqlite"


def add_gate_arguments(g: argparse._ArgumentGroup) -> None:
    """Options of ``evalsuite run`` (and ``gate``) that configure the gates."""
    g.add_argument("--gates", metavar="FILE", help="YAML file overriding the default gate limits (see reports/README.md)")
    g.add_argument("--strict", action="store_true", help="an IMPROVED check fails too")
    g.add_argument("--sigma", type=float, help="baseline tolerance in standard errors (default 3)")
    g.add_argument("--baseline", metavar="FILE",
                   help="gate against this baseline file (or a results.json) instead of the --baselines folder")
    g.add_argument("--baselines", metavar="DIR", default=None,
                   help=f"baseline folder, looked up by model, device-dtype and variant (default {DEFAULT_DIR})")
    g.add_argument("--history", metavar="PATH", default=os.environ.get("EVALSUITE_HISTORY"),
                   help=f"append the run to this SQLite history (default {DEFAULT_HISTORY} when --out is not given)")
    g.add_argument("--no-history", action="store_true", help="do not append the run to the history")
    g.add_argument("--verbose", action="store_true", help="print the full tables (default: fit the terminal's width)")


def config_from_args(args: argparse.Namespace) -> GateConfig:
    return load_gate_config(getattr(args, "gates", None), strict=getattr(args, "strict", False),
                            sigma=getattr(args, "sigma", None))


def judge(results: Results, config: GateConfig, baselines: list[Baseline] | None = None,
          results_path: str | Path | None = None, baseline_dir: Path | None = None,
          extra_checks: list[Check] | None = None) -> list[Check]:
    """All checks of one results file: within-run limits, then each baseline's metrics."""
    checks = within_run_checks(results, config)
    for b in baselines or []:
        checks += baseline_checks(results, b, config, results_path=results_path, directory=baseline_dir)
    checks += extra_checks or []
    return finalize(checks, config.strict)


def annotate(results: Results, checks: list[Check]) -> None:
    results.verdicts = [c.to_dict() for c in checks]


def smoke_skip(results: Results) -> list[Check]:
    """A smoke-suite run is a sample, never comparable with a baseline's full data: one SKIPPED check."""
    if results.run.get("suite") != "smoke":
        return []
    return [Check("baseline", "baseline", SKIPPED, "a --suite smoke run is not compared with baselines")]


def resolve_baselines(results: Results, args: argparse.Namespace,
                      results_path: str | Path | None = None) -> tuple[list[Baseline], list[Check], Path]:
    """Baselines for ``results`` from ``--baseline FILE`` or the ``--baselines DIR`` folder."""
    explicit = getattr(args, "baseline", None)
    directory = Path(getattr(args, "baselines", None) or DEFAULT_DIR)
    if smoke_skip(results):
        return [], smoke_skip(results), directory
    if explicit:
        found = load_baselines(explicit)
        variant = getattr(args, "variant", None)
        if variant:
            found = [b for b in found if b.variant in variant]
        return found, [], directory
    found, missing = find_baselines(directory, results, results_path)
    return found, missing, directory


def history_path(args: argparse.Namespace, out_dir: Path | None) -> Path | None:
    if getattr(args, "no_history", False):
        return None
    if getattr(args, "history", None):
        return Path(args.history)
    # a run in the default tree (reports/runs/...) joins the default history; an explicit --out does not
    if out_dir is not None and getattr(args, "out", None) is None:
        return DEFAULT_HISTORY
    return None


def judge_and_report(results: Results, out_dir: Path, args: argparse.Namespace) -> int:
    """Annotate ``results`` with verdicts, write the reports into ``out_dir``, print the tables,
    append the run to the history.

    Returns the run's exit code: 1 when any gate failed, else 0.
    """
    from evalsuite.report import write_reports
    from evalsuite.report.table import colour_enabled, render_table, render_verdicts, summary_line

    out_dir = Path(out_dir)
    results_path = out_dir / "results.json"
    config = config_from_args(args)
    baselines, missing, directory = resolve_baselines(results, args, results_path)
    checks = judge(results, config, baselines, results_path=results_path, baseline_dir=directory, extra_checks=missing)
    annotate(results, checks)
    written = write_reports(results, out_dir)
    verbose = bool(getattr(args, "verbose", False))
    print(render_table(results, verbose=verbose))
    print()
    print(render_verdicts(results.verdicts, color=colour_enabled(), verbose=verbose, summary=False))
    hist = history_path(args, out_dir)
    if hist is not None:
        from evalsuite.judge.history import append_run

        run_id = append_run(hist, results, source=str(results_path))
        print(f"history: run {run_id} appended to {hist}")
    print("reports: " + ", ".join(str(p) for p in written))
    print(summary_line(results.verdicts))
    return exit_code(results.verdicts)
