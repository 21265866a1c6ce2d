"""Decode/prefill speed against the gpt-fast anchor and the device's copy-bandwidth roofline.

GPU (default): random Llama-2-7B-shaped weights in bf16, compiled decode (CUDA graphs) at batch 1,
200 tokens after a 5-token prompt, 5 timed samples, fp and ``int8-wo+head`` (the seed handler
quantizes the head too, so this is the anchor's variant), plus an eager 512-token prefill.
Anchor (H100, gpt-fast's own code): bf16 168.5 tok/s (2226 GB/s, 74% of 3012 GB/s copy),
int8 217.8 tok/s (1440 GB/s, 48%). Target: within 5% with CV < 2%.

    python3 benchmarks/bench_speed.py                       # the anchor comparison (about 5 min)
    python3 benchmarks/bench_speed.py --batch-sizes 1,8 --schemes int8-wo,int4-wo-g128,int8-dq
    python3 benchmarks/bench_speed.py --real                # the model under test ($EVALSUITE_MODEL_FILE)
    python3 benchmarks/bench_speed.py --quick               # tiny shape, seconds, works on CPU

Writes ``$OUT/speed.json`` (rewritten after every variant, so a timeout keeps what was measured) and
prints a summary and a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from evalsuite.measure import speed  # noqa: E402
from evalsuite.quantize import parse_schemes, quantize_  # noqa: E402
from evalsuite.results import Results  # noqa: E402

# (shape, variant, task) → (tokens/s, weight GB/s) measured with gpt-fast's own code on the H100
ANCHOR = {
    ("llama-2-7b", "fp", "decode_bs1"): (168.5, 2226.0),
    ("llama-2-7b", "int8-wo+head", "decode_bs1"): (217.8, 1440.0),
}
ANCHOR_COPY_GB_S = 3012.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, few tokens (CPU or GPU, seconds)")
    p.add_argument("--shape", default="llama-2-7b", help="named random-weight shape (default llama-2-7b)")
    p.add_argument("--real", action="store_true", help="time the real model ($EVALSUITE_MODEL_FILE or the default)")
    p.add_argument("--schemes", default="int8-wo+head", help="schemes besides fp, comma separated ('' for fp only)")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length, 0 to skip")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-prefill", action="store_true")
    p.add_argument("--no-int8-kernel", action="store_true", help="skip the Triton int8 GEMV variant (<scheme>@triton)")
    p.add_argument("--only", default="", help="time only these variants, comma separated (e.g. int8-wo+head@triton); "
                                              "the others are still built, not timed")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.tokens, args.repeats, args.prompt_len = "tiny", 16, 3, 32
        args.batch_sizes = "1,8"
        if args.schemes == "int8-wo+head":
            args.schemes = "int8-wo,int4-wo-g32,int8-dq"
    return args


def variants_source(args, configs, device, dtype):
    if not args.real:
        return lambda: speed.random_variants(args.shape, configs, device, dtype, seed=0), f"random:{args.shape}"
    import copy

    from evalsuite.load import load_model

    path = os.environ.get("EVALSUITE_MODEL_FILE") or None
    loaded = load_model(path, device=device, dtype=dtype)

    def gen():
        yield "fp", speed.as_decoder(loaded.model)
        for name, cfg in configs.items():
            yield name, speed.as_decoder(quantize_(copy.deepcopy(loaded.model), cfg))

    return gen, loaded.info.name


def summary_rows(results: Results, shape: str | None) -> list[dict]:
    rows = []
    copy_rec = results.get("speed", "device", "fp", "copy_bandwidth_gb_s")
    for rec in results.find(stage="speed", metric="tokens_per_s"):
        get = lambda m: results.get("speed", rec.task, rec.variant, m)  # noqa: E731
        val = lambda m: (get(m).value if get(m) is not None else None)  # noqa: E731
        row = {"variant": rec.variant, "task": rec.task, "tokens_per_s": rec.value, "cv": rec.extra.get("cv"),
               "min": rec.extra.get("min"), "max": rec.extra.get("max"), "compiled": rec.extra.get("compiled"),
               "compile_error": rec.extra.get("compile_error"),
               "weight_bandwidth_gb_s": val("weight_bandwidth_gb_s"), "roofline_fraction": val("roofline_fraction"),
               "compile_s": val("compile_s"), "peak_memory_gb": val("peak_memory_gb"),
               "model_size_gb": val("model_size_gb"), "speedup": val("speedup"),
               "speedup_ci95": get("speedup").ci95 if get("speedup") is not None else None,
               "copy_bandwidth_gb_s": copy_rec.value if copy_rec else None}
        if rec.variant.endswith(speed.FAST_SUFFIX) and rec.task == "decode_bs1" and row["roofline_fraction"]:
            row["stretch_65pct_of_copy"] = row["roofline_fraction"] >= 0.65
        anchor = ANCHOR.get((shape, rec.variant, rec.task))
        if anchor is not None:
            row["anchor_tokens_per_s"], row["anchor_gb_s"] = anchor
            row["vs_anchor"] = rec.value / anchor[0]
            row["within_5pct"] = abs(rec.value / anchor[0] - 1) <= 0.05
            row["cv_under_2pct"] = (rec.extra.get("cv") or 1.0) < 0.02
        rows.append(row)
    return rows


def fmt(x, spec=".1f", scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def print_summary(rows: list[dict], device_label: str) -> None:
    head = "| variant | task | tok/s (median) | cv % | min–max | weight GB/s | % of copy BW | compile s | peak GB | speedup [95% CI] |"
    print(f"\nspeed on {device_label}")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        ci = r["speedup_ci95"]
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        print(f"| {r['variant']} | {r['task']} | {fmt(r['tokens_per_s'])} | {fmt(r['cv'], '.2f', 100)} | "
              f"{fmt(r['min'])}–{fmt(r['max'])} | {fmt(r['weight_bandwidth_gb_s'], '.1f')} | "
              f"{fmt(r['roofline_fraction'], '.1f', 100)} | {fmt(r['compile_s'])} | {fmt(r['peak_memory_gb'], '.2f')} | {sp} |")
    for r in rows:
        if "vs_anchor" in r:
            print(f"anchor {r['variant']} {r['task']}: {r['tokens_per_s']:.1f} vs {r['anchor_tokens_per_s']} tok/s "
                  f"({100 * (r['vs_anchor'] - 1):+.1f}%), within 5%: {r['within_5pct']}, CV < 2%: {r['cv_under_2pct']}")
        if "stretch_65pct_of_copy" in r:
            print(f"stretch {r['variant']} {r['task']}: {100 * r['roofline_fraction']:.1f}% of copy bandwidth "
                  f"(target >= 65%): {r['stretch_65pct_of_copy']}")
        if r.get("compile_error"):
            print(f"compile failed for {r['variant']} {r['task']}: {r['compile_error']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CI box; CPU numbers test the mechanics only
    configs = {c.name: c for c in parse_schemes(args.schemes)} if args.schemes.strip() else {}
    compile = device.type == "cuda" and not args.no_compile
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        source, label = variants_source(args, configs, device, dtype)
        results = Results(run={"bench": "speed", "dtype": dtype_name, "torch": torch.__version__,
                               "settings": vars(args), "schemes": list(configs)})
        if not args.no_int8_kernel and device.type == "cuda":
            source = speed.with_fast_int8(source, dtype, results, device)
        if args.only:
            only, unfiltered = {v.strip() for v in args.only.split(",")}, source
            source = lambda: ((n, m) for n, m in unfiltered() if n in only)  # noqa: E731
        settings = speed.SpeedSettings(n_tokens=args.tokens, prompt_len=args.prompt_len,
                                       batch_sizes=speed.parse_batch_sizes(args.batch_sizes), repeats=args.repeats,
                                       warmup=max(args.warmup, 1 if compile else 0), compile=compile,
                                       model_label=label, compile_prefill=args.compile_prefill)
        device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        results.run["device"] = device_label
        out = Path(os.environ["OUT"]) / "speed.json" if os.environ.get("OUT") else None
        shape = None if args.real else args.shape

        def checkpoint():
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                payload = {"summary": summary_rows(results, shape), "anchor_copy_gb_s": ANCHOR_COPY_GB_S,
                           "wall_s": time.perf_counter() - t0, "results": results.to_dict()}
                out.write_text(json.dumps(payload, indent=1, default=str))

        speed.measure_variants(results, source, settings, device, checkpoint)
    checkpoint()
    print_summary(summary_rows(results, shape), f"{device_label} ({dtype_name}, {label}, compile={compile})")
    print(f"copy bandwidth: {results.get('speed', 'device', 'fp', 'copy_bandwidth_gb_s').value:.0f} GB/s "
          f"(anchor {ANCHOR_COPY_GB_S:.0f}); wall {time.perf_counter() - t0:.0f} s" + (f"; wrote {out}" if out else ""))
    for e in results.errors:
        print("error:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
