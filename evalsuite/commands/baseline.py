"""``evalsuite baseline update|show``: write baselines from a results file, or print one.

``update RESULTS.json [--variant V] [--dir reports/baselines]`` writes one file per variant to
``<dir>/<model>/<device>-<dtype>/<variant>.json``, keeping any hand-written per-metric tolerance.

A baseline is what later runs are held to, so ``update`` protects it: it refuses a run whose verdict
for those variants failed, was INCOMPLETE or INVALID (a results file never judged: one that did not
finish every stage it was asked for) unless ``--accept-regression``; over an existing baseline it
prints every metric it changes (old → new) and keeps the previous file as ``NAME.json.bak`` (its
paired data as ``NAME.npz.bak``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tabulate import tabulate

from evalsuite.errors import EvalsuiteError
from evalsuite.judge.baseline import (DEFAULT_DIR, Baseline, baseline_path, from_results, load_baselines, metric_key,
                                      update_command, variant_group)
from evalsuite.judge.checks import FAIL, INCOMPLETE, INVALID, fmt
from evalsuite.judge.completeness import stages_finished
from evalsuite.judge.paired import PAIRED_SUFFIX
from evalsuite.judge.noise import noise_beside
from evalsuite.results import Results, write_bytes_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    from evalsuite.commands.cli import CommaList, hidden_alias

    # 'save' is the old spelling of 'update', still accepted
    p.add_argument("action", choices=["update", "show"], type=lambda a: "update" if a == "save" else a,
                   help="update from a results file, or show a baseline")
    p.add_argument("file", metavar="FILE", help="results.json (update) or a baseline file (show)")
    p.add_argument("--variant", action=CommaList, help="only these variants (comma list or repeated; default all in the file)")
    p.add_argument("--baselines", metavar="DIR", dest="dir", default=str(DEFAULT_DIR),
                   help=f"baseline folder (default {DEFAULT_DIR})")
    hidden_alias(p, "--dir", "dir")
    p.add_argument("--allow-partial", action="store_true", help="accept a --limit run as a baseline")
    p.add_argument("--accept-regression", action="store_true",
                   help="accept a run whose verdict failed, or was INCOMPLETE or INVALID, as the baseline (the "
                        "previous file is kept as NAME.json.bak)")


def update(args: argparse.Namespace) -> int:
    results = Results.load(args.file)
    if results.partial and not args.allow_partial:
        raise EvalsuiteError(f"{args.file}: a partial run (--limit {results.run.get('limit')}) makes a poor baseline; "
                             "pass --allow-partial to use it anyway")
    groups = list(dict.fromkeys(variant_group(v) for v in results.variants))
    wanted = args.variant or groups
    unknown = [v for v in wanted if v not in groups]
    if unknown:
        raise EvalsuiteError(f"{args.file}: no variant {', '.join(unknown)} (it has {', '.join(groups) or 'none'})")
    if not args.accept_regression:
        refuse_unsound(results, args, wanted)
    for g in wanted:
        b = from_results(results, g, source=args.file)
        path = baseline_path(Path(args.dir), results, g)
        old = None
        if path.is_file():
            try:
                old = load_baselines(path)[0]
            except EvalsuiteError:  # e.g. its paired data file is gone: the new one replaces it
                old = None
            if old is not None:
                b.tolerances = {k: t for k, t in old.tolerances.items() if b.get(k) is not None}
                print_changes(old, b)
            keep_previous(path)
        noise = noise_beside(path)  # benchmarks/bench_aa.py's calibration for this model and card
        if noise is not None:
            b.noise = noise.to_dict()
        b.save(path)
        paired = f", paired data {b.paired_info['file']}" if b.paired_info else ", no per-window/per-item data"
        calibrated = f", noise from {noise.source}" if noise is not None else ", noise uncalibrated (no noise.json)"
        print(f"baseline {g}: {len(b.metrics)} metrics{paired}{calibrated} → {path}")
    return 0


def refuse_unsound(results: Results, args: argparse.Namespace, groups: list[str]) -> None:
    """A failing, INCOMPLETE or INVALID run (for these variant groups, or the run as a whole) must not
    quietly become what later runs are held to."""
    judged = [v for v in results.verdicts if v.get("variant") is None or variant_group(v["variant"]) in groups]
    bad = [v for v in judged if v.get("failing") or v.get("verdict") in (FAIL, INCOMPLETE)]
    bad += [v for v in results.verdicts if v.get("verdict") == INVALID]
    if results.verdicts:
        why = "; ".join(dict.fromkeys(f"{v.get('check')} {v.get('verdict')}" for v in bad[:5]))
    else:  # never judged: only what the run itself records
        requested, finished = results.run.get("stages") or [], set(stages_finished(results))
        missing = [s for s in requested if s not in finished]
        why = "; ".join(filter(None, [
            "interrupted" if results.run.get("interrupted") else "",
            "never finished" if "finished" not in results.run and not results.run.get("interrupted") else "",
            f"stages {', '.join(missing)} did not finish" if missing else ""]))
    if why:
        command = update_command(args.file, ",".join(groups), Path(args.dir), results.partial, accept=True)
        raise EvalsuiteError(f"{args.file}: not a sound baseline ({why}); later runs would be held to it. If this "
                             f"is the new expected behaviour, accept it: {command}")


def print_changes(old: Baseline, new: Baseline) -> None:
    """Every metric the update changes, old → new (per-layer rows counted, not listed)."""
    rows, layer_rows = [], 0
    keys = list(dict.fromkeys([m.key for m in old.metrics] + [m.key for m in new.metrics]))
    for key in keys:
        a, b = old.get(key), new.get(key)
        va, vb = (a.value if a else None), (b.value if b else None)
        if va == vb or (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb)):
            continue
        m = a or b
        if m.stage == "layers" and m.task != "all":
            layer_rows += 1
            continue
        change = f" ({(vb - va) / abs(va):+.1%})" if va and vb is not None else ""
        rows.append(f"  {metric_key(m)}: {fmt(va) if a else '(none)'} → {fmt(vb) if b else '(removed)'}{change}")
    print(f"baseline {new.variant}: {len(rows) + layer_rows} of {len(keys)} metrics change against {old.path} "
          f"(updated {old.updated})" + (":" if rows else ""))
    for r in rows:
        print(r)
    if layer_rows:
        print(f"  and {layer_rows} per-layer metrics ('evalsuite baseline show' lists them)")


def keep_previous(path: Path) -> None:
    """The baseline about to be replaced, kept beside it as ``NAME.json.bak`` (and ``NAME.npz.bak``)."""
    for f in (path, path.with_suffix(PAIRED_SUFFIX)):
        if f.is_file():
            write_bytes_atomic(f.with_name(f.name + ".bak"), f.read_bytes())
            print(f"kept the previous {f.name} as {f.name}.bak")


def show(args: argparse.Namespace) -> int:
    for b in load_baselines(args.file):
        if args.variant and b.variant not in args.variant:
            continue
        print(f"baseline {b.variant} of {b.model.get('name')} (sha256 {str(b.model.get('sha256'))[:12]}), "
              f"{b.device_type}-{b.dtype}, updated {b.updated}, from {b.source.get('results')}")
        how = b.measured or {}
        print(f"schema {b.schema}; paired data: {b.paired_info['file'] if b.paired_info else 'none (unpaired)'}; "
              f"measured: " + (", ".join(f"{k} {how.get(k)}" for k in ("device_name", "kernels", "ppl_batch",
                                                                        "task_packing", "git_revision") if k in how)
                               or "not recorded") +
              f"; noise: {(b.noise or {}).get('source', 'uncalibrated')}")
        rows = [[m.stage, m.task, m.variant, m.metric, fmt(m.value), m.unit,
                 {True: "↑", False: "↓", None: ""}[m.higher_is_better],
                 fmt(m.stderr) if m.stderr is not None else (f"[{fmt(m.ci95[0])}, {fmt(m.ci95[1])}]" if m.ci95 else ""),
                 b.tolerances.get(m.key, "")] for m in b.metrics if not (m.stage == "layers" and m.task != "all")]
        print(tabulate(rows, headers=["stage", "task", "variant", "metric", "value", "unit", "better", "stderr / CI", "tolerance"]))
    return 0


def main(args: argparse.Namespace) -> int:
    return show(args) if args.action == "show" else update(args)
