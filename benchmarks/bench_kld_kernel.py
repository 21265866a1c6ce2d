"""Microbenchmark of the ppl stage's per-token statistics: torch ``paired_token_stats`` (two float32
log-softmax matrices, several passes) against the one-pass Triton kernel of
``evalsuite.kernels.kld``, on 16384 tokens x 49152 logits (SmolLM2's vocabulary) in bf16:

    PYTHONPATH=. python3 benchmarks/bench_kld_kernel.py

Prints milliseconds (median of ``--repeat`` CUDA-event timings after a warm-up that includes Triton's
autotuning), the fused kernel's achieved bandwidth (bytes of both logit matrices read once / time;
an H100's HBM3 peaks near 3.35 TB/s), the largest differences from torch, and an estimate for the
WikiText-2 pass (152 windows x 2047 scored tokens: rows x time per row). A 128k vocabulary is timed
too. Writes ``$OUT/kld_kernel.json`` when $OUT is set. ``--quick`` (small shapes) also runs on a CPU,
where only torch is timed unless Triton's interpreter is on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from benchutil import timed_ms, write_out  # noqa: E402

from evalsuite.kernels import kld as K  # noqa: E402
from evalsuite.measure import perplexity as P  # noqa: E402

WIKITEXT2_ROWS = 152 * 2047


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def case(n: int, v: int, device: torch.device, repeat: int, with_torch: bool = True) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    ref = (torch.randn(n, v, device=device, generator=g) * 3).bfloat16()
    cand = (ref.float() + 0.1 * torch.randn(n, v, device=device, generator=g)).bfloat16()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    nbytes = 2 * ref.numel() * ref.element_size()
    out: dict = {"tokens": n, "vocab": v, "dtype": "bfloat16", "bytes_read": nbytes}
    if with_torch:
        out["torch"] = timed_ms(lambda: P.paired_token_stats(ref, cand, targets), device, repeat)
    if K.fused_applies(ref):
        out["fused"] = timed_ms(lambda: K.fused_paired_token_stats(ref, cand, targets), device, repeat)
        out["fused_token_nll"] = timed_ms(lambda: K.fused_token_nll(cand, targets), device, max(1, repeat))
        ms = out["fused"]["median_ms"]
        out["fused_gb_s"] = nbytes / ms / 1e6
        out["fused_token_nll_gb_s"] = nbytes / 2 / out["fused_token_nll"]["median_ms"] / 1e6
        best = getattr(getattr(K, "_row_stats_tuned", None), "best_config", None)
        out["best_config"] = str(best) if best is not None else "interpreter"
        if with_torch:
            out["speedup"] = out["torch"]["median_ms"] / ms
            got, want = K.fused_paired_token_stats(ref, cand, targets), P.paired_token_stats(ref, cand, targets)
            out["max_abs_diff"] = {k: float((got[k] - want[k]).abs().nan_to_num().max()) for k in want}
            del got, want
        out["wikitext2_estimate_ms"] = ms / n * WIKITEXT2_ROWS
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU-feasible)")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: run with --quick (small shapes) or on a GPU")
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)
    shapes = [(64, 1000)] if args.quick else [(16384, 49152), (4096, 128256)]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton_version(),
           "quick": args.quick, "cases": []}
    for n, v in shapes:
        r = case(n, v, device, 1 if args.quick else args.repeat)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["cases"].append(r)
        line = f"{n} x {v} bf16: torch {r['torch']['median_ms']:.2f} ms"
        if "fused" in r:
            line += (f", fused {r['fused']['median_ms']:.3f} ms ({r['fused_gb_s']:.0f} GB/s, x{r['speedup']:.1f}; "
                     f"token_nll {r['fused_token_nll']['median_ms']:.3f} ms, {r['fused_token_nll_gb_s']:.0f} GB/s), "
                     f"WikiText-2 pass est. {r['wikitext2_estimate_ms']:.1f} ms; {r['best_config']}; "
                     f"max |diff| kld {r['max_abs_diff']['kld']:.2e} nll {r['max_abs_diff']['nll']:.2e}")
        print(line, flush=True)
    write_out("kld_kernel", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
