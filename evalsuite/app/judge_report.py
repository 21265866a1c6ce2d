"""The run's last two stages: judge the results (verdicts), then report them (files, tables, history).

The judge and the reporters do not know each other; this is where one's output becomes the other's input.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from evalsuite.app.config import JudgeConfig
from evalsuite.judge import DEFAULT_HISTORY, annotate, judge, resolve_baselines
from evalsuite.judge.checks import Check, exit_code
from evalsuite.judge.config import GateConfig, load_gate_config
from evalsuite.results import Results


def gate_config(j: JudgeConfig) -> GateConfig:
    """The gate limits of ``j``: the default ones, ``--gates FILE`` over them, then the flags."""
    return load_gate_config(j.gates, strict=j.strict, sigma=j.sigma, alpha=j.alpha, gate_cpu_speed=j.gate_cpu_speed)


def history_path(j: JudgeConfig, out_dir: Path | None, explicit_out: bool = True) -> Path | None:
    if j.no_history:
        return None
    if j.history:
        return Path(j.history)
    # a run in the default tree (reports/runs/...) joins the default history; an explicit --out does not
    if out_dir is not None and not explicit_out:
        return DEFAULT_HISTORY
    return None


def judge_and_report(results: Results, out_dir: Path, j: JudgeConfig, remeasure=None, explicit_out: bool = True) -> int:
    """Annotate ``results`` with verdicts, write the reports into ``out_dir``, print the tables,
    append the run to the history. ``remeasure(stages, variants) -> (Results, plan)`` (``--confirm``):
    a failing run's failing stages are measured again and only reproduced failures fail it
    (``evalsuite.app.confirm``).

    Returns the run's exit code: 5 INVALID, else 1 when any gate failed, else 4 when the run is INCOMPLETE, else 0.
    """
    from evalsuite.report import write_reports
    from evalsuite.report.table import (colour_enabled, render_table, render_timing, render_verdicts, summary_line,
                                        terminal_width)

    out_dir = Path(out_dir)
    results_path = out_dir / "results.json"
    config = gate_config(j)
    baselines, missing, directory = resolve_baselines(results, j.baseline, j.baselines,
                                                      list(j.variants) if j.variants else None, results_path)

    def judge_this(res: Results) -> list[Check]:
        return judge(res, config, baselines, results_path=results_path, baseline_dir=directory,
                     extra_checks=copy.deepcopy(missing), baseline_requested=bool(j.baseline))

    checks = judge_this(results)
    fault = None  # a re-measurement that crashed: reported after the reports are written
    if remeasure is not None and any(c.failing for c in checks):
        from evalsuite.app.confirm import confirm

        checks, fault = confirm(results, checks, remeasure, judge_this)
    annotate(results, checks)
    written = write_reports(results, out_dir)
    verbose = j.verbose
    print(render_table(results, verbose=verbose))
    print()
    print(render_verdicts(results.verdicts, color=colour_enabled(), verbose=verbose, summary=False,
                          results_path=str(results_path)))
    hist = history_path(j, out_dir, explicit_out)
    if hist is not None:
        from evalsuite.judge.history import append_run

        run_id = append_run(hist, results, source=str(results_path))
        print(f"history: run {run_id} appended to {hist}")
    print(render_timing(results), file=sys.stderr)  # where the time went: diagnostics, beside the progress
    print("reports: " + ", ".join(str(p) for p in written))
    print(summary_line(results.verdicts, None if verbose else terminal_width()))
    if fault is not None:  # as a crash in the run's own stages: the first judgement is written, then it surfaces
        raise fault
    return exit_code(results.verdicts)
