"""The terminal table: one row per metric, one column per variant."""

from __future__ import annotations

from tabulate import tabulate

from evalsuite.results import Metric, Results


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


def render_table(results: Results, tablefmt: str = "simple") -> str:
    variants = results.variants
    rows: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for m in results.records:
        row = rows.setdefault((m.stage, m.task, m.metric, m.unit), {})
        row[m.variant] = format_value(m)
    table = [[stage, task, metric, unit, *(row.get(v, "") for v in variants)]
             for (stage, task, metric, unit), row in rows.items()]
    header = ["stage", "task", "metric", "unit", *variants]
    title = "partial results (--limit)\n" if results.partial else ""
    return title + (tabulate(table, headers=header, tablefmt=tablefmt) if table else "(no metrics recorded)")
