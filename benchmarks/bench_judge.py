"""Judge end to end on real runs: an A/A pair must pass, planted regressions must fail, bad inputs exit 2.

Runs ``evalsuite run`` twice on the model under test (int8-wo; seeds 1 and 2, different ppl batch
sizes so the batch order differs), stores run A as the baseline, gates run B against it, then
doctors B's results file (speed halved, one layer broken, a worse scheme substituted: int4-wo-g128's
records renamed int8-wo from a third run) and checks each verdict, exit code and reason.

    python3 benchmarks/bench_judge.py            # GPU, all stages (a few minutes)
    python3 benchmarks/bench_judge.py --quick    # CPU, ppl+layers on 4 short windows (about a minute)

Reads EVALSUITE_MODEL_FILE, EVALSUITE_DATA_DIR; writes $OUT/judge.json (rewritten after every
scenario) plus the A/A run's report.html and report.md; prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def evalsuite(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "NO_COLOR": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "evalsuite", *argv], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=timeout)
    p.seconds = round(time.perf_counter() - t0, 1)  # type: ignore[attr-defined]
    return p


def verdicts_of(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "results.json").read_text())["verdicts"]


def doctor(src: Path, dst: Path, edit) -> Path:
    data = json.loads(src.read_text())
    data["verdicts"] = []
    edit(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data))
    return dst


def halve_speed(data: dict) -> None:
    for r in data["records"]:
        if r["stage"] == "speed" and r["variant"] == "int8-wo" and r["metric"] in ("tokens_per_s", "speedup"):
            r["value"] = r["value"] / 2
            if r.get("ci95"):
                r["ci95"] = [x / 2 for x in r["ci95"]]
            for k in ("min", "max", "mean"):
                if k in r.get("extra", {}):
                    r["extra"][k] /= 2


def break_layer(data: dict) -> str:
    names = [r["task"] for r in data["records"] if r["stage"] == "layers" and r["variant"] == "int8-wo"
             and r["metric"] == "output_sqnr_db" and r["task"].startswith("model.layers.")]
    victim = names[len(names) // 2]
    for r in data["records"]:
        if r["stage"] == "layers" and r["variant"] == "int8-wo" and r["task"] == victim and r["metric"].endswith("sqnr_db"):
            r["value"] = 2.0
        if r["stage"] == "layers" and r["task"] == "all" and r["variant"] == "int8-wo" and r["metric"].startswith("min_"):
            r["value"] = min(r["value"], 2.0) if r["value"] is not None else 2.0
    data["_victim"] = victim
    return victim


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, ppl+layers, 4 windows of 256 tokens")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs already in the --keep folder")
    args = ap.parse_args()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_judge_"))
    bl = work / "baselines"
    model = ["--model", os.environ["EVALSUITE_MODEL_FILE"]] if os.environ.get("EVALSUITE_MODEL_FILE") else []
    if args.quick:
        common = [*model, "--device", "cpu", "--stages", "ppl,layers", "--ppl-context", "256", "--ppl-windows", "4",
                  "--layer-tokens", "256", "--threads", "2", "--no-progress"]
        batches = ("1", "2")
    else:
        common = [*model, "--stages", "ppl,tasks,layers,speed", "--speed-batch-sizes", "1", "--speed-prompt-len", "0",
                  "--no-progress"]
        batches = ("8", "3")
    report: dict = {"quick": args.quick, "scenarios": {}, "seconds": {}}

    def record(name: str, p: subprocess.CompletedProcess, expect_rc: int, verdicts: list[dict] | None = None,
               must_fail: list[str] | None = None, reason_has: str | None = None) -> None:
        fails = {v["check"]: v["reason"] for v in (verdicts or []) if v.get("failing")}
        ok = p.returncode == expect_rc and all(any(c.startswith(m) for c in fails) for m in must_fail or [])
        if reason_has is not None:
            ok = ok and any(reason_has in r for r in fails.values())
        report["scenarios"][name] = {"ok": ok, "rc": p.returncode, "expect_rc": expect_rc, "seconds": p.seconds,
                                     "failing": fails, "stderr_tail": p.stderr.strip()[-400:]}
        print(f"{'OK ' if ok else 'BAD'} {name}: rc={p.returncode} (expected {expect_rc}), {len(fails)} failing, {p.seconds}s")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "judge.json").write_text(json.dumps(report, indent=1))

    runs = {}
    for name, seed, batch, quant in (("a", "1", batches[0], "int8-wo"), ("b", "2", batches[1], "int8-wo"),
                                     ("c", "2", batches[1], "int4-wo-g128")):
        runs[name] = work / name / "results.json"
        if args.reuse and runs[name].is_file() and json.loads(runs[name].read_text())["run"].get("finished"):
            continue
        extra = ["--stages", "ppl,layers"] if name == "c" and not args.quick else []
        p = evalsuite("run", *common, *extra, "--quant", quant, "--seed", seed, "--ppl-batch", batch,
                      "--out", str(work / name), "--no-history", "--baselines", str(bl))
        report["seconds"][f"run_{name}"] = p.seconds
        if not runs[name].is_file():
            print(p.stdout[-2000:], p.stderr[-2000:])
            record(f"run_{name}", p, 0)
            return 1
    p = evalsuite("baseline", "update", str(runs["a"]), "--dir", str(bl), "--allow-partial")
    record("baseline_update", p, 0)

    gate = lambda cand, out_dir: evalsuite("gate", "--baselines", str(bl), "--candidate", str(cand), "--out", str(out_dir))  # noqa: E731
    p = gate(runs["b"], work / "gate_aa")
    record("aa_no_fail", p, 0, verdicts_of(work / "gate_aa"))
    if out is not None:
        for f in ("report.html", "report.md"):
            shutil.copy(work / "gate_aa" / f, out / f"aa_{f}")

    if not args.quick:
        cand = doctor(runs["b"], work / "speed" / "results.json", halve_speed)
        p = gate(cand, work / "gate_speed")
        record("speed_halved_fails", p, 1, verdicts_of(work / "gate_speed"),
               must_fail=["baseline:speed/decode_bs1/int8-wo/tokens_per_s"])

    holder = {}
    cand = doctor(runs["b"], work / "layer" / "results.json", lambda d: holder.setdefault("v", break_layer(d)))
    p = gate(cand, work / "gate_layer")
    record("broken_layer_fails", p, 1, verdicts_of(work / "gate_layer"), must_fail=["layers/int8-wo/sqnr"],
           reason_has=holder["v"])

    def substitute(data: dict) -> None:
        for r in data["records"]:
            r["variant"] = r["variant"].replace("int4-wo-g128", "int8-wo")
        data["run"]["schemes"] = ["int8-wo"]
        data["run"]["model"] = json.loads(runs["b"].read_text())["run"]["model"]

    cand = doctor(runs["c"], work / "worse" / "results.json", substitute)
    p = gate(cand, work / "gate_worse")
    record("worse_scheme_fails", p, 1, verdicts_of(work / "gate_worse"),
           must_fail=["baseline:ppl/wikitext2/int8-wo/kld_mean"])

    def other_model(data: dict) -> None:
        data["run"]["model"]["sha256"] = "0" * 64

    cand = doctor(runs["b"], work / "other" / "results.json", other_model)
    record("wrong_model_exit_2", gate(cand, work / "gate_other"), 2)
    cut = work / "cut.json"
    cut.write_text(runs["b"].read_text()[:2000])
    record("truncated_exit_2", gate(cut, work / "gate_cut"), 2)
    t0 = time.perf_counter()
    evalsuite("report", str(runs["b"]), "--format", "all", "--out", str(work / "report_b"))
    report["seconds"]["report_all_formats"] = round(time.perf_counter() - t0, 1)
    bad = [k for k, v in report["scenarios"].items() if not v["ok"]]
    print(f"judge bench: {len(report['scenarios']) - len(bad)}/{len(report['scenarios'])} scenarios as expected"
          + (f"; unexpected: {', '.join(bad)}" if bad else "") + f"; work folder {work}")
    if out is not None:
        (out / "judge.json").write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
