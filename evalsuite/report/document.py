"""The facts of a release report, built once from a results file and rendered as Markdown or HTML.

A document is a list of sections; a section holds paragraphs, tables and figure names, so both
renderers state the same facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evalsuite.results.verdicts import fmt
from evalsuite.results.layers import layer_summary
from evalsuite.report.table import metric_rows, partial_banner, sorted_verdicts, summary_line
from evalsuite.results import Results


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    verdict_col: int | None = None


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # after the tables, before the code
    code: list[str] = field(default_factory=list)


@dataclass
class Document:
    title: str
    meta: list[tuple[str, str]]
    banner: str | None
    verdict: str
    sections: list[Section]


def _interval(v: dict[str, Any]) -> str:
    iv = v.get("interval")
    if not iv:
        return ""
    try:
        return f"[{fmt(float(iv[0]))}, {fmt(float(iv[1]))}]"
    except (TypeError, ValueError):
        return str(iv)


def _num(x: Any) -> str:
    try:
        return fmt(float(x)) if x is not None else ""
    except (TypeError, ValueError):
        return str(x)


def meta_of(results: Results) -> list[tuple[str, str]]:
    run = results.run
    model = run.get("model") or {}
    device = run.get("device") or {}
    versions = run.get("versions") or {}
    return [
        ("model", f"{model.get('name', '?')} ({model.get('format', '?')}, {model.get('n_params', '?')} params)"),
        ("model sha256", str(model.get("sha256", "?"))),
        ("schemes", ", ".join(run.get("schemes", [])) or "-"),
        ("stages", ", ".join(run.get("stages", [])) or "-"),
        ("device / dtype", f"{device.get('type', '?')} {device.get('name', '')} / {run.get('dtype', '?')}"),
        ("seed / limit", f"{run.get('seed')} / {run.get('limit') if run.get('limit') is not None else 'none'}"
                         f"{' (partial run)' if results.partial else ' (full run)'}"),
        ("started → finished", f"{run.get('started', '?')} → {run.get('finished', '?')}"),
        ("git revision", str(run.get("git_revision"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
    ]


def checks_section(results: Results) -> Section:
    vs = sorted_verdicts(results.verdicts)
    s = Section("Verdicts", paragraphs=[summary_line(vs) if vs else "No checks were run."])
    if vs:
        s.tables.append(Table(["verdict", "check", "value", "limit / baseline", "95% CI", "reason"],
                              [[v["verdict"], v["check"], _num(v.get("value")),
                                _num(v.get("limit") if v.get("limit") is not None else v.get("baseline")),
                                _interval(v), v.get("reason", "")] for v in vs], verdict_col=0))
    flagged = [v for v in vs if v.get("verdict") in ("FAIL", "IMPROVED")]
    sources = list(dict.fromkeys(f"{v['check']}: limit from {v['source']}" for v in flagged if v.get("source")))
    cmds = list(dict.fromkeys(v["command"] for v in flagged if v.get("command")))
    if sources:
        s.notes.append("Limits of the failing checks come from: " + "; ".join(sources) + ".")
    if cmds:
        s.notes.append("To accept the new values as the baseline:")
        s.code.extend(cmds)
    return s


def layers_section(results: Results) -> Section | None:
    schemes = results.scheme_variants
    rows = []
    for v in schemes:
        s = layer_summary(results, v, ["weight_sqnr_db", "output_sqnr_db"], math.nan)
        if s is None or s.worst is None:
            continue
        under = s.under
        rows.append([v, s.worst, s.describe(s.worst), f"{len(under)} of {len(s.values)}",
                     ", ".join(under[:8]) + (f" … (+{len(under) - 8})" if len(under) > 8 else "")])
    if not rows:
        return None
    return Section("Guilty layers", paragraphs=[
        "The layer with the least headroom over its SQNR floor, per scheme (SQNR = 10·log10(‖ref‖² / ‖ref − quantized‖²) "
        "in dB; output SQNR on calibration activations)."],
        tables=[Table(["scheme", "worst layer", "SQNR (floor)", "under floor", "layers under floor"], rows)],
        figures=["layers"])


def fix_section(results: Results) -> Section | None:
    """The suggested fix of each failing scheme (``evalsuite fix`` / ``run --suggest-fix``): the recipe,
    its verification, and the size-quality frontier of the search beside simple strategies."""
    fixes = results.details.get("fix") or {}
    if not fixes:
        return None
    s = Section("Fix suggestion", paragraphs=[
        "For each scheme failing a within-run limit: a mixed-precision recipe (each quantized linear layer in the "
        "failing scheme, int4-wo-g32, int8-wo or fp), chosen greedily by predicted KLD reduction per extra byte on "
        "calibration tokens disjoint from the evaluation windows, then verified by re-running the failing stages "
        "with --quant NAME=recipe:FILE (tightened and searched again while a check fails, within the budget). "
        "The verified verdict is the one that counts. Bits/weight: 8 x the linear layers' stored weight bytes / "
        "their number of weights."])
    rows, top = [], []
    frontier = []
    for variant, e in fixes.items():
        if "verified" not in e:
            rows.append(["", variant, e.get("status", ""), "", "", "", "", ""])
            continue
        p, v = e["predicted"], e["verified"]
        ver = ", ".join(f"{k} {_num(m.get('value'))}" for k, m in v.get("metrics", {}).items())
        failed = [c["check"] for c in e.get("verification_checks") or [] if c.get("verdict") != "PASS"]
        rows.append([v.get("verdict", ""), variant, e["status"],
                     f"{_num(e.get('bits_per_weight'))} (scheme {_num(e.get('bits_per_weight_scheme'))})",
                     f"{e.get('layers_raised', 0)} of {e.get('layers_quantized', 0)}",
                     f"KLD {_num(e['before']['kld_mean'])} → {_num(p['kld_mean'])}, ppl ratio {_num(p['ppl_ratio'])}",
                     ver + (f"; failing: {', '.join(failed)}" if failed else ""),
                     str((e.get("seconds") or {}).get("rounds", ""))])
        sens = sorted(e.get("sensitivity", {}).items(), key=lambda kv: -kv[1])[:5]
        raised = [f"{n}={x}" for n, x in (e.get("raised") or {}).items()]
        top.append(f"{variant}: most sensitive " + ", ".join(f"{k} ({_num(x)} nats)" for k, x in sens)
                   + f"; raised: {', '.join(raised[:12]) or 'none'}{' …' if len(raised) > 12 else ''}; "
                   f"stopped: {e.get('stop_reason', '')}; recipe: {e.get('recipe', '')}")
        s.code.append(e["command"])
        frontier += frontier_rows(variant, e.get("frontier") or [])
    s.tables.append(Table(["verified", "scheme", "status", "bits/weight", "layers raised",
                           "predicted (calibration)", "verified (evaluation data)", "rounds"], rows, verdict_col=0))
    if frontier:
        s.tables.append(Table(["scheme", "strategy", "bits/weight", "extra MiB", "predicted KLD (calibration)",
                               "verified KLD (evaluation)", "verdict"], frontier))
    s.notes.extend(top)
    s.figures += ["fix_frontier", "fix"]
    return s


def frontier_rows(variant: str, points: list[dict[str, Any]]) -> list[list[str]]:
    """The frontier table's rows of one scheme: the search's verified recipes and last point of
    each round, then each simple strategy (or why it was skipped)."""
    rows = []
    searched = [p for p in points if p.get("strategy") == "search"]
    keep = [p for i, p in enumerate(searched) if "verdict" in p or i + 1 == len(searched)
            or searched[i + 1].get("round") != p.get("round")]
    for p in keep + [p for p in points if p.get("strategy") != "search"]:
        name = p["strategy"] + (f" (round {p['round']})" if p.get("round") else "")
        if "skipped" in p:
            rows.append([variant, name, "", "", "", "", f"skipped: {p['skipped']}"])
            continue
        rows.append([variant, name, _num(p.get("bits_per_weight")), f"{p.get('extra_bytes', 0) / 2**20:.2f}",
                     _num(p.get("predicted_kld_mean")), _num(p.get("verified_kld_mean")), p.get("verdict", "")])
    return rows


def noise_section(results: Results) -> Section | None:
    recs = results.find(variant="fp@noise")
    if not recs:
        return None
    rows = [[m.stage, m.task, m.metric, fmt(m.value) + (f" [{fmt(m.ci95[0])}, {fmt(m.ci95[1])}]" if m.ci95 else ""),
             m.unit, (m.extra or {}).get("reason", "measured") if (m.extra or {}).get("trivial") else "measured"]
            for m in recs]
    return Section("Noise floors", paragraphs=[
        f"The same paired statistics between fp in the run's dtype ({results.run.get('dtype', '?')}) and fp in float32: "
        "a quantized number at or below these is indistinguishable from the dtype's own rounding."],
        tables=[Table(["stage", "task", "metric", "value [95% CI]", "unit", "how"], rows)])


def metrics_sections(results: Results) -> list[Section]:
    header, rows = metric_rows(results)
    out = []
    for stage in dict.fromkeys(r[0] for r in rows):
        figs = {"ppl": ["kld"], "tasks": ["tasks"], "speed": ["speed"]}.get(stage, [])
        out.append(Section(f"Stage {stage}", tables=[Table(header[1:], [r[1:] for r in rows if r[0] == stage])],
                           figures=figs))
    return out


def definitions_section(results: Results) -> Section:
    seen: dict[tuple[str, str], list[str]] = {}
    for m in results.records:
        if m.definition and (m.stage, m.metric) not in seen:
            seen[(m.stage, m.metric)] = [m.stage, m.metric, m.unit, m.definition,
                                         {True: "higher", False: "lower", None: "-"}[m.higher_is_better]]
    return Section("Metric definitions", tables=[Table(["stage", "metric", "unit", "definition", "better"], list(seen.values()))])


def errors_section(results: Results) -> Section | None:
    if not results.errors:
        return None
    return Section("Errors recorded by the stages", tables=[Table(
        ["stage", "variant", "message"], [[e.get("stage", ""), e.get("variant") or "", e.get("message", "")] for e in results.errors])])


def build_document(results: Results) -> Document:
    model = (results.run.get("model") or {}).get("name", "model")
    failing = any(v.get("failing") for v in results.verdicts)
    sections = [checks_section(results)]
    sections += [s for s in (fix_section(results), layers_section(results), noise_section(results)) if s is not None]
    sections += metrics_sections(results)
    sections += [s for s in (errors_section(results),) if s is not None]
    sections.append(definitions_section(results))
    return Document(title=f"evalsuite release report: {model}", meta=meta_of(results), banner=partial_banner(results),
                    verdict="FAIL" if failing else ("INCOMPLETE" if any(v.get("verdict") == "INCOMPLETE" for v in results.verdicts)
                                                    else "PASS" if results.verdicts else "NOT JUDGED"), sections=sections)
