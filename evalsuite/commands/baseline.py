"""``evalsuite baseline update|show``: write baselines from a results file, or print one.

``update RESULTS.json [--variant V] [--dir reports/baselines]`` writes one file per variant to
``<dir>/<model>/<device>-<dtype>/<variant>.json``, keeping any hand-written per-metric tolerance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from evalsuite.errors import EvalsuiteError
from evalsuite.judge.baseline import DEFAULT_DIR, baseline_path, from_results, load_baselines, variant_group
from evalsuite.judge.checks import fmt
from evalsuite.judge.noise import noise_beside
from evalsuite.results import Results


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
    for g in wanted:
        b = from_results(results, g, source=args.file)
        path = baseline_path(Path(args.dir), results, g)
        if path.is_file():
            try:
                old = load_baselines(path)[0]
            except EvalsuiteError:  # e.g. its paired data file is gone: the new one replaces it
                old = None
            if old is not None:
                b.tolerances = {k: t for k, t in old.tolerances.items() if b.get(k) is not None}
        noise = noise_beside(path)  # benchmarks/bench_aa.py's calibration for this model and card
        if noise is not None:
            b.noise = noise.to_dict()
        b.save(path)
        paired = f", paired data {b.paired_info['file']}" if b.paired_info else ", no per-window/per-item data"
        calibrated = f", noise from {noise.source}" if noise is not None else ", noise uncalibrated (no noise.json)"
        print(f"baseline {g}: {len(b.metrics)} metrics{paired}{calibrated} → {path}")
    return 0


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
