"""``report.html``: one self-contained page (inline CSS, figures inlined as base64 PNG)."""

from __future__ import annotations

import base64
from html import escape

from evalsuite.report.document import Document, Table

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1b1f24;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px}th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.v{font-weight:700;white-space:nowrap}.PASS{color:#1a7f37}.FAIL{color:#fff;background:#cf222e}.IMPROVED{color:#fff;background:#8250df}
.WITHIN-NOISE{color:#7d4e00;background:#fff8c5}.SKIPPED{color:#57606a}.INCONCLUSIVE{color:#7d4e00;background:#fff8c5}.WORSE{color:#9a6700}
.banner{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;font-weight:600;margin:12px 0}
.overall{font-size:18px;font-weight:700;padding:6px 12px;display:inline-block}
pre{background:#f6f8fa;padding:8px;overflow-x:auto}img{max-width:100%;border:1px solid #eee;margin:6px 0}
"""


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    body = []
    for r in t.rows:
        cells = []
        for i, c in enumerate(r):
            c = str(c)
            if i == t.verdict_col:
                cells.append(f'<td class="v {escape(c)}">{escape(c)}</td>')
            else:
                cells.append(f"<td>{escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(doc: Document, figures: dict[str, tuple[str, bytes]]) -> str:
    """``figures``: name → (caption, PNG bytes)."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(doc.title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{escape(doc.title)}</h1>",
             f'<div class="overall {"FAIL" if doc.verdict == "FAIL" else "PASS"}">Overall verdict: {escape(doc.verdict)}</div>']
    if doc.banner:
        parts.append(f'<div class="banner">⚠ {escape(doc.banner)}</div>')
    parts.append(_table(Table(["run", ""], [[k, v] for k, v in doc.meta])))
    for s in doc.sections:
        parts.append(f"<h2>{escape(s.title)}</h2>")
        parts += [f"<p>{escape(p)}</p>" for p in s.paragraphs]
        parts += [_table(t) for t in s.tables]
        parts += [f"<p>{escape(p)}</p>" for p in s.notes]
        if s.code:
            parts.append("<pre>" + escape("\n".join(s.code)) + "</pre>")
        for f in s.figures:
            if f in figures:
                caption, png = figures[f]
                parts.append(f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,'
                             f'{base64.b64encode(png).decode()}"><figcaption>{escape(caption)}</figcaption></figure>')
    parts.append("</body></html>")
    return "\n".join(parts)
