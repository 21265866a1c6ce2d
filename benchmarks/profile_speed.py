"""Where the speed stage's time goes: one variant's compiled decode in two fresh processes on one cache.

    source .gpu/env.sh && python3 benchmarks/profile_speed.py            # one GPU, ~2.5 min
    python3 benchmarks/profile_speed.py --variant int8-wo                # a scheme's decode instead of fp

The first process compiles on empty caches (as on a fresh machine), the second on the Inductor,
AOTAutograd and Triton caches the first left in ``$EVALSUITE_CACHE`` (as a second run on the same
machine). Each times, as the speed stage does (``measure.speed.decode_run``: bs 1, the default
tokens, 5 samples after 1 warm-up), its process start and imports, the model load, the warm-up
sample (compilation + one run), the timed samples, the eager prefill, the stored-program record
(``program_cache``: key, hit or miss, Inductor's cache counters); and prints Dynamo's own
compile-phase table (``torch._dynamo.utils.compile_times``). Writes ``$OUT/profile_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(variant: str, device_name: str = "cuda") -> dict:
    t_start = time.perf_counter()
    import torch

    from evalsuite.load.model import load_model
    from evalsuite.measure import speed
    from evalsuite.measure.compile_cache import cache_counters
    from evalsuite.quantize import parse_schemes, quantize_

    t_imports = time.perf_counter() - t_start
    device = torch.device(device_name)
    t0 = time.perf_counter()
    loaded = load_model(os.environ.get("EVALSUITE_MODEL_FILE"), device=device, dtype=torch.bfloat16)
    model = loaded.model
    if variant != "fp":
        (cfg,) = parse_schemes(variant)
        model = quantize_(model, cfg)
    decoder = speed.as_decoder(model)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = speed.decode_run(decoder, 1, speed.GPU_DEFAULT_TOKENS if device.type == "cuda" else 8, 5, 1,
                         device.type == "cuda", device)
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = speed.prefill_run(decoder, 512 if device.type == "cuda" else 32, 5, 1, False, device)
    t_prefill = time.perf_counter() - t0
    return {"imports_s": round(t_imports, 2), "load_s": round(t_load, 2), "load_phases": loaded.info.extra.get("seconds"),
            "decode_wall_s": round(t_decode, 2), "decode_warmup_s": r.warmup_s, "decode_samples_s": r.samples_s,
            "compiled": r.compiled, "compile_error": r.compile_error, "prefill_wall_s": round(t_prefill, 2), "prefill_samples_s": pre.samples_s,
            "compile_cache": cache_counters(), "program_cache": r.compile_cache, "dynamo_compile_times": torch._dynamo.utils.compile_times(repr="str")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="fp", help="fp or a scheme name (default fp)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu checks the script, eager and short")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.variant, args.device), default=str), flush=True)
        return 0
    from benchutil import write_out

    env = {**os.environ, "EVALSUITE_CACHE": os.environ.get("PROFILE_CACHE") or tempfile.mkdtemp(prefix="evalsuite-prof-")}
    report = {"variant": args.variant, "cache": env["EVALSUITE_CACHE"], "processes": []}
    for label in ("empty caches", "caches of the first process"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", "--variant", args.variant, "--device", args.device], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=540)
        wall = round(time.perf_counter() - t0, 2)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        got = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr.strip().splitlines()[-3:]}
        row = {"label": label, "process_wall_s": wall, "exit": proc.returncode, **got}
        report["processes"].append(row)
        table = row.pop("dynamo_compile_times", "")
        print(json.dumps(row, default=str), flush=True)
        print(table, flush=True)
        row["dynamo_compile_times"] = table
    write_out("profile_speed", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
