"""Time the ``layers`` stage (weight view + output view on real activations + per-block hidden SQNR).

Target (issue 5): SmolLM2-135M (210 quantized linear layers), all three views on 16k calibration
tokens of WikiText-2 valid, in at most 3 s on an H100. Also checks on the device, in its dtype, that
an honest run flags no layer and that one layer planted with floor-instead-of-round is named worst.

    python3 benchmarks/bench_layers.py                      # H100: int8-wo, then all three schemes
    python3 benchmarks/bench_layers.py --quick              # 256 tokens, works on CPU

Reads $EVALSUITE_MODEL_FILE (default: the installed SmolLM2) and $EVALSUITE_DATA_DIR; writes
``$OUT/layers.json`` after every case, prints a summary and a markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from evalsuite.app.config import RunConfig  # noqa: E402
from evalsuite.load import load_model  # noqa: E402
from evalsuite.measure import layers as L  # noqa: E402
from evalsuite.measure.context import RunContext  # noqa: E402
from evalsuite.quantize import parse_scheme, quantize_  # noqa: E402
from evalsuite.results import Results  # noqa: E402

PLANTED = "model.layers.7.mlp.down_proj"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 tokens, one repeat (CPU or GPU)")
    p.add_argument("--tokens", type=int, default=L.DEFAULT_TOKENS_GPU)
    p.add_argument("--seq-len", type=int, default=L.DEFAULT_SEQ_LEN)
    p.add_argument("--batch-tokens", type=int, default=L.DEFAULT_BATCH_TOKENS)
    p.add_argument("--cases", default="int8-wo;int8-wo,int4-wo-g128,int8-dq",
                   help="scheme sets to time, ';' between sets, ',' within one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.repeats, args.cases = 256, 128, 1, "int8-wo"
    return args


def stage_config(a: argparse.Namespace) -> RunConfig:
    return RunConfig.of_options(layer_tokens=a.tokens, layer_seq_len=a.seq_len, layer_batch_tokens=a.batch_tokens,
                                layer_thresholds=None, layer_threshold_db=None, layer_jump_db=L.DEFAULT_JUMP_DB,
                                layer_top=5, layer_peer_db=L.DEFAULT_PEER_DB, skip_layers="")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(loaded, variants, configs, device, dtype, args, data_dir) -> tuple[float, Results]:
    ctx = RunContext(loaded=loaded, variants={"fp": loaded.model, **variants}, configs=configs, device=device,
                     dtype=dtype, config=stage_config(args), results=Results(), data_dir=data_dir, show_progress=False)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        L.run(ctx)
    sync(device)
    return time.perf_counter() - t0, ctx.results


def summarize(results: Results, variant: str) -> dict:
    def value(metric):
        r = results.get("layers", "all", variant, metric)
        return (r.value, r.extra) if r else (None, {})

    under, extra = value("layers_under_threshold")
    hidden, hextra = value("min_hidden_sqnr_db")
    return {"layers": extra.get("layers"), "under_threshold": extra.get("under_threshold"), "worst": extra.get("worst"),
            "min_weight_sqnr_db": value("min_weight_sqnr_db")[0], "min_output_sqnr_db": value("min_output_sqnr_db")[0],
            "min_hidden_sqnr_db": hidden, "first_jump_block": hextra.get("first_jump_block"),
            "worst_block": hextra.get("worst_block")}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    data_dir = Path(os.environ["EVALSUITE_DATA_DIR"]) if os.environ.get("EVALSUITE_DATA_DIR") else None
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    loaded = load_model(os.environ.get("EVALSUITE_MODEL_FILE"), device=device, dtype=dtype)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": dtype_name,
              "model": loaded.info.name, "tokens": args.tokens, "seq_len": args.seq_len,
              "batch_tokens": args.batch_tokens, "torch": torch.__version__, "cases": []}

    def save():
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "layers.json").write_text(json.dumps(report, indent=1, default=str))

    for case in [c for c in args.cases.split(";") if c.strip()]:
        configs = {c.name: c for c in (parse_scheme(s.strip()) for s in case.split(","))}
        variants = {name: quantize_(copy.deepcopy(loaded.model), cfg) for name, cfg in configs.items()}
        warm_s, results = run_once(loaded, variants, configs, device, dtype, args, data_dir)
        times = [run_once(loaded, variants, configs, device, dtype, args, data_dir)[0] for _ in range(args.repeats)]
        entry = {"schemes": list(configs), "seconds_median": statistics.median(times), "seconds": times,
                 "first_run_s": warm_s, "calibration_tokens": results.details["layers"]["calibration"]["tokens"],
                 "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                 "variants": {v: summarize(results, v) for v in configs}}
        report["cases"].append(entry)
        save()
        print(f"{'+'.join(configs)}: {entry['seconds_median']:.3f} s median of {len(times)} "
              f"(first {warm_s:.2f} s) on {entry['calibration_tokens']} tokens")
        for v, s in entry["variants"].items():
            print(f"  {v}: {s['layers']} layers, under {s['under_threshold']}, worst {s['worst']}, min weight "
                  f"{s['min_weight_sqnr_db']:.1f} / output {s['min_output_sqnr_db']:.1f} / hidden "
                  f"{s['min_hidden_sqnr_db']:.1f} dB, error jumps at {s['first_jump_block']}")
        del variants

    # a planted fault must be named on the device too, in its dtype
    faulty = quantize_(copy.deepcopy(loaded.model), parse_scheme("int8-wo"))
    if PLANTED in dict(faulty.named_modules()):
        qmod, w = faulty.get_submodule(PLANTED), loaded.model.get_submodule(PLANTED).weight.float()
        scales = w.abs().amax(dim=1) / 127.5
        qmod.weight = torch.floor(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        qmod.scales = scales.to(qmod.scales.dtype)
        _, results = run_once(loaded, {"int8-wo": faulty}, {"int8-wo": parse_scheme("int8-wo")}, device, dtype, args,
                              data_dir)
        s = summarize(results, "int8-wo")
        report["planted_floor"] = {"layer": PLANTED, **s, "named": s["worst"] == PLANTED and s["under_threshold"] == [PLANTED]}
        save()
        print(f"planted floor-not-round in {PLANTED}: worst {s['worst']}, under {s['under_threshold']}"
              f" -> {'named' if report['planted_floor']['named'] else 'MISSED'}")

    first = report["cases"][0]
    print(f"\n| layers stage, {report['model']}, {'+'.join(first['schemes'])}, {first['calibration_tokens']} tokens "
          f"| {report['device']} {dtype_name} | {first['seconds_median']:.2f} s (target <= 3 s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
