"""The terminal tables: metrics (one row per metric, one column per variant) and verdicts.

Printed tables fit the terminal (``shutil.get_terminal_size``: ``$COLUMNS``, else the terminal, else
80 columns): free text (reasons, notes) is wrapped, values lose their intervals, and variants are
split over several tables; check names and metric names are never cut. ``verbose`` prints the full
table. The reports (md, html) always have everything.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
from typing import Any, Sequence

from tabulate import tabulate

from evalsuite.results.verdicts import VERDICTS
from evalsuite.results import Metric, Results

COLOURS = {"PASS": "32", "FAIL": "31;1", "IMPROVED": "35;1", "WITHIN-NOISE": "33", "SKIPPED": "90", "INCOMPLETE": "31",
           "INCONCLUSIVE": "33;1", "WORSE": "33"}
VERDICT_ORDER = VERDICTS  # worst first


def colour_enabled() -> bool:
    """Colour verdicts on a terminal, unless $NO_COLOR is set (no-color.org)."""
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def colour(verdict: str, enabled: bool) -> str:
    code = COLOURS.get(verdict)
    return f"\033[{code}m{verdict}\033[0m" if enabled and code else verdict


def terminal_width() -> int:
    """Columns to fit: $COLUMNS, else the terminal's, else 80 (not a terminal)."""
    return shutil.get_terminal_size((80, 24)).columns


_ANSI = re.compile(r"\033\[[0-9;]*m")


def visible_width(text: str) -> int:
    """Widest line of ``text`` on screen (colour codes take no room)."""
    return max((len(_ANSI.sub("", ln)) for ln in text.splitlines()), default=0)


def fit_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], width: int | None, wrap: Sequence[int] = (),
              min_wrap: int = 16, tablefmt: str = "simple") -> str:
    """``tabulate`` within ``width`` columns by wrapping the free-text columns ``wrap`` (reasons,
    notes; they share the room the others leave, at least ``min_wrap`` each). The other columns
    are never cut. ``width`` None: no limit."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    plain = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    if width is None or visible_width(plain) <= width or not wrap:
        return plain
    cols = len(headers)
    natural = [max([len(_ANSI.sub("", headers[i]))] + [len(_ANSI.sub("", r[i])) for r in rows]) for i in range(cols)]
    room = max(min_wrap, (width - sum(natural[i] for i in range(cols) if i not in wrap) - 2 * cols) // len(wrap))
    while True:  # tabulate pads some columns beyond their text: narrow until it fits, or the floor
        maxw = [room if i in wrap else None for i in range(cols)]
        wrapped = [[textwrap.fill(c, room) if i in wrap and c else c for i, c in enumerate(r)] for r in rows]
        text = tabulate(wrapped, headers=headers, tablefmt=tablefmt, disable_numparse=True, maxcolwidths=maxw)
        excess = visible_width(text) - width
        if excess <= 0 or room <= min_wrap:
            return text
        room = max(min_wrap, room - -(-excess // len(wrap)))


def format_value(m: Metric, intervals: bool = True) -> str:
    if m.value is None:
        return "-"
    v = m.value
    text = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if not intervals:
        return text
    if m.stderr is not None:
        text += f" ± {m.stderr:.2g}"
    elif m.ci95 is not None:
        text += f" [{m.ci95[0]:.4g}, {m.ci95[1]:.4g}]"
    return text


def metric_rows(results: Results, per_layer: bool = False, intervals: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the metric table; per-module layer records only when ``per_layer``."""
    variants = results.variants
    rows: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for m in results.records:
        if not per_layer and ((m.stage == "layers" and m.task != "all") or (m.stage == "fix" and m.task != "suggestion")):
            continue
        row = rows.setdefault((m.stage, m.task, m.metric, m.unit), {})
        row[m.variant] = format_value(m, intervals)
    table = [[stage, task, metric, unit, *(row.get(v, "") for v in variants)]
             for (stage, task, metric, unit), row in rows.items()]
    return ["stage", "task", "metric", "unit", *variants], table


def partial_banner(results: Results) -> str | None:
    if results.run.get("suite") == "smoke":
        return ("SMOKE SUITE: the small sample shipped inside evalsuite; these numbers check the installation and are "
                "not comparable with a run on the full data")
    if not results.partial:
        return None
    limit = results.run.get("limit")
    what = (f"--limit {limit} evaluated at most that many windows/items per task" if limit is not None
            else "a stage evaluated only part of its data (e.g. --ppl-windows)")
    return f"PARTIAL RUN: {what}; intervals are wide and numbers are not comparable with a full run"


