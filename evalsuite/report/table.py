"""The terminal tables: metrics (one row per metric, one column per variant) and verdicts."""

from __future__ import annotations

import os
import sys
from typing import Any

from tabulate import tabulate

from evalsuite.judge.checks import VERDICTS
from evalsuite.results import Metric, Results

COLOURS = {"PASS": "32", "FAIL": "31;1", "IMPROVED": "35;1", "WITHIN-NOISE": "33", "SKIPPED": "90"}
VERDICT_ORDER = VERDICTS  # worst first


def colour_enabled() -> bool:
    """Colour verdicts on a terminal, unless $NO_COLOR is set (no-color.org)."""
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def colour(verdict: str, enabled: bool) -> str:
    code = COLOURS.get(verdict)
    return f"\033[{code}m{verdict}\033[0m" if enabled and code else verdict


def format_value(m: Metric) -> str:
    if m.value is None:
        return "-"
    v = m.value
    text = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if m.stderr is not None:
        text += f" ± {m.stderr:.2g}"
    elif m.ci95 is not None:
        text += f" [{m.ci95[0]:.4g}, {m.ci95[1]:.4g}]"
    return text


def metric_rows(results: Results, per_layer: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the metric table; per-module layer records only when ``per_layer``."""
    variants = results.variants
    rows: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for m in results.records:
        if not per_layer and ((m.stage == "layers" and m.task != "all") or (m.stage == "fix" and m.task != "suggestion")):
            continue
        row = rows.setdefault((m.stage, m.task, m.metric, m.unit), {})
        row[m.variant] = format_value(m)
    table = [[stage, task, metric, unit, *(row.get(v, "") for v in variants)]
             for (stage, task, metric, unit), row in rows.items()]
    return ["stage", "task", "metric", "unit", *variants], table


def partial_banner(results: Results) -> str | None:
    if not results.partial:
        return None
    limit = results.run.get("limit")
    what = (f"--limit {limit} evaluated at most that many windows/items per task" if limit is not None
            else "a stage evaluated only part of its data (e.g. --ppl-windows)")
    return f"PARTIAL RUN: {what}; intervals are wide and numbers are not comparable with a full run"


def render_table(results: Results, tablefmt: str = "simple") -> str:
    header, table = metric_rows(results)
    banner = partial_banner(results)
    title = f"{banner}\n" if banner else ""
    return title + (tabulate(table, headers=header, tablefmt=tablefmt) if table else "(no metrics recorded)")


def sorted_verdicts(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(verdicts, key=lambda v: VERDICT_ORDER.index(v["verdict"]) if v.get("verdict") in VERDICT_ORDER else 9)


def summary_line(verdicts: list[dict[str, Any]]) -> str:
    counts = {k: sum(1 for v in verdicts if v.get("verdict") == k) for k in VERDICT_ORDER}
    failing = sum(1 for v in verdicts if v.get("failing"))
    overall = "FAILED" if failing else "PASSED"
    return f"gate {overall}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + (f" ({failing} failing)" if failing else "")


def render_verdicts(verdicts: list[dict[str, Any]], color: bool = False, tablefmt: str = "simple") -> str:
    """One row per check, worst first, then the update commands of failing/improved checks."""
    if not verdicts:
        return "(no checks)"
    rows = [[colour(v["verdict"], color), v["check"], v.get("reason", "")] for v in sorted_verdicts(verdicts)]
    out = [tabulate(rows, headers=["verdict", "check", "reason"], tablefmt=tablefmt, maxcolwidths=[None, 48, 90])]
    commands = list(dict.fromkeys(v["command"] for v in verdicts
                                  if v.get("command") and v.get("verdict") in ("FAIL", "IMPROVED")))
    if commands:
        out.append("to accept the new values as the baseline:\n" + "\n".join(f"  {c}" for c in commands))
    out.append(summary_line(verdicts))
    return "\n".join(out)
