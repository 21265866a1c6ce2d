"""Data-parallel evaluation: the same ``evalsuite run`` on one process and under
``torchrun --nproc-per-node N``; wall time and per-stage time of each, the speed-up, and the largest
relative difference between the two runs' metrics (they must agree within floating-point tolerance).

    # on a machine with >= 2 GPUs (the lead's H100 x2):
    EVALSUITE_DATA_DIR=/data python3 benchmarks/bench_multigpu.py --nproc 2
    # anywhere (CPU, gloo backend, tiny limits):
    python3 benchmarks/bench_multigpu.py --quick

Reads EVALSUITE_MODEL_FILE (default SmolLM2-135M) and EVALSUITE_DATA_DIR; writes
``$OUT/multigpu.json`` when $OUT is set. With fewer GPUs than --nproc it records why it skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(cmd: list[str], out: Path, env: dict[str, str], timeout: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1 = a gate failed, which is no concern of this benchmark
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"wall_s": round(wall, 2), "stage_seconds": results["run"]["stage_seconds"],
            "world_size": results["run"].get("world_size"), "records": results["records"]}


def max_rel_diff(a: list[dict], b: list[dict]) -> tuple[float, list[dict]]:
    """Largest |a - b| / max(|a|, 1e-12) over metrics present in both runs (timings excluded)."""
    key = lambda r: (r["stage"], r["task"], r["variant"], r["metric"])  # noqa: E731
    bv = {key(r): r["value"] for r in b}
    diffs = []
    for r in a:
        k = key(r)
        if k in bv and isinstance(r["value"], (int, float)) and isinstance(bv[k], (int, float)) and r["stage"] != "speed":
            d = abs(r["value"] - bv[k]) / max(abs(r["value"]), 1e-12)
            if math.isfinite(d):
                diffs.append({"metric": "/".join(k), "one": r["value"], "multi": bv[k], "rel_diff": d})
    diffs.sort(key=lambda d: -d["rel_diff"])
    return (diffs[0]["rel_diff"] if diffs else float("nan")), diffs[:10]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU/gloo, 2 windows of 64 tokens")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stages", help="default ppl,layers (--quick: ppl)")
    p.add_argument("--quant", default="int8-wo")
    p.add_argument("--limit", type=int, help="windows/items per task (default: all)")
    p.add_argument("--timeout", type=float, default=1200)
    a = p.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not a.quick
    a.stages = a.stages or ("ppl" if a.quick else "ppl,layers")
    report: dict = {"benchmark": "multigpu", "nproc": a.nproc, "stages": a.stages, "quant": a.quant,
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu (gloo)",
                    "gpus_visible": torch.cuda.device_count() if cuda else 0}
    if cuda and torch.cuda.device_count() < a.nproc:
        report["skipped"] = f"needs {a.nproc} GPUs, {torch.cuda.device_count()} visible"
        return finish(report)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    common = ["run", "--stages", a.stages, "--quant", a.quant, "--no-progress", "--no-history",
              "--device", "cuda" if cuda else "cpu"]
    if os.environ.get("EVALSUITE_MODEL_FILE"):
        common += ["--model", os.environ["EVALSUITE_MODEL_FILE"]]
    if a.quick:
        common += ["--limit", str(a.limit or 2), "--ppl-context", "64", "--threads", "1"]
        env["OMP_NUM_THREADS"] = "1"
    elif a.limit:
        common += ["--limit", str(a.limit)]
    with tempfile.TemporaryDirectory() as tmp:
        one = run([sys.executable, "-m", "evalsuite", *common], Path(tmp) / "one", env, a.timeout)
        multi = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
                     "-m", "evalsuite", *common], Path(tmp) / "multi", env, a.timeout)
    worst, top = max_rel_diff(one.pop("records"), multi.pop("records"))
    report.update(one=one, multi=multi, speedup_wall=round(one["wall_s"] / multi["wall_s"], 3),
                  speedup_stage={s: round(one["stage_seconds"][s] / multi["stage_seconds"][s], 3)
                                 for s in one["stage_seconds"] if multi["stage_seconds"].get(s)},
                  max_rel_diff=worst, largest_diffs=top)
    return finish(report)


def finish(report: dict) -> int:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "multigpu.json").write_text(json.dumps(report, indent=1) + "\n")
    if "skipped" in report:
        print(f"multigpu: skipped: {report['skipped']}")
        return 0
    print(f"multigpu on {report['device']}: 1 process {report['one']['wall_s']} s, {report['nproc']} processes "
          f"{report['multi']['wall_s']} s (wall speed-up {report['speedup_wall']}x)")
    print(f"  per stage speed-up: {report['speedup_stage']}")
    print(f"  largest relative metric difference: {report['max_rel_diff']:.3g}"
          + (f" ({report['largest_diffs'][0]['metric']})" if report["largest_diffs"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
