"""Batch-1 int8 weight-only GEMV variants on Llama-2-7B's linear shapes, against the copy roofline.

For every variant of ``evalsuite.kernels.int8_gemv`` and every tile of its autotune space, on the
shapes the speed stage's llama-2-7b decoder runs (gpt-fast fuses q/k/v into ``wqkv``; w1 and w3 are
separate; the head is int8 in ``int8-wo+head``):

- time per call: median over 5 replays of a CUDA graph of back-to-back calls that cycle through
  enough weight copies (>= 256 MiB) that no call finds its weight in L2, as in decoding;
- GB/s counting int8 weight + bf16 scales + x + y bytes once, next to the device's copy bandwidth
  (1 GiB ``copy_``, read + write counted, as the speed stage measures it);
- max |y - exact| / max |exact| against float32 ``F.linear(x, w) * scales`` and against the seed's
  ``F.linear(x, w.to(bf16)) * scales``; a tile is ``ok`` within one bf16 ulp of the exact result;
- the GEMV part of one decode step: sum over layers of each shape's best tile (per variant, and the
  best of all variants per shape), its weight GB/s and % of copy bandwidth. cuBLAS bf16 (the fp
  path's GEMV) is timed the same way for comparison. The whole decode stays in bench_speed.py
  (``EVALSUITE_GEMV_VARIANT=<name> python3 benchmarks/bench_speed.py``).

    python3 benchmarks/bench_gemv.py            # all variants and tiles (about 30-50 s on an H100)
    python3 benchmarks/bench_gemv.py --compile-check   # + each variant under torch.compile + CUDA graphs
    python3 benchmarks/bench_gemv.py --quick    # two shapes, three tiles a variant; on CPU under
                                                # TRITON_INTERPRET=1 only the correctness checks

Writes ``$OUT/gemv.json`` when $OUT is set. ``--budget-s`` stops sweeping tiles once the script has
run that long (what was not measured is listed as skipped), so a time limit never loses the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from evalsuite.measure import speed  # noqa: E402
from evalsuite.kernels import int8_gemv as kernels  # noqa: E402

# (name, N, K, calls per llama-2-7b decode step): 32 layers, int8 head
SHAPES = [("wqkv", 12288, 4096, 32), ("wo", 4096, 4096, 32), ("w1|w3", 11008, 4096, 64),
          ("w2", 4096, 11008, 32), ("output", 32000, 4096, 1)]
ROTATE_BYTES = 256 << 20
# baseline first, then the likeliest winners, so a budget cut loses the least useful sweeps
ORDER = ["base", "magic", "word", "splitk", "wide"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, three tiles per variant (CPU: correctness only)")
    p.add_argument("--variants", default=",".join(ORDER), help="comma separated, from " + ",".join(kernels.VARIANTS))
    p.add_argument("--budget-s", type=float, default=45.0, help="stop starting new tiles after this many seconds")
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--verbose", action="store_true", help="print every tile's time (the JSON has them all)")
    p.add_argument("--no-cublas", action="store_true", help="skip the cuBLAS bf16 comparison")
    p.add_argument("--compile-check", action="store_true",
                   help="also run each variant's autotuned path inside torch.compile(mode='reduce-overhead', "
                        "fullgraph=True) on the wo shape and compare with eager (a graph break fails it)")
    return p.parse_args(argv)


def payload_bytes(n: int, k: int, elem: int = 1) -> int:
    """Bytes a batch-1 call must move: weight (``elem`` bytes each), bf16 scales, x and y, once."""
    return n * k * elem + 2 * n + 2 * k + 2 * n


def make_problem(n: int, k: int, device: torch.device, copies: int, seed: int = 0):
    """``copies`` random int8 weights [N, K] with llama-like bf16 scales (absmax / 127.5 of N(0, 0.02)
    rows), and one bf16 row x."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ws = [torch.randint(-128, 128, (n, k), generator=gen, device=device, dtype=torch.int8) for _ in range(copies)]
    s = (torch.rand(n, generator=gen, device=device) * 2e-4 + 4e-4).to(torch.bfloat16)
    x = torch.randn(k, generator=gen, device=device).to(torch.bfloat16)
    return ws, s, x


