"""The terminal tables: metrics (one row per metric, one column per variant) and verdicts.

Printed tables fit the terminal (``terminal_width``): free text (reasons, notes) is wrapped at
spaces only, values lose their intervals, and variants are split over several tables; check names,
metric names, words and paths are never cut. The verdicts lead with what decided the run (the gated
checks, every failure with its reason) and count the rest in one line per class. ``verbose`` prints
the full tables, every row. The reports (md, html) always have everything.
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


LOG_WIDTH = 120  # columns of output that is not a terminal (a CI log, a file), unless $COLUMNS says otherwise
MIN_LOG_WIDTH = 80


def terminal_width() -> int:
    """Columns to fit. On a terminal: $COLUMNS, else the terminal's. Otherwise (a pipe, a CI log):
    $COLUMNS, else 120, never fewer than 80: a log is read in an editor or a browser, and a narrow
    layout there only multiplies the lines."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((LOG_WIDTH, 24)).columns
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = LOG_WIDTH
    return max(MIN_LOG_WIDTH, columns if columns > 0 else LOG_WIDTH)


def fill(text: str, width: int, **kw: Any) -> str:
    """``textwrap.fill`` at spaces only: a word, a path or a command longer than ``width`` stays whole
    on a line of its own (copying a path out of a log must work)."""
    return textwrap.fill(text, max(width, 1), break_long_words=False, break_on_hyphens=False, **kw)


def longest_word(texts: Sequence[str]) -> int:
    return max((len(w) for t in texts for w in _ANSI.sub("", t or "").split()), default=0)


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
    while True:  # narrow until it fits, or the floor; cells wrap at spaces only (a long path stays whole)
        wrapped = [[fill(c, room) if i in wrap and c else c for i, c in enumerate(r)] for r in rows]
        text = tabulate(wrapped, headers=headers, tablefmt=tablefmt, disable_numparse=True)
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
    title = (fill(banner, width) if width else banner) + "\n" if banner else ""
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
        return title + text + "\n" + fill(note, width)
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
    return title + "\n\n".join(parts) + "\n" + fill(note, width)


