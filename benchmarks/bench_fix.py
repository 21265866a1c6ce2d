"""The fix suggestion against simple strategies at the same parameter budget, and its cost.

For each scheme: one ppl stage of fp + the scheme as ``evalsuite run`` does it (the cost unit), then
``evalsuite fix``'s sensitivity + search + verification (its set and its cost in ppl stages), then
each simple strategy given the same number of parameters to keep in fp, verified the same way on
the evaluation data:

- ``lowest-sqnr``: the layers with the lowest weight SQNR (fp weight vs dequantized), worst first;
- ``first-last``: whole blocks from both ends (0, N-1, 1, N-2, ...);
- ``random``: random layers (seeds 0, 1, 2).

Each adds layers until the next would exceed the budget (so it gets at most the fix's parameters).

    python3 benchmarks/bench_fix.py                                   # H200: SmolLM2, int4-wo-g128,g32
    python3 benchmarks/bench_fix.py --device cpu --limit 4 --context 256 --fix-tokens 512 \\
        --quant int4-wo-g32                                           # CPU smoke

Reads $EVALSUITE_MODEL_FILE (default: the installed SmolLM2) and $EVALSUITE_DATA_DIR; writes
``$OUT/fix.json`` and prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.benchutil import write_out  # noqa: E402
from evalsuite.app import fix  # noqa: E402
from evalsuite.app.session import measure_stages  # noqa: E402
from evalsuite.commands.cli import build_parser  # noqa: E402
from evalsuite.commands.run import config_from_args  # noqa: E402
from evalsuite.judge.config import load_gate_config  # noqa: E402
from evalsuite.load import load_model  # noqa: E402
from evalsuite.load.model import default_model_path  # noqa: E402
from evalsuite.measure import get_stage  # noqa: E402
from evalsuite.measure.context import RunContext  # noqa: E402
from evalsuite.measure.sensitivity import block_of, make_units, quantized_layer_names  # noqa: E402
from evalsuite.quantize import parse_scheme, quantize_  # noqa: E402
from evalsuite.results import Results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="int4-wo-g128,int4-wo-g32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--limit", type=int, help="evaluation windows (default: the whole WikiText-2 test)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--fix-tokens", type=int, default=4096)
    p.add_argument("--fix-budget", default="25%")
    p.add_argument("--fix-granularity", default="layer", choices=["layer", "block"])
    p.add_argument("--fix-rerank", type=int, default=8)
    p.add_argument("--no-strategies", action="store_true", help="only the fix and its cost")
    return p.parse_args(argv)


def weight_sqnr_db(fp_linear, q_linear) -> float:
    w = fp_linear.weight.float()
    err = w - q_linear.dequantize().float()
    return float(10 * torch.log10(w.pow(2).sum() / err.pow(2).sum().clamp_min(1e-30)))


def fill(order: list[tuple[str, int]], budget: int) -> list[str]:
    """Names from ``order`` ((pattern, params) pairs) while the running total stays within ``budget``."""
    out, used = [], 0
    for name, params in order:
        if used + params <= budget:
            out.append(name)
            used += params
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype_name = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model_path = Path(os.environ.get("EVALSUITE_MODEL_FILE") or default_model_path())
    data_dir = Path(os.environ.get("EVALSUITE_DATA_DIR", "data"))
    t = time.perf_counter()
    loaded = load_model(model_path, device=device, dtype=dtype)
    load_s = time.perf_counter() - t
    fp = loaded.model
    argv_run = ["run", "--model", str(model_path), "--quant", a.quant, "--stages", "ppl", "--ppl-context", str(a.context),
                "--fix-tokens", str(a.fix_tokens), "--fix-budget", a.fix_budget,
                "--fix-granularity", a.fix_granularity, "--fix-rerank", str(a.fix_rerank)]
    if a.limit:
        argv_run += ["--ppl-windows", str(a.limit)]
    args = config_from_args(build_parser("run").parse_args(argv_run), argv_run)
    fix.validate(args.fix, args.option("ppl_corpus"))
    config = load_gate_config()
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": dtype_name,
                 "load_s": load_s, "args": vars(a), "schemes": {}}
    rows = []
    for name in a.quant.split(","):
        cfg = parse_scheme(name)
        t = time.perf_counter()
        q = quantize_(copy.deepcopy(fp), cfg)
        quantize_s = time.perf_counter() - t
        results = Results(run={"argv": argv_run, "schemes": [name], "stages": ["ppl"], "dtype": dtype_name,
                               "limit": a.limit, "partial": a.limit is not None})

        def reload(new_dtype):
            return load_model(model_path, device=device, dtype=new_dtype).model

        ctx = RunContext(loaded=loaded, variants={"fp": fp, name: q}, configs={name: cfg}, device=device, dtype=dtype,
                         config=args, results=results, data_dir=data_dir, limit=a.limit, reload=reload,
                         show_progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            get_stage("ppl").run(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ppl_s = time.perf_counter() - t
        from evalsuite.judge.checks import finalize
        from evalsuite.judge.within import within_run_checks

        results.verdicts = [c.to_dict() for c in finalize(within_run_checks(results, config), config.strict)]
        before = {m: results.get("ppl", "wikitext2", name, m).value for m in ("kld_mean", "ppl_ratio")}
        fails = fix.failing_checks(results.verdicts)
        entry = {"quantize_s": quantize_s, "ppl_stage_s": ppl_s, "before": before,
                 "failing": [c["check"] for c in fails.get(name, [])]}
        out["schemes"][name] = entry
        print(f"{name}: ppl stage {ppl_s:.2f} s, KLD {before['kld_mean']:.4g}, ppl ratio {before['ppl_ratio']:.4g}, "
              f"failing {entry['failing']}", flush=True)
        if not fails:
            write_out("fix", out)
            continue
        out_dir = Path(os.environ.get("OUT", "/tmp")) / "bench_fix"
        t = time.perf_counter()
        details = fix.suggest(ctx, results, config, fails, out_dir, measure_stages)[name]
        fix_s = time.perf_counter() - t
        entry.update({"fix_s": fix_s, "fix_over_ppl_stage": fix_s / ppl_s, "fix": {
            k: details[k] for k in ("status", "set", "params_fraction", "params_restored", "bytes_extra", "predicted",
                                    "verified", "seconds", "stop_reason", "layers_restored", "command")}})
        v = details["verified"]["metrics"]
        rows.append([name, "evalsuite fix", details["layers_restored"], details["params_fraction"],
                     v["kld_mean"]["value"], v["ppl_ratio"]["value"], details["verified"]["verdict"]])
        print(f"  fix {fix_s:.2f} s = {fix_s / ppl_s:.2f} ppl stages; {details['seconds']}", flush=True)
        write_out("fix", out)
        if a.no_strategies:
            continue
        budget = details["params_restored"]
        layers = quantized_layer_names(q)
        units = {u.name: u.params for u in make_units(fp, layers)}
        sqnr = {n: weight_sqnr_db(fp.get_submodule(n), q.get_submodule(n)) for n in layers}
        blocks = list(dict.fromkeys(block_of(n) for n in layers))
        ends = [blocks[i // 2] if i % 2 == 0 else blocks[-1 - i // 2] for i in range(len(blocks))]
        block_params = {b: sum(units[n] for n in layers if block_of(n) == b) for b in blocks}
        strategies = {
            "lowest-sqnr": fill([(n, units[n]) for n in sorted(layers, key=sqnr.get)], budget),
            "first-last": [f"{b}.*" for b in fill([(b, block_params[b]) for b in dict.fromkeys(ends)], budget)],
        }
        for seed in range(3):
            order = layers[:]
            random.Random(seed).shuffle(order)
            strategies[f"random-{seed}"] = fill([(n, units[n]) for n in order], budget)
        entry["strategies"] = {}
        for sname, skip in strategies.items():
            t = time.perf_counter()
            verified, _, _ = fix._verify(ctx, results, config, name, skip, ["ppl"], out_dir / sname / name,
                                         "evalsuite run", measure_stages)
            params = sum(units[n] for n in layers if any(fnmatch.fnmatchcase(n, p) for p in skip))
            vm = verified["metrics"]
            entry["strategies"][sname] = {"skip": skip, "params": params, "verified": verified,
                                          "seconds": time.perf_counter() - t}
            total = sum(units.values())
            rows.append([name, sname, len(skip), params / total, vm["kld_mean"]["value"], vm["ppl_ratio"]["value"],
                         verified["verdict"]])
            print(f"  {sname}: {len(skip)} units, {params / total:.1%}, KLD {vm['kld_mean']['value']:.4g}, "
                  f"ppl ratio {vm['ppl_ratio']['value']:.4g}: {verified['verdict']}", flush=True)
            write_out("fix", out)
    print("\n| scheme | strategy | units kept in fp | of linear weights | KLD (eval) | ppl ratio (eval) | gate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1%} | {r[4]:.4g} | {r[5]:.4g} | {r[6]} |")
    out["table"] = rows
    write_out("fix", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