def references(w: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 ``F.linear(x, w) * s`` and the seed's bf16 forward ``F.linear(x, w.to(bf16)) * s``."""
    exact = F.linear(x.float()[None], w.float())[0] * s.float()
    return exact, (F.linear(x[None], w.to(x.dtype)) * s)[0].float()


def errors(y: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Max |y - ref| / max |exact| against both references; ``ok`` within one bf16 ulp of exact."""
    exact, seed = refs
    scale = exact.abs().max().clamp(min=1e-30)
    err = float((y.float() - exact).abs().max() / scale)
    return {"rel_err_vs_exact": err, "rel_err_vs_seed_ref": float((y.float() - seed).abs().max() / scale),
            "seed_ref_rel_err_vs_exact": float((seed - exact).abs().max() / scale),
            "ok": err <= torch.finfo(torch.bfloat16).eps}


def graph_time_us(call, n_calls: int, replays: int) -> float:
    """Median microseconds per call of a CUDA graph holding ``n_calls`` calls ``call(i)``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):  # compile / warm outside the capture
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    del graph
    return statistics.median(times)


def tile_name(cfg: dict) -> str:
    return f"n{cfg['BLOCK_N']}k{cfg['BLOCK_K']}w{cfg['num_warps']}s{cfg.get('num_stages', 1)}" + ("p" if cfg.get("PREFETCH") else "")


def sweep(args, device, copy_gb_s: float, t0: float) -> tuple[list[dict], list[dict]]:
    shapes = SHAPES[1:3] if args.quick else SHAPES
    variants = [kernels.check_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    rows, skipped = [], []
    for name, n, k, count in shapes:
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k)))
        ws, s, x = make_problem(n, k, device, copies)
        refs = references(ws[0], s, x)
        n_calls = max(copies, 24 // copies * copies)
        nbytes = payload_bytes(n, k)
        base = {"shape": name, "N": n, "K": k, "calls_per_step": count, "bytes": nbytes, "copies": copies}
        if not args.no_cublas:
            wb = [w.to(torch.bfloat16) for w in ws]
            us = graph_time_us(lambda i: F.linear(x, wb[i % copies]), n_calls, args.replays)
            rows.append({**base, "variant": "cublas-bf16", "tile": "-", "us": us, "bytes": payload_bytes(n, k, 2),
                         "gb_s": payload_bytes(n, k, 2) / us / 1e3, "copy_fraction": payload_bytes(n, k, 2) / us / 1e3 / copy_gb_s})
            del wb
        for variant in variants:
            tiles = kernels.variant_configs(variant)[:3] if args.quick else kernels.variant_configs(variant)
            for cfg in tiles:
                row = {**base, "variant": variant, "tile": tile_name(cfg), "config": cfg}
                if time.perf_counter() - t0 > args.budget_s:
                    skipped.append(row)
                    continue
                try:
                    call = lambda i: kernels.int8_gemv_config(x, ws[i % copies], s, None, variant, cfg)  # noqa: E731
                    row.update(errors(call(0), refs))
                    row["us"] = graph_time_us(call, n_calls, args.replays)
                    row["gb_s"] = nbytes / row["us"] / 1e3
                    row["copy_fraction"] = row["gb_s"] / copy_gb_s
                except Exception as e:  # a tile that fails to compile or launch is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                if args.verbose:
                    print(f"{name:7s} {variant:11s} {row['tile']:16s} "
                          + (f"{row['us']:8.2f} us {row['gb_s']:7.0f} GB/s {100 * row['copy_fraction']:5.1f}% "
                             f"err {row['rel_err_vs_exact']:.2e} {'ok' if row['ok'] else 'BAD'}"
                             if "us" in row else row.get("error", "")), flush=True)
        print(f"{name} done at {time.perf_counter() - t0:.1f} s", flush=True)
        ws = refs = None  # free this shape's copies before the next shape's
        torch.cuda.empty_cache()
    return rows, skipped


def compile_check(args, device) -> list[dict]:
    """Each variant's ``int8_gemv`` (autotuned) as the speed stage runs it: compiled with CUDA graphs
    and fullgraph, so a graph break is an error; the compiled output must equal the eager one."""
    n, k = 4096, 4096
    ws, s, x = make_problem(n, k, device, 1, seed=1)
    refs = references(ws[0], s, x)
    out = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        row = {"variant": variant}
        t = time.perf_counter()
        try:
            fn = torch.compile(lambda a, v=variant: kernels.int8_gemv(a * 1, ws[0], s, None, variant=v) + 0,
                               mode="reduce-overhead", fullgraph=True)
            eager = kernels.int8_gemv(x, ws[0], s, None, variant=variant)
            for _ in range(3):  # CUDA graphs record on a later call
                y = fn(x).clone()
            row.update(errors(y, refs), equal_to_eager=bool(torch.equal(y, eager)))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["seconds"] = time.perf_counter() - t
        print(f"compile-check {variant:7s} " + (row.get("error") or
              f"equal to eager: {row['equal_to_eager']}, err {row['rel_err_vs_exact']:.2e}") + f" ({row['seconds']:.1f} s)",
              flush=True)
        out.append(row)
    return out


def decode_step(rows: list[dict], copy_gb_s: float) -> list[dict]:
    """GEMV time of one decode step per variant: each shape at its fastest correct tile, times the
    number of calls per step; plus ``best-of-all`` taking the fastest variant per shape."""
    good = [r for r in rows if "us" in r and r.get("ok", True)]
    shapes = {r["shape"] for r in rows}
    out = []
    for variant in [*dict.fromkeys(r["variant"] for r in good), "best-of-all"]:
        best = {}
        for r in good:
            if (variant == "best-of-all" and r["variant"] != "cublas-bf16") or r["variant"] == variant:
                if r["shape"] not in best or r["us"] < best[r["shape"]]["us"]:
                    best[r["shape"]] = r
        if set(best) != shapes:
            continue
        us = sum(r["us"] * r["calls_per_step"] for r in best.values())
        nbytes = sum(r["bytes"] * r["calls_per_step"] for r in best.values())
        out.append({"variant": variant, "gemv_ms_per_step": us / 1e3, "gb_s": nbytes / us / 1e3,
                    "copy_fraction": nbytes / us / 1e3 / copy_gb_s,
                    "tiles": {s: f"{r['variant']}:{r['tile']}" for s, r in best.items()}})
    return out


def cpu_check(args) -> dict:
    """Without CUDA: every variant's default path on small odd shapes, against exact float32."""
    if not (kernels.HAVE_TRITON and kernels.INTERPRET):
        print("no CUDA and no Triton interpreter (TRITON_INTERPRET=1): nothing to measure")
        return {"skipped": "no CUDA and no Triton interpreter"}
    rows = []
    for n, k in ((37, 300), (70, 1032)):
        ws, s, x = make_problem(n, k, torch.device("cpu"), 1)
        for v in kernels.VARIANTS:
            y = kernels.int8_gemv(x, ws[0], s, None, variant=v)
            r = {"N": n, "K": k, "variant": v, **errors(y, references(ws[0], s, x))}
            # the interpreter truncates to bf16 where CUDA rounds to nearest: one ulp, not half
            rows.append(r)
            print(f"interpreter N={n} K={k} {v:7s} err {r['rel_err_vs_exact']:.2e} {'ok' if r['ok'] else 'BAD'}")
    return {"interpreter_rows": rows}


def print_summary(steps: list[dict], rows: list[dict], copy_gb_s: float) -> None:
    print("\n| shape | variant | best tile | us | GB/s | % of copy BW | max rel err vs exact | vs seed ref |")
    print("|---|---|---|---|---|---|---|---|")
    best: dict[tuple, dict] = {}
    for r in rows:
        if "us" in r and r.get("ok", True) and ((r["shape"], r["variant"]) not in best or r["us"] < best[r["shape"], r["variant"]]["us"]):
            best[r["shape"], r["variant"]] = r
    for r in best.values():
        err = f"{r['rel_err_vs_exact']:.2e} | {r['rel_err_vs_seed_ref']:.2e}" if "rel_err_vs_exact" in r else "- | -"
        print(f"| {r['shape']} | {r['variant']} | {r['tile']} | {r['us']:.2f} | {r['gb_s']:.0f} | "
              f"{100 * r['copy_fraction']:.1f} | {err} |")
    print(f"\ncopy bandwidth {copy_gb_s:.0f} GB/s; GEMV part of one llama-2-7b decode step (int8-wo+head):")
    print("| variant | GEMV ms/step | weight GB/s | % of copy BW | tiles |")
    print("|---|---|---|---|---|")
    for st in steps:
        print(f"| {st['variant']} | {st['gemv_ms_per_step']:.3f} | {st['gb_s']:.0f} | {100 * st['copy_fraction']:.1f} | "
              + ", ".join(f"{k}={v}" for k, v in st["tiles"].items()) + " |")
    bad = [r for r in rows if "us" in r and not r.get("ok", True)]
    failed = [r for r in rows if "error" in r]
    for r in bad:
        print(f"NOT OK: {r['shape']} {r['variant']} {r['tile']} rel err {r['rel_err_vs_exact']:.3g}")
    for r in failed:
        print(f"FAILED: {r['shape']} {r['variant']} {r['tile']}: {r['error']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(os.environ["OUT"]) / "gemv.json" if os.environ.get("OUT") else None
    payload: dict = {"bench": "gemv", "torch": torch.__version__, "settings": vars(args)}
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
        payload.update(device="cpu", **cpu_check(args))
    elif not kernels.HAVE_TRITON:
        payload.update(device=torch.cuda.get_device_name(), skipped="Triton is not installed")
        print(payload["skipped"])
    else:
        import triton

        device = torch.device("cuda")
        copy_gb_s = statistics.median(speed.copy_bandwidth_samples(device))
        payload.update(device=torch.cuda.get_device_name(), triton=triton.__version__, copy_bandwidth_gb_s=copy_gb_s,
                       sm_count=torch.cuda.get_device_properties(device).multi_processor_count)
        print(f"{payload['device']}: copy bandwidth {copy_gb_s:.0f} GB/s, triton {triton.__version__}", flush=True)
        with torch.no_grad():
            rows, skipped = sweep(args, device, copy_gb_s, t0)
        if args.compile_check:
            payload["compile_check"] = compile_check(args, device)
        steps = decode_step(rows, copy_gb_s)
        payload.update(rows=rows, skipped=[f"{r['shape']} {r['variant']} {r['tile']}" for r in skipped],
                       decode_step=steps)
        print_summary(steps, rows, copy_gb_s)
        if skipped:
            print(f"skipped {len(skipped)} tiles past --budget-s {args.budget_s:.0f}")
    payload["wall_s"] = time.perf_counter() - t0
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wall {payload['wall_s']:.1f} s" + (f"; wrote {out}" if out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