def timing_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the run's timing table: each stage's wall seconds and the fraction of them
    the device sat idle (``run.stage_idle``; "n/a" where there is no number, its reason in results.json,
    "–" for a stage with no record)."""
    run = results.run
    idle = run.get("stage_idle") or {}
    rows = []
    for stage, seconds in (run.get("stage_seconds") or {}).items():
        rec = idle.get(stage)
        frac = rec.get("fraction") if isinstance(rec, dict) else None
        shown = "–" if rec is None else "n/a" if frac is None else f"{100 * frac:.0f}%"
        rows.append([stage, f"{seconds:.1f}", shown])
    return ["stage", "seconds", "device idle"], rows


def render_timing(results: Results, tablefmt: str = "simple") -> str:
    """The timing table, with the reason once where the idle fraction is not applicable."""
    header, rows = timing_rows(results)
    if not rows:
        return "(no stage timings recorded)"
    reasons = sorted({r["reason"] for r in (results.run.get("stage_idle") or {}).values()
                      if isinstance(r, dict) and r.get("fraction") is None and r.get("reason")})
    text = tabulate(rows, headers=header, tablefmt=tablefmt, disable_numparse=True)
    return text + "".join(f"\nn/a: {r}" for r in reasons)


def sorted_verdicts(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(verdicts, key=lambda v: VERDICT_ORDER.index(v["verdict"]) if v.get("verdict") in VERDICT_ORDER else 9)


def summary_line(verdicts: list[dict[str, Any]], width: int | None = None) -> str:
    """The run's headline: how many gated checks passed (and failed), how many checks were not judged
    (INCONCLUSIVE, SKIPPED, INCOMPLETE: a PASS is only for what was checked), and what was reported
    without gating. Wrapped to ``width`` columns (None: one line), continuation lines indented."""
    failing = sum(1 for v in verdicts if v.get("failing"))
    invalid = sum(1 for v in verdicts if v.get("verdict") == "INVALID")
    if invalid:  # evidence that contradicts itself: no verdict in it is given (judge.evidence)
        text = (f"gate INVALID: the results file contradicts itself or its details ({invalid} check"
                f"{'s' * (invalid != 1)}); nothing in it was judged")
        return text if width is None else textwrap.fill(text, max(width, 40), subsequent_indent="  ",
                                                        break_long_words=False, break_on_hyphens=False)
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


# the stages whose within-run limits `evalsuite fix` can bring a scheme back within (as
# evalsuite.app.fix.FIXABLE_STAGES: report sits below the app layer and does not import it)
FIXABLE_STAGES = ("ppl", "tasks", "layers")


def decides(v: dict[str, Any]) -> bool:
    """Whether a check decided the run: a gated (primary) check, anything failing it, and a run that
    is INCOMPLETE or INVALID."""
    return bool(v.get("gated")) or bool(v.get("failing")) or v.get("verdict") in ("FAIL", "INCOMPLETE", "INVALID")


def stage_not_requested(v: dict[str, Any]) -> bool:
    return v.get("verdict") == "SKIPPED" and bool((v.get("extra") or {}).get("stage_not_requested"))


def fix_command(verdicts: list[dict[str, Any]], results_path: str | None = None) -> str | None:
    """``evalsuite fix RESULTS`` when a failing check is a scheme's within-run limit that a recipe
    of per-layer formats can bring back (a limit of ppl, tasks or layers; not speed, not a baseline)."""
    fixable = [v for v in verdicts if v.get("failing") and v.get("kind") == "limit" and v.get("variant")
               and v.get("stage") in FIXABLE_STAGES]
    if not fixable:
        return None
    import shlex

    return f"evalsuite fix {shlex.quote(str(results_path)) if results_path else '<results.json>'}"


def _counts(vs: list[dict[str, Any]]) -> str:
    counts = {k: n for k in VERDICT_ORDER if (n := sum(1 for v in vs if v.get("verdict") == k))}
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def _rows_text(ordered: list[dict[str, Any]], color: bool, tablefmt: str, width: int | None) -> str:
    """The rows' table; where the check names leave a reason too little room beside them (or a word
    of a reason, a path, would not fit there), each reason goes on the lines under its check."""
    rows = [[colour(v["verdict"], color), v["check"], v.get("reason", "")] for v in ordered]
    name_width = max(len(v["check"]) for v in ordered)
    room = None if width is None else width - name_width - len("WITHIN-NOISE") - 4
    if room is not None and (room < 24 or longest_word([r[2] for r in rows]) > room):
        out = []
        for row in rows:
            out.append(f"{row[0]}  {row[1]}")
            if row[2]:
                out.append(fill(row[2], width, initial_indent="    ", subsequent_indent="    "))
        return "\n".join(out)
    return fit_table(rows, ["verdict", "check", "reason"], width, wrap=(2,), tablefmt=tablefmt)


def render_verdicts(verdicts: list[dict[str, Any]], color: bool = False, tablefmt: str = "simple",
                    width: int | None = None, verbose: bool = False, summary: bool = True,
                    results_path: str | None = None) -> str:
    """The checks that decided the run (gated ones, every failure, with their reasons), worst first;
    one line per class of the rest (reported only; skipped because their stage was not asked for;
    others), which ``verbose`` lists row by row instead; then the update commands of failing/improved
    checks, ``evalsuite fix`` where a failing limit is one it can address, and the summary line.
    Within ``width`` columns (default the terminal's; ``verbose``: no limit) the reasons are wrapped
    at spaces; check names, words and paths are never cut."""
    if not verdicts:
        return "(no checks)"
    width = None if verbose else (width or terminal_width())
    ordered = sorted_verdicts(verdicts)
    if verbose:
        out = [_rows_text(ordered, color, tablefmt, width)]
    else:
        lead = [v for v in ordered if decides(v)]
        rest = [v for v in ordered if not decides(v)]
        out = [_rows_text(lead, color, tablefmt, width)] if lead else ["no check decided the run"]
        lines = []
        not_asked = [v for v in rest if stage_not_requested(v)]
        if not_asked:
            stages = ", ".join(dict.fromkeys(str(v.get("stage")) for v in not_asked))
            lines.append(f"stages not asked for ({stages}): {len(not_asked)} SKIPPED")
        reported = [v for v in rest if v.get("gated") is False]
        if reported:
            lines.append(f"not gated: {_counts(reported)}")
        other = [v for v in rest if v.get("gated") is not False and not stage_not_requested(v)]
        if other:
            lines.append(f"other checks: {_counts(other)}")
        if lines:
            lines[-1] += " (see report.md or --verbose)"
            out += [fill(ln, width, subsequent_indent="  ") for ln in lines]
    commands = list(dict.fromkeys(v["command"] for v in verdicts
                                  if v.get("command") and v.get("verdict") in ("FAIL", "IMPROVED")))
    if commands:
        out.append("to accept the new values as the baseline:\n" + "\n".join(f"  {c}" for c in commands))
    fix = fix_command(verdicts, results_path)
    if fix:
        schemes = ", ".join(dict.fromkeys(v["variant"] for v in verdicts if v.get("failing") and v.get("variant")
                                          and v.get("kind") == "limit" and v.get("stage") in FIXABLE_STAGES))
        head = f"to find a mixed-precision recipe (per-layer formats) with which {schemes} passes its limits:"
        out.append(f"{head if width is None else fill(head, width, subsequent_indent='  ')}\n  {fix}")
    missing = [v for v in verdicts if v.get("command") and v.get("verdict") == "SKIPPED"]
    create = list(dict.fromkeys(v["command"] for v in missing))
    if create:
        why = "; ".join(dict.fromkeys(v.get("reason", "").split(";")[0] for v in missing if v.get("reason")))
        head = f"to create the missing baselines ({why}):" if why else "to create the missing baselines:"
        out.append((fill(head, width, subsequent_indent="  ") if width else head) + "\n"
                   + "\n".join(f"  {c}" for c in create))
    if summary:
        out.append(summary_line(verdicts, width))
    return "\n".join(out)
