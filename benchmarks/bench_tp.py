"""Tensor-parallel benchmark: ``evalsuite run --tp N`` on a Llama-2-70B-shaped random model over all
visible GPUs, and 7B ``--tp 1`` vs ``--tp N`` scaling. NOT RUN YET: no multi-GPU machine so far.

    python3 benchmarks/bench_tp.py --shape llama2-70b --layers 20 --work /tmp/tp   # 70B-wide, 20 of 80 layers
    python3 benchmarks/bench_tp.py --shape llama2-7b --tp-list 1,8 --work /tmp/tp  # scaling on a model that fits
    python3 benchmarks/bench_tp.py --quick                                          # tiny shape, 2 CPU ranks (gloo)

Builds the Hugging Face folder with bench_scale's builder (random bf16 weights drawn on the GPU,
SmolLM2's tokenizer, vocabulary widened to its 49,152 ids; kept under --work for the next call), then
times ``torchrun --nproc-per-node N -m evalsuite run --tp N`` (``python3 -m evalsuite run`` for N = 1)
for fp + the schemes over the ppl and tasks stages, and reads each stage's seconds and every rank's
peak allocated GPU memory from results.json.

Memory: today every rank loads and quantizes the whole model on the CPU before keeping its shards, so
a host needs N x (bf16 model + largest quantized copy) of RAM: 8 x (140 + 70) GB for the full 80-layer
70B, more than an 8-GPU host's 560 GB; ``--layers`` keeps the 70B layer shapes with fewer layers
(20 layers: ~8 x 55 GB). The float32 noise floor (another whole fp32 load per rank) is off here.

ACCURACY NUMBERS OF RANDOM WEIGHTS MEAN NOTHING: the benchmark is about time and memory only.
Writes ``$OUT/tp.json`` (benchmarks/benchutil.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_scale import SHAPES, WARNING, build_folder, load_tokenizer  # noqa: E402
from benchutil import write_out  # noqa: E402

SHAPES.setdefault("llama2-70b", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                     num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                     max_position_embeddings=4096, rope_theta=10000.0))


def run_tp(model: Path, out: Path, n: int, args, env: dict) -> dict:
    head = [sys.executable, "-m", "evalsuite", "run"] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "evalsuite",
        "run", "--tp", str(n)]
    cmd = head + ["--model", str(model), "--quant", args.schemes, "--stages", args.stages, "--out", str(out),
                  "--force", "--no-progress", "--no-history", "--ppl-noise-floor", "off", "--tasks", args.tasks,
                  "--limit", str(args.limit), "--ppl-context", str(args.ppl_context)]
    if args.quick:
        cmd += ["--device", "cpu"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    row = {"tp": n, "wall_s": round(time.perf_counter() - t0, 1), "exit": proc.returncode}
    if proc.returncode not in (0, 1):
        row["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
    path = out / "results.json"
    if path.is_file():
        run = json.loads(path.read_text())["run"]
        row["stage_seconds"] = run.get("stage_seconds", {})
        peaks = run.get("stage_peak_gpu_bytes_per_rank") or {k: [v] for k, v in run.get("stage_peak_gpu_bytes", {}).items()}
        row["stage_peak_gpu_gib_per_rank"] = {k: [round(b / 2**30, 2) for b in v] for k, v in peaks.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-70b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    p.add_argument("--tp-list", help="comma separated --tp values (default: all visible GPUs)")
    p.add_argument("--schemes", default="int8-wo")
    p.add_argument("--stages", default="ppl,tasks")
    p.add_argument("--tasks", default="arc_easy,piqa")
    p.add_argument("--limit", type=int, default=200, help="windows/items per task")
    p.add_argument("--ppl-context", type=int, default=2048)
    p.add_argument("--work", required=False, help="folder for the built model (kept: a 70B build takes minutes)")
    p.add_argument("--timeout-s", type=float, default=3000.0)
    p.add_argument("--quick", action="store_true", help="tiny shape, --tp 1 vs 2 on CPU ranks (checks the script)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.limit, args.ppl_context, args.tp_list = "tiny", 4, 64, "1,2"
    gpus = torch.cuda.device_count()
    tp_list = [int(x) for x in (args.tp_list or str(gpus)).split(",")]
    if not args.quick and max(tp_list) > gpus:
        print(f"bench_tp: --tp {max(tp_list)} needs that many GPUs; {gpus} visible (blocked)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.quick else "cuda")
    work = Path(args.work or "/tmp/evalsuite-tp")
    if args.layers:
        SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    folder = work / f"{args.shape}-{SHAPES[args.shape]['num_hidden_layers']}l"
    print(WARNING, flush=True)
    env = {**os.environ, "EVALSUITE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1" if args.quick else os.environ.get("OMP_NUM_THREADS", "8")}
    built = json.loads((folder / "built.json").read_text()) if (folder / "built.json").is_file() else None
    if built is None:
        built = build_folder(folder, args.shape, load_tokenizer(), device)
        (folder / "built.json").write_text(json.dumps(built))
        print(f"built {folder}: {built['n_params'] / 1e9:.2f}B parameters in {built['build_s']} s", flush=True)
    report = {"warning": WARNING, "device": torch.cuda.get_device_name(0) if gpus and not args.quick else "cpu",
              "gpus": gpus, "model": built, "schemes": args.schemes, "stages": args.stages, "runs": []}
    for n in tp_list:
        report["runs"].append(run_tp(folder, work / f"run-{args.shape}-tp{n}", n, args, env))
        print(json.dumps(report["runs"][-1], indent=1), flush=True)
    base = next((r for r in report["runs"] if r["tp"] == 1 and r.get("stage_seconds")), None)
    for r in report["runs"]:
        if base and r.get("stage_seconds") and r is not base:
            r["speedup_vs_tp1"] = {k: round(base["stage_seconds"][k] / v, 2) for k, v in r["stage_seconds"].items()
                                   if v and base["stage_seconds"].get(k)}
    print(f"\n| tp | wall s | {' s | '.join(args.stages.split(','))} s | peak GiB per rank (ppl) | speed-up |")
    for r in report["runs"]:
        secs = " | ".join(str(r.get("stage_seconds", {}).get(s, "-")) for s in args.stages.split(","))
        print(f"| {r['tp']} | {r['wall_s']} | {secs} | {r.get('stage_peak_gpu_gib_per_rank', {}).get('ppl', '-')} | "
              f"{r.get('speedup_vs_tp1', '-')} |")
    print(WARNING, flush=True)
    write_out("tp", report)
    return 0 if all(r["exit"] in (0, 1) for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
