"""``report.md``: the release report as GitHub-flavoured Markdown; figures as PNG files beside it."""

from __future__ import annotations

from tabulate import tabulate

from evalsuite.report.document import Document


def _cell(x: str) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, figure_paths: dict[str, str] | None = None) -> str:
    figure_paths = figure_paths or {}
    out = [f"# {doc.title}", "", f"**Overall verdict: {doc.verdict}**", ""]
    if doc.banner:
        out += [f"> **⚠ {doc.banner}**", ""]
    out += [tabulate([[k, _cell(v)] for k, v in doc.meta], headers=["run", ""], tablefmt="github"), ""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for t in s.tables:
            rows = [[_cell(c) for c in r] for r in t.rows]
            if t.verdict_col is not None:
                for r in rows:
                    r[t.verdict_col] = f"**{r[t.verdict_col]}**"
            out += [tabulate(rows, headers=t.header, tablefmt="github", disable_numparse=True), ""]
        for p in s.notes:
            out += [p, ""]
        if s.code:
            out += ["```", *s.code, "```", ""]
        for f in s.figures:
            if f in figure_paths:
                out += [f"![{f}]({figure_paths[f]})", ""]
    return "\n".join(out)
