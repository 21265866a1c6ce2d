"""A/A noise calibration: the same model and data measured several times, varying only what should
not matter (ppl/task batch sizes, ``--kernels fused|eager``, ``--task-packing auto|off``), and the
honest spread of every gated statistic between those runs.

    source .gpu/env.sh && python3 benchmarks/bench_aa.py --write-baselines reports/baselines
    python3 benchmarks/bench_aa.py --from run1/results.json run2/results.json ...   # from finished runs

Each run is a fresh ``python3 -m evalsuite run --stages ppl,tasks`` process (the gated statistics live
in those stages). Every run is paired with the first (the reference, the default configuration)
through the judge's own paired statistics (``evalsuite.judge.paired``): ``same_path`` is the largest
|difference| between runs measured the same way, ``cross_path`` the largest over all pairs. The
calibration file (schema ``evalsuite.noise/1``) is written to ``$OUT/baselines/<model>/<device>-<dtype>/
noise.json`` and, with ``--write-baselines DIR``, beside the baselines in DIR, where ``evalsuite
baseline update`` copies it into each baseline. Also recorded: the spread of every record across the
runs (``kld_max`` among them: a fresh draw each run), answers flipped between runs, and the largest
per-item log-likelihood change. Writes ``$OUT/bench_aa.json``.

Speed: ``--speed-configs`` (default all of ``SPEED_CONFIGS``) adds fresh ``--stages speed`` processes
(the same command again, and other variant sets in the process), and records per speed task and
variant the between-process spread of tokens/s and of the speed-up (``speed/<task>/<variant>/
tokens_per_s_rel``: ``between_process_sd`` of ln(value), ``processes``). The judge gates absolute
tokens/s against a baseline only where that spread exists (``evalsuite.judge.speed``). ``--from``
takes speed runs too (any results.json of this model and card with speed records: runs you already
have); ``--speed-only`` calibrates only the speed spread and keeps the other statistics of an existing
noise.json at the destination::

    python3 benchmarks/bench_aa.py --speed-only --write-baselines reports/baselines      # 5 speed processes
    python3 benchmarks/bench_aa.py --speed-only --from runA/results.json runB/results.json runC/results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from evalsuite.judge.baseline import baseline_path  # noqa: E402
from evalsuite.judge.noise import NOISE_FILE, NOISE_SCHEMA, NoiseModel  # noqa: E402
from evalsuite.judge.paired import paired_arrays, paired_checks  # noqa: E402
from evalsuite.results import Results, write_json_atomic  # noqa: E402

# label -> extra options; the first is the reference, "default-again" its same-path twin
CONFIGS = {
    "default": [],
    "default-again": [],
    "batch": ["--ppl-batch", "4", "--task-batch-size", "512"],
    "eager": ["--kernels", "eager"],
    "no-packing": ["--task-packing", "off"],
}


# speed-stage A/A processes: label -> extra options. Fresh processes varying what should not matter
# for a speed: the repeat itself, and the other variants timed in the same process (clock, thermal and
# allocator state; the -11% fp decode on the H200 came from a five-variant process)
SPEED_CONFIGS = {
    "speed": [],
    "speed-again": [],
    "speed-again-2": [],
    "speed-variants": ["--quant", "int8-wo,int4-wo-g128"],
    "speed-variants-2": ["--quant", "int4-wo-g128,int8-wo"],
}
SPEED_METRICS = ("tokens_per_s", "speedup")


def run_all(args: argparse.Namespace) -> list[tuple[str, Path]]:
    runs = []
    out = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench-aa-runs-"))  # results files are large: not in $OUT
    empty = Path(tempfile.mkdtemp(prefix="aa-nobaselines-"))  # judge against nothing: only the numbers matter
    plan = [] if args.speed_only else [(label, args.stages, CONFIGS[label]) for label in args.configs.split(",") if label]
    plan += [(label, "speed", SPEED_CONFIGS[label]) for label in args.speed_configs.split(",") if label]
    for label, stages, extra in plan:
        dest = out / label
        cmd = [sys.executable, "-m", "evalsuite", "run", "--quant", args.quant, "--stages", stages,
               "--out", str(dest), "--no-history", "--baselines", str(empty), "--no-progress",
               # every run measures fp afresh: a cached fp reference would hide the very noise measured here
               "--fp-cache", "off", *extra]
        if args.model:
            cmd += ["--model", args.model]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - t0
        print(f"{label}: rc={p.returncode} {took:.0f}s  {' '.join(extra)}", flush=True)
        if not (dest / "results.json").is_file():
            print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"run {label} wrote no results")
        runs.append((label, dest / "results.json"))
    return runs


def calibrate(runs: list[tuple[str, Results]]) -> dict:
    """The calibration file's content from finished runs (the first is the reference)."""
    (ref_label, ref), rest = runs[0], runs[1:]
    groups = list(dict.fromkeys(v.split("@", 1)[0] for v in ref.variants))
    stats: dict[str, dict] = {}
    pairs = []
    for label, res in rest:
        same = label in CONFIGS and ref_label in CONFIGS and CONFIGS[label] == CONFIGS[ref_label]
        pairs.append({"label": label, "same_path": same})
        for g in groups:
            base, cand = paired_arrays(ref, g), paired_arrays(res, g)
            for c in paired_checks(base, cand, g, NoiseModel(), [], alpha=0.01):
                if c.value is None or c.verdict == "SKIPPED":
                    continue
                key = c.check.removeprefix("baseline:")
                e = stats.setdefault(key, {"unit": c.extra.get("unit"), "values": {}, "same_path": None,
                                           "cross_path": 0.0, "gated": c.gated})
                e["values"][label] = c.value
                e["cross_path"] = max(e["cross_path"], abs(c.value))
                if same:
                    e["same_path"] = max(e["same_path"] or 0.0, abs(c.value))
    for e in stats.values():
        vals = list(e["values"].values())
        e["sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        e["pairs"] = len(vals)
        if e["same_path"] is None:
            e["same_path"] = e["cross_path"]  # no same-path twin: the cross-path spread stands for both
    return {"statistics": stats, "pairs": pairs}


def speed_spread(runs: list[tuple[str, Results]]) -> dict:
    """Between-process spread of every speed task's tokens/s and speed-up, per variant, over the runs
    that timed it: ``between_process_sd`` = sd (ddof 1) of ln(value) across processes (a relative
    spread), ``cross_path`` / ``same_path`` the largest |relative move| from the first such run
    (any run / a same-configuration run). The judge gates absolute tokens/s only where this exists."""
    stats: dict[str, dict] = {}
    for metric in SPEED_METRICS:
        values: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for label, res in runs:
            for m in res.find(stage="speed", metric=metric):
                if m.value is not None and m.value > 0 and m.task != "device":
                    values.setdefault((m.task, m.variant), []).append((label, float(m.value)))
        for (task, variant), seen in values.items():
            if len(seen) < 2:
                continue
            ref_label, ref = seen[0]
            logs = np.log([v for _, v in seen])
            same = [abs(v / ref - 1) for label, v in seen[1:]
                    if label in SPEED_CONFIGS and SPEED_CONFIGS.get(label) == SPEED_CONFIGS.get(ref_label)]
            cross = max(abs(v / ref - 1) for _, v in seen[1:])
            stats[f"speed/{task}/{variant}/{metric}_rel"] = {
                "between_process_sd": float(np.std(logs, ddof=1)), "processes": len(seen),
                "same_path": max(same) if same else cross, "cross_path": cross,
                "sd": float(np.std(logs, ddof=1)), "pairs": len(seen) - 1, "unit": "(fraction, relative)",
                "gated": True, "values": {label: v for label, v in seen}}
    return stats


def runs_from_table(path: Path) -> list[tuple[str, Results]]:
    """Speed-only runs from a table of tokens/s measured in separate processes (the format of
    ``benchmarks/results/speed-aa-h200.json``: per run its source, revision, kernels and
    ``tokens_per_s[task][variant]``), for processes whose results.json files were not kept. Each
    variant's speed-up is its tokens/s over fp's of the same process, as the speed stage defines it."""
    table = json.loads(path.read_text())
    model = {"name": table["model"].split(" ")[0], "sha256": table.get("sha256")}
    runs = []
    for i, r in enumerate(table["runs"]):
        res = Results(run={"model": model, "device": {"type": "cuda", "name": table["device"]}, "dtype": "bf16",
                           "git_revision": r.get("git_revision"), "argv": [f"(table {path.name}: {r['source']})"],
                           "kernels": r.get("kernels")})
        for task, by_variant in r["tokens_per_s"].items():
            fp = by_variant.get("fp")
            for variant, value in by_variant.items():
                res.add(stage="speed", task=task, variant=variant, metric="tokens_per_s", value=float(value), n=5,
                        unit="tokens/s", higher_is_better=True)
                if variant != "fp" and fp:
                    res.add(stage="speed", task=task, variant=variant, metric="speedup", value=float(value) / fp, n=5,
                            unit="ratio", higher_is_better=True)
        runs.append((f"table-{i}", res))
    return runs


def merged_with_existing(path: Path, noise: dict) -> dict:
    """``noise`` plus the kind of statistics it lacks (speed spread, or paired ppl/tasks margins) from
    an existing calibration file at ``path``: a speed-only calibration keeps the paired one, and a
    ppl/tasks one keeps the speed spread; the source names both."""
    if not path.is_file():
        return noise
    old = json.loads(path.read_text())
    new = noise["statistics"]
    has_speed, has_paired = any(k.startswith("speed/") for k in new), any(not k.startswith("speed/") for k in new)
    kept = {k: e for k, e in (old.get("statistics") or {}).items()
            if (k.startswith("speed/") and not has_speed) or (not k.startswith("speed/") and not has_paired)}
    if not kept:
        return noise
    return {**noise, "statistics": {**kept, **new}, "source": f"{noise['source']}; kept from before: {old.get('source')}",
            "runs": [*(old.get("runs") or []), *noise["runs"]]}


def record_spread(runs: list[tuple[str, Results]]) -> dict:
    """Every record's values across the runs, and its largest relative move from the reference."""
    ref = runs[0][1]
    out = {}
    for m in ref.records:
        if m.stage not in ("ppl", "tasks") or m.value is None:
            continue
        vals = {label: (r.get(*m.key).value if r.get(*m.key) is not None else None) for label, r in runs}
        rel = [abs(v / m.value - 1) for v in vals.values() if v is not None and m.value]
        out["/".join(m.key)] = {"values": vals, "max_rel_move": max(rel) if rel else None}
    return out


def task_flips(runs: list[tuple[str, Results]]) -> dict:
    """Per task and variant: fraction of answers that differ from the reference run, largest
    per-choice log-likelihood change (nats)."""
    ref = runs[0][1]
    out = {}
    for task, entry in (ref.details.get("tasks") or {}).items():
        for v, vals in (entry.get("values") or {}).items():
            a = np.asarray(vals.get("acc") or [], dtype=float)
            la = np.asarray([x for d in (entry.get("loglikelihoods") or {}).get(v, []) for x in d], dtype=float)
            row = {}
            for label, res in runs[1:]:
                e = (res.details.get("tasks") or {}).get(task) or {}
                b = np.asarray(((e.get("values") or {}).get(v) or {}).get("acc") or [], dtype=float)
                lb = np.asarray([x for d in (e.get("loglikelihoods") or {}).get(v, []) for x in d], dtype=float)
                row[label] = {"flipped": float((a != b).mean()) if a.size and a.size == b.size else None,
                              "max_ll_change": float(np.nanmax(np.abs(la - lb))) if la.size and la.size == lb.size else None}
            out[f"{task}/{v}"] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("EVALSUITE_MODEL_FILE") or os.environ.get("EVALSUITE_MODEL"))
    ap.add_argument("--data-dir", default=os.environ.get("EVALSUITE_DATA_DIR"))
    ap.add_argument("--quant", default="int8-wo")
    ap.add_argument("--stages", default="ppl,tasks")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma separated from {', '.join(CONFIGS)} ('' for none)")
    ap.add_argument("--speed-configs", default=",".join(SPEED_CONFIGS),
                    help=f"speed-stage A/A processes, comma separated from {', '.join(SPEED_CONFIGS)} ('' for none)")
    ap.add_argument("--from", dest="from_files", nargs="+", metavar="RESULTS",
                    help="calibrate from finished runs' results.json instead (the first is the reference)")
    ap.add_argument("--from-table", metavar="JSON",
                    help="calibrate the speed spread from a table of tokens/s measured in separate processes "
                         "(benchmarks/results/speed-aa-h200.json); implies --speed-only")
    ap.add_argument("--speed-only", action="store_true",
                    help="calibrate the speed spread only (launch only the speed processes; with --from, use only "
                         "their speed records); an existing noise.json keeps its paired statistics (and a "
                         "ppl/tasks-only calibration keeps its speed spread)")
    ap.add_argument("--write-baselines", metavar="DIR", help="also write noise.json into this baselines folder")
    ap.add_argument("--runs-dir", metavar="DIR", help="where the runs' output folders go (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench-aa-"))
    t0 = time.perf_counter()
    if args.from_table:
        args.speed_only = True
        runs = runs_from_table(Path(args.from_table))
    else:
        files = [(Path(f).parent.name, Path(f)) for f in args.from_files] if args.from_files else run_all(args)
        runs = [(label, Results.load(p)) for label, p in files]
    # ppl/tasks runs calibrate the paired statistics, speed runs the speed spread (one list may hold both)
    paired_runs = [] if args.speed_only else [(l, r) for l, r in runs if r.details.get("ppl") or r.details.get("tasks")]
    speed_runs = [(l, r) for l, r in runs if r.find(stage="speed", metric="tokens_per_s")]
    if args.speed_only and len(speed_runs) < 3:
        raise SystemExit(f"--speed-only: {len(speed_runs)} runs with speed records; a between-process spread needs 3 or more")
    ref = (paired_runs or speed_runs or runs)[0][1]
    cal = calibrate(paired_runs) if len(paired_runs) >= 2 else {"statistics": {}, "pairs": []}
    speed = speed_spread(speed_runs)
    for k, e in speed.items():
        cal["statistics"][k] = e
    device = ref.run.get("device") or {}
    source = (f"benchmarks/bench_aa.py on {device.get('name')}, {len(runs)} runs ({', '.join(l for l, _ in runs)}), "
              f"git {str(ref.run.get('git_revision'))[:10]}, {dt.date.today().isoformat()}")
    noise = {"schema": NOISE_SCHEMA, "model": (ref.run.get("model") or {}).get("name"),
             "sha256": (ref.run.get("model") or {}).get("sha256"), "device_name": device.get("name"),
             "dtype": ref.run.get("dtype"), "source": source,
             "runs": [{"label": l, "options": CONFIGS.get(l), "argv": r.run.get("argv")} for l, r in runs],
             "statistics": {k: {x: e[x] for x in ("same_path", "cross_path", "sd", "pairs", "unit", "gated",
                                                  "between_process_sd", "processes") if x in e}
                            for k, e in cal["statistics"].items()}}
    written = []
    for folder in [out / "baselines", *([Path(args.write_baselines)] if args.write_baselines else [])]:
        path = baseline_path(folder, ref, "fp").with_name(NOISE_FILE)
        write_json_atomic(path, merged_with_existing(path, noise))
        written.append(str(path))
        print(f"wrote {path}")
    payload = {"bench": "aa", "source": source, "noise_files": written, "calibration": cal,
               "records": record_spread(runs), "task_flips": task_flips(runs), "wall_s": time.perf_counter() - t0}
    from benchutil import write_out

    if write_out("bench_aa", payload) is None:
        (out / "bench_aa.json").write_text(json.dumps(payload, indent=1, default=str))
    for k, e in sorted(cal["statistics"].items()):
        between = f"  between-process sd {e['between_process_sd']:.3g} over {e['processes']}" if "processes" in e else ""
        print(f"{k:50s} same {e['same_path']:.3g}  cross {e['cross_path']:.3g}  {e['unit']}{between}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
