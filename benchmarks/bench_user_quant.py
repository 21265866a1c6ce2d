"""The user's own quantization end to end (issue 16): one handler-file variant, one torchao variant
and one ``--variant-model`` checkpoint beside the built-in int8-wo, through ``evalsuite run``.

    python3 benchmarks/bench_user_quant.py --stages ppl,tasks,layers     # accuracy stages
    python3 benchmarks/bench_user_quant.py --stages speed                # compiles once per variant

The checkpoint is made here: the fp model with every linear layer but the head replaced by its
int8-wo dequantized weight (the example handler's numerics), saved as a float Hugging Face folder,
i.e. what a GGUF Q8_0 or a compressed-tensors int8 checkpoint loads as. Prints one row per variant
and writes ``$OUT/user_quant-<stages>.json`` with the run's stage timings and the headline metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchutil import write_out  # noqa: E402

HANDLER = f"{REPO / 'examples' / 'int8_handler.py'}:WeightOnlyInt8QuantHandler"
QUANT = f"int8-wo,seed={HANDLER},ao=torchao:Int8WeightOnlyConfig"


def make_checkpoint(model_path: Path, folder: Path) -> Path:
    """A float HF folder holding the int8-wo dequantized weights of ``model_path``."""
    from safetensors.torch import save_model

    from evalsuite.load import load_model
    from evalsuite.quantize import parse_scheme, quantize_

    loaded = load_model(model_path, device="cpu", dtype=torch.float32)
    fp = loaded.model
    q = quantize_(copy.deepcopy(fp), parse_scheme(HANDLER))
    out = copy.deepcopy(fp)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if hasattr(mod, "scales") and hasattr(mod, "dequantize"):
                out.get_submodule(name).weight.copy_(mod.dequantize())
    folder.mkdir(parents=True, exist_ok=True)
    config = out.config
    config.save_pretrained(folder)
    save_model(out, str(folder / "model.safetensors"))
    loaded.tokenizer.save_pretrained(folder)
    return folder


def headline(results: dict) -> list[dict]:
    def get(stage, variant, metric, task=None):
        for r in results["records"]:
            if r["stage"] == stage and r["variant"] == variant and r["metric"] == metric and (task is None or r["task"] == task):
                return r
        return None

    rows = []
    for v in ["fp", *results["run"]["schemes"]]:
        kld, ppl = get("ppl", v, "kld_mean"), get("ppl", v, "token_ppl")
        deltas = [r["value"] for r in results["records"] if r["stage"] == "tasks" and r["variant"] == v
                  and r["metric"] == "delta_acc" and r["value"] is not None]
        layers = get("layers", v, "min_output_sqnr_db", "all")
        decode = get("speed", v, "tokens_per_s", "decode_bs1")
        rows.append({
            "variant": v,
            "kld_mean": kld and kld["value"], "kld_ci95": kld and kld.get("ci95"),
            "token_ppl": ppl and ppl["value"],
            "mean_delta_acc": sum(deltas) / len(deltas) if deltas else None,
            "min_output_sqnr_db": layers and layers["value"], "worst_layer": layers and layers["extra"].get("worst"),
            "decode_bs1_tokens_per_s": decode and decode["value"],
            "quantize_s": results["run"].get("quantize_seconds", {}).get(v),
        })
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="ppl,tasks,layers")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--model", default=os.environ.get("EVALSUITE_MODEL_FILE"))
    args = ap.parse_args()
    from evalsuite.load.model import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    out_root = Path(os.environ.get("OUT", tempfile.mkdtemp()))
    t0 = time.perf_counter()
    ckpt = make_checkpoint(model, Path(tempfile.mkdtemp()) / "int8-dequantized")
    make_s = time.perf_counter() - t0
    tag = args.stages.replace(",", "-")
    run_dir = out_root / f"user-quant-{tag}"
    cmd = [sys.executable, "-m", "evalsuite", "run", "--model", str(model), "--quant", QUANT,
           "--variant-model", f"ckpt={ckpt}", "--stages", args.stages, "--out", str(run_dir), "--no-history",
           "--no-progress"]
    if os.environ.get("EVALSUITE_DATA_DIR"):
        cmd += ["--data-dir", os.environ["EVALSUITE_DATA_DIR"]]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.perf_counter() - t0
    results = json.loads((run_dir / "results.json").read_text())
    rows = headline(results)
    print(f"\nexit {proc.returncode}, {wall:.1f} s; stage seconds {results['run']['stage_seconds']}; "
          f"checkpoint made in {make_s:.1f} s")
    print("| variant | KLD mean | token ppl | mean Δacc | min output SQNR dB (worst layer) | decode bs1 tok/s | quantize s |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        print(f"| {r['variant']} | {fmt(r['kld_mean'], '.5g')} | {fmt(r['token_ppl'], '.6g')} | "
              f"{fmt(r['mean_delta_acc'], '+.4f')} | {fmt(r['min_output_sqnr_db'], '.4g')} ({r['worst_layer'] or '–'}) | "
              f"{fmt(r['decode_bs1_tokens_per_s'], '.5g')} | {fmt(r['quantize_s'], '.3g')} |")
    verdicts = {}
    for v in results.get("verdicts", []):
        verdicts[v["verdict"]] = verdicts.get(v["verdict"], 0) + 1
    print("verdicts:", verdicts, "errors:", results.get("errors"))
    write_out(f"user_quant-{tag}", {"command": cmd, "exit": proc.returncode, "wall_s": wall, "make_checkpoint_s": make_s,
                                    "stage_seconds": results["run"]["stage_seconds"], "rows": rows,
                                    "verdicts": verdicts, "errors": results.get("errors"),
                                    "device": results["run"]["device"], "versions": results["run"]["versions"]})
    return 0 if proc.returncode in (0, 1) else proc.returncode


if __name__ == "__main__":
    sys.exit(main())
