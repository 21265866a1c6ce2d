"""Forward time of SmolLM2-135M (bf16) and its int8-wo copy with and without ``fast_forward`` (the fused
RMSNorm / rotary / SwiGLU kernels of ``evalsuite.load.fast_forward``):

    PYTHONPATH=. python3 benchmarks/bench_fast_forward.py

Shapes: the perplexity stage's 8 x 2048 tokens and a tasks-like 256 x 64. For each (variant, shape,
fused or eager): median and min milliseconds of one ``forward_logits`` call (CUDA events, after
warm-up calls that include Triton's compilation), the number of GPU kernels one forward launches and
their summed device time (torch.profiler, one forward), and the largest |logit difference| between
fused and eager with the eager logits' largest magnitude for scale. Model: $EVALSUITE_MODEL_FILE or
the installed SmolLM2. Writes ``$OUT/fast_forward.json`` when $OUT is set. ``--quick`` runs a tiny
random Llama on small shapes and also works on a CPU (where fast_forward patches nothing unless
Triton's interpreter is on).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from benchutil import timed_ms, write_out  # noqa: E402

from evalsuite.load import fast_forward as ff  # noqa: E402
from evalsuite.load import forward_logits  # noqa: E402
from evalsuite.quantize import parse_schemes, quantize_  # noqa: E402


def kernel_profile(fn, device: torch.device) -> dict:
    """GPU kernels launched by one ``fn()`` and their summed device time (ms); empty on a CPU."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as e:  # the timings above stand without the profile
        return {"profile_error": f"{type(e).__name__}: {e}"}
    return {"kernels": len(kernels), "kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3}


def load(args, device: torch.device):
    if args.quick:
        from tests.conftest import make_tiny_llama

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return make_tiny_llama(vocab_size=512, hidden=128, layers=4).to(device=device, dtype=dtype), dtype, "tiny-llama"
    from evalsuite.load import default_model_path, load_model

    path = Path(os.environ["EVALSUITE_MODEL_FILE"]) if os.environ.get("EVALSUITE_MODEL_FILE") else default_model_path()
    return load_model(path, device=device, dtype=torch.bfloat16).model, torch.bfloat16, path.name


def bench_variant(model, shape: tuple[int, int], vocab: int, device: torch.device, warmup: int, repeat: int) -> dict:
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(device)

    def forward():
        return forward_logits(model, ids)

    out: dict = {}
    with torch.inference_mode():
        eager_logits = forward()
        out["eager"] = {**timed_ms(forward, device, repeat, warmup), **kernel_profile(forward, device)}
        with ff.fast_forward(model) as patched:
            fused_logits = forward()
            out["fused"] = {**timed_ms(forward, device, repeat, warmup), **kernel_profile(forward, device)}
        out["patched_modules"] = patched
        out["max_abs_logit_diff"] = float((fused_logits.float() - eager_logits.float()).abs().max())
        out["max_abs_logit"] = float(eager_logits.float().abs().max())
        del eager_logits, fused_logits
    out["speedup"] = out["eager"]["median_ms"] / out["fused"]["median_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, small shapes (CPU ok)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(min(torch.get_num_threads(), 4))

    t0 = time.perf_counter()
    model, dtype, name = load(args, device)
    load_s = time.perf_counter() - t0
    variants = {"fp": model, "int8-wo": quantize_(copy.deepcopy(model), parse_schemes("int8-wo")[0])}
    shapes = [(2, 64), (8, 16)] if args.quick else [(8, 2048), (256, 64)]
    vocab = model.config.vocab_size
    results = {"model": name, "dtype": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name()
               if device.type == "cuda" else "cpu", "triton": ff.HAVE_TRITON, "interpret": ff.INTERPRET,
               "load_s": load_s, "runs": {}}
    for vname, m in variants.items():
        for shape in shapes:
            key = f"{vname}@{shape[0]}x{shape[1]}"
            r = bench_variant(m, shape, vocab, device, args.warmup, args.repeat)
            results["runs"][key] = r
            eager, fused = r["eager"], r["fused"]
            print(f"{key:>18}: eager {eager['median_ms']:8.2f} ms  fused {fused['median_ms']:8.2f} ms  "
                  f"x{r['speedup']:.2f}  kernels {eager.get('kernels', '-')} -> {fused.get('kernels', '-')}  "
                  f"kernel ms {eager.get('kernel_ms', 0.0):.2f} -> {fused.get('kernel_ms', 0.0):.2f}  "
                  f"patched {r['patched_modules']}  max|dlogit| {r['max_abs_logit_diff']:.3g} "
                  f"(of {r['max_abs_logit']:.3g})")
    results["total_s"] = time.perf_counter() - t0
    print(f"total {results['total_s']:.1f} s (load {load_s:.1f} s)")
    write_out("fast_forward", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
