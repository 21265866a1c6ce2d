"""``evalsuite history``: a metric's trend per model × scheme, drift flagged against the rolling median.

``evalsuite history --metric kld_mean --variant int8-wo [--plot trend.png]`` prints each matching
series; without ``--metric`` it lists the runs and the latest run's drifted metrics.
``--add RESULTS.json`` appends results files first. Exit 1 when the latest run of a shown series
drifted in its bad direction.
"""

from __future__ import annotations

import argparse
import shlex
from contextlib import closing
from pathlib import Path

from tabulate import tabulate

from evalsuite.judge import DEFAULT_HISTORY
from evalsuite.judge.checks import fmt
from evalsuite.judge.history import Series, append_run, connect, flag_drift, load_series
from evalsuite.results import Results, write_bytes_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    from evalsuite.commands.cli import hidden_alias

    p.add_argument("--history", metavar="PATH", dest="db", default=str(DEFAULT_HISTORY),
                   help=f"history database (default {DEFAULT_HISTORY}; the option 'evalsuite run' appends with)")
    hidden_alias(p, "--db", "db")
    p.add_argument("--add", nargs="+", metavar="RESULTS", help="append these results files first")
    p.add_argument("--metric", help="metric name, e.g. kld_mean, token_ppl, delta_acc, tokens_per_s")
    p.add_argument("--variant", help="variant (scheme), e.g. int8-wo or fp")
    p.add_argument("--task", help="task, e.g. wikitext2, arc_easy, decode_bs1")
    p.add_argument("--stage", help="stage: ppl, tasks, layers, speed")
    p.add_argument("--model", help="model name")
    p.add_argument("--window", type=int, default=5, help="rolling median over this many previous runs (default 5)")
    p.add_argument("--sigma", type=float, default=3.0, help="drift threshold in robust standard deviations (default 3)")
    p.add_argument("--last", type=int, default=20, help="show the last N runs of each series (default 20)")
    p.add_argument("--include-partial", action="store_true", help="include --limit runs")
    p.add_argument("--plot", metavar="PNG", help="write a trend plot of the shown series")


def list_runs(db: str, last: int) -> None:
    with closing(connect(db, create=False)) as conn:
        rows = conn.execute("""SELECT r.run_id, r.started, r.model_name, r.device || '-' || r.dtype,
                                      substr(coalesce(r.git_revision, ''), 1, 10), r.partial, r.failing,
                                      (SELECT count(*) FROM metrics m WHERE m.run_id = r.run_id)
                               FROM runs r ORDER BY r.started DESC LIMIT ?""", (last,)).fetchall()
    print(tabulate(rows, headers=["run", "started", "model", "device", "git", "partial", "failing", "metrics"])
          if rows else "(no runs recorded)")


def print_series(s: Series, last: int) -> None:
    print(f"\n{s.label} ({s.unit}, {'higher' if s.higher_is_better else 'lower' if s.higher_is_better is False else 'no'} is better)")
    rows = [[p.run_id, p.started, (p.git_revision or "")[:10], fmt(p.value), fmt(p.stderr) if p.stderr else "",
             fmt(p.median), f"±{fmt(p.tolerance)}" if p.tolerance is not None else "", p.flag]
            for p in s.points[-last:]]
    print(tabulate(rows, headers=["run", "started", "git", "value", "stderr", "rolling median", "tolerance", "drift"]))


def plot_series(series: list[Series], path: Path, last: int) -> None:
    from evalsuite.report.plots import trend_figure

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, trend_figure(series, last))
    print(f"plot: {path}")


def partial_hint(args: argparse.Namespace) -> str:
    """Where partial (--limit) runs would match: say they are hidden, and the command that shows them."""
    if args.include_partial:
        return ""
    hidden = load_series(args.db, args.metric, args.variant, args.task, args.stage, args.model, include_partial=True)
    if not hidden:
        return ""
    parts = ["evalsuite", "history", "--history", str(args.db)]
    for opt in ("metric", "variant", "task", "stage", "model"):
        if getattr(args, opt) is not None:
            parts += [f"--{opt}", str(getattr(args, opt))]
    runs = {p.run_id for s in hidden for p in s.points}
    return (f"; {len(runs)} partial run(s) match, hidden by default; to show them:\n  "
            + shlex.join([*parts, "--include-partial"]))


def main(args: argparse.Namespace) -> int:
    for f in args.add or []:
        results = Results.load(f)
        print(f"history: run {append_run(args.db, results, source=f)} appended from {f}")
    series = [flag_drift(s, window=args.window, sigma=args.sigma)
              for s in load_series(args.db, args.metric, args.variant, args.task, args.stage, args.model,
                                   include_partial=args.include_partial)]
    if args.metric is None:
        list_runs(args.db, args.last)
        drifted = [s for s in series if s.points and s.points[-1].flag]
        if drifted:
            print("\nlatest run drifted from the rolling median:")
            for s in drifted:
                p = s.points[-1]
                print(f"  {p.flag:<13} {s.label}: {fmt(p.value)} vs median {fmt(p.median)} (±{fmt(p.tolerance)})")
    else:
        for s in series:
            print_series(s, args.last)
        if not series:
            print("(no matching series)" + partial_hint(args))
    if args.plot and series:
        plot_series(series if args.metric else [s for s in series if s.points and s.points[-1].flag] or series[:1],
                    Path(args.plot), args.last)
    return 1 if any(s.bad_drift for s in series) else 0