def render_table(results: Results, tablefmt: str = "simple", width: int | None = None, verbose: bool = False) -> str:
    """The metric table within ``width`` columns (default the terminal's; ``verbose``: no limit).
    Too wide with intervals: values only (said so); still too wide: the variants in groups."""
    width = None if verbose else (width or terminal_width())
    banner = partial_banner(results)
    title = (textwrap.fill(banner, width) if width else banner) + "\n" if banner else ""
    header, table = metric_rows(results)
    if not table:
        return title + "(no metrics recorded)"
    text = tabulate(table, headers=header, tablefmt=tablefmt, disable_numparse=True)
    if width is None or visible_width(text) <= width:
        return title + text
    header, table = metric_rows(results, intervals=False)
    note = "(values without their intervals to fit the terminal; --verbose or the report for them)"
    text = tabulate(table, headers=header, tablefmt=tablefmt, disable_numparse=True)
    if visible_width(text) <= width:
        return title + text + "\n" + textwrap.fill(note, width)
    keys, variants = 4, header[4:]

    def sub_table(cols: list[int]) -> str:
        sub = [r[:keys] + [r[keys + i] for i in cols] for r in table if any(r[keys + i] for i in cols)]
        return tabulate(sub, headers=header[:keys] + [variants[i] for i in cols], tablefmt=tablefmt,
                        disable_numparse=True)

    groups: list[list[int]] = [[]]
    for i in range(len(variants)):  # greedily: each table takes the variants that still fit
        if groups[-1] and visible_width(sub_table(groups[-1] + [i])) > width:
            groups.append([])
        groups[-1].append(i)
    parts = [sub_table(g) for g in groups]
    return title + "\n\n".join(parts) + "\n" + textwrap.fill(note, width)


def sorted_verdicts(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(verdicts, key=lambda v: VERDICT_ORDER.index(v["verdict"]) if v.get("verdict") in VERDICT_ORDER else 9)


def summary_line(verdicts: list[dict[str, Any]], width: int | None = None) -> str:
    """The run's headline: how many gated checks passed (and failed), how many checks were not judged
    (INCONCLUSIVE, SKIPPED, INCOMPLETE: a PASS is only for what was checked), and what was reported
    without gating. Wrapped to ``width`` columns (None: one line), continuation lines indented."""
    failing = sum(1 for v in verdicts if v.get("failing"))
    overall = "FAILED" if failing else ("INCOMPLETE" if any(v.get("verdict") == "INCOMPLETE" for v in verdicts)
                                        else "PASSED")
    unjudged = ("INCONCLUSIVE", "SKIPPED", "INCOMPLETE")

    def counts(vs: list[dict[str, Any]]) -> dict[str, int]:
        return {k: n for k in VERDICT_ORDER if (n := sum(1 for v in vs if v.get("verdict") == k))}

    gated = [v for v in verdicts if v.get("gated") and v.get("verdict") not in unjudged]
    passed = sum(1 for v in gated if v.get("verdict") == "PASS")
    first = f"{failing} gated check{'s' * (failing != 1)} failed, {passed} passed" if failing else \
        (f"{passed} gated check{'s' * (passed != 1)} passed" if gated else "no gated check was judged")
    other = counts([v for v in gated if v.get("verdict") != "PASS" and not v.get("failing")])
    if other:
        first += ", " + ", ".join(f"{n} {k}" for k, n in other.items()) + " (gated, not failing)"
    parts = [first]
    unconfirmed = sum(1 for v in verdicts if (v.get("extra") or {}).get("confirmed") is False)
    if unconfirmed:
        parts.append(f"{unconfirmed} failure{'s' * (unconfirmed != 1)} not confirmed by the re-measurement (--confirm)")
    skipped = counts([v for v in verdicts if v.get("verdict") in unjudged])
    if skipped:
        names = [f"{n} {k}" for k, n in skipped.items()]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"{listed} {'was' if sum(skipped.values()) == 1 else 'were'} not judged")
    reported = counts([v for v in verdicts if not v.get("gated") and v.get("verdict") not in unjudged
                       and not v.get("failing")])
    if reported:
        parts.append("reported, not gated: " + ", ".join(f"{n} {k}" for k, n in reported.items()))
    text = f"gate {overall}: " + "; ".join(parts)
    if width is None:
        return text
    return textwrap.fill(text, max(width, 40), subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def render_verdicts(verdicts: list[dict[str, Any]], color: bool = False, tablefmt: str = "simple",
                    width: int | None = None, verbose: bool = False, summary: bool = True) -> str:
    """One row per check, worst first, then the update commands of failing/improved checks, then
    the summary line. Within ``width`` columns (default the terminal's; ``verbose``: no limit) the
    reasons are wrapped, whatever their text; check names are never cut. Where the names leave too
    little room for a reason beside them, each reason goes on the lines under its check."""
    if not verdicts:
        return "(no checks)"
    width = None if verbose else (width or terminal_width())
    ordered = sorted_verdicts(verdicts)
    rows = [[colour(v["verdict"], color), v["check"], v.get("reason", "")] for v in ordered]
    name_width = max(len(v["check"]) for v in ordered)
    if width is not None and width - name_width - len("WITHIN-NOISE") - 4 < 24:
        out = []
        for row in rows:
            out.append(f"{row[0]}  {row[1]}")
            if row[2]:
                out.append(textwrap.fill(row[2], width, initial_indent="    ", subsequent_indent="    "))
        out = ["\n".join(out)]
    else:
        out = [fit_table(rows, ["verdict", "check", "reason"], width, wrap=(2,), tablefmt=tablefmt)]
    commands = list(dict.fromkeys(v["command"] for v in verdicts
                                  if v.get("command") and v.get("verdict") in ("FAIL", "IMPROVED")))
    if commands:
        out.append("to accept the new values as the baseline:\n" + "\n".join(f"  {c}" for c in commands))
    create = list(dict.fromkeys(v["command"] for v in verdicts if v.get("command") and v.get("verdict") == "SKIPPED"))
    if create:
        out.append("to create the missing baselines:\n" + "\n".join(f"  {c}" for c in create))
    if summary:
        out.append(summary_line(verdicts, width))
    return "\n".join(out)
