"""Stage 5 of the pipeline: report. Renders results files; never imports torch.

``write_reports`` writes, from one results object: ``results.json`` (with the judge's verdicts),
``report.md`` (figures as PNG files in ``figures/``), a self-contained ``report.html`` and ``junit.xml``.
"""

from __future__ import annotations

from pathlib import Path

from evalsuite.results import Results, write_bytes_atomic, write_text_atomic

FORMATS = ("json", "md", "html", "junit")


def render_figures(results: Results) -> dict[str, tuple[str, bytes]]:
    """The report's plots as PNGs; none (the tables still render) where matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return {}
    from evalsuite.report.plots import FIGURES

    out = {}
    for name, (caption, make) in FIGURES.items():
        png = make(results)
        if png is not None:
            out[name] = (caption, png)
    return out


def write_reports(results: Results, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write the chosen formats into ``out_dir``; returns the paths written."""
    from evalsuite.report.document import build_document

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "json" in formats:
        written.append(results.save(out_dir / "results.json"))
    wants_doc = bool({"md", "html"} & set(formats))
    figures = render_figures(results) if wants_doc else {}
    doc = build_document(results) if wants_doc else None
    if "md" in formats:
        from evalsuite.report.markdown import render_markdown

        fig_dir = out_dir / "figures"
        paths = {}
        for name, (_, png) in figures.items():
            fig_dir.mkdir(exist_ok=True)
            write_bytes_atomic(fig_dir / f"{name}.png", png)
            paths[name] = f"figures/{name}.png"
        path = out_dir / "report.md"
        write_text_atomic(path, render_markdown(doc, paths))
        written.append(path)
    if "html" in formats:
        from evalsuite.report.html import render_html

        path = out_dir / "report.html"
        write_text_atomic(path, render_html(doc, figures))
        written.append(path)
    if "junit" in formats:
        from evalsuite.report.junit import write_junit

        written.append(write_junit(results, out_dir / "junit.xml"))
    return written
