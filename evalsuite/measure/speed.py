"""Stage speed: decode and prefill throughput, weight bandwidth against the device's measured copy
bandwidth (the roofline), with the dispersion of every number.

Definitions (each record repeats its own):

- ``tokens_per_s`` (decode_bsB): ``B * n_tokens / t`` where ``t`` is the wall time of ``n_tokens``
  cached greedy decoding steps at batch ``B`` after a short prompt; the prompt's prefill is not timed.
  (prefill_L): ``L / t`` for one forward of an ``L``-token prompt at batch 1 into an empty KV cache.
  The value is the median over ``repeats`` timed samples taken after ``warmup`` untimed ones; extra
  holds min, max, mean, cv (sample std / mean) and the samples.
- ``weight_bandwidth_gb_s``: weight bytes read per decoding step × steps/s / 1e9. Bytes are counted
  from the actual tensors of every module except embedding tables (a lookup reads one row), each
  storage once (a head tied to the embeddings is counted once, as the head reads it all). KV-cache
  reads are not counted (gpt-fast's convention). Dense models only: every weight is read each step.
- ``copy_bandwidth_gb_s`` (task ``device``): ``2 * bytes / t`` of a large device-to-device copy
  (each byte read once and written once), the practical roofline of a memory-bound decode.
- ``roofline_fraction``: weight_bandwidth_gb_s / copy_bandwidth_gb_s, both medians of this run.
- ``compile_s``: wall time of the first (warm-up) sample of a compiled run: compilation plus one run,
  as the gpt-fast benchmark reports it. Only for compiled runs.
- ``peak_memory_gb``: this variant's weights plus the peak extra device memory allocated while it ran
  (KV cache, activations, CUDA-graph pools); on CPU an estimate: weights plus KV cache.
- ``model_size_gb``: the counted weight bytes / 1e9 (the bytes a decoding step reads).
- ``speedup`` (variant = scheme): median tokens/s of the scheme / median tokens/s of fp, with a 95%
  bootstrap interval from resampling each variant's samples; its width is the timing noise.

CPU numbers are labelled ``device_type: cpu`` and are for testing the mechanics only.

Compilation, once a machine. Compiling gpt-fast's decode step (``mode="reduce-overhead"``) is most
of the stage on a GPU, and without help every process pays it again. Each compiled run is keyed by
what its program depends on (torch and Triton versions, the device's name, the model's structure:
every module's class and every tensor's name, shape, dtype and class, so the scheme too; the
variant; batch and KV-cache length or prompt length; compile mode and Inductor settings), and
PyTorch's own mega-cache (``torch.compiler.save_cache_artifacts`` after the first compile,
``load_cache_artifacts`` before the next: FX graphs, AOTAutograd results, autotuning choices,
Triton kernels) is kept as one file a key, ``$EVALSUITE_CACHE/compile/<key>.bin`` beside a JSON
manifest holding its parts and hash (``compile_cache.compiled_program``). A later process on the
same machine, or a fresh one given the folder, loads it and compiles from Inductor's cache instead
of from scratch; ``run.speed.compile_cache[variant][task]`` says per run: key, ``hit``/``miss``
(``corrupt``: failed its hash, recomputed), Inductor's own cache hits and misses, ``compile_s``
(the first warm-up sample: the compilation left plus one run). Dynamo still traces in every process
(seconds; the mega-cache keeps what comes after tracing).

Coordinate-descent tuning stays on (``--no-speed-tuning`` turns it off), as gpt-fast runs it, so that
tokens/s stay comparable with gpt-fast's figures and with baselines measured so; what it costs is
paid once a machine rather than every process: its choices go to Inductor's local autotune cache
(``autotune_local_cache``, on) and into the stored mega-cache, and a kernel whose choice is found
there is not tuned again. Turning it off by default would save the first run its ~5 s on an H100
but change every absolute tokens/s a baseline holds. Still to measure on a GPU (torch 2.11,
``benchmarks/gpu_whole.sh runs``): the profile before this change saw 18 of 24 kernels tuned again
in a second process; whether the stored choices now stop that, and the second run's speed stage.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.load import gptfast
from evalsuite.measure import Stage
from evalsuite.stats import percentile_ci

STAGE_NAME = "speed"
DECODE_PROMPT_LEN = 5  # the anchor's prompt length before decoding
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 25}
CPU_DEFAULT_TOKENS = 32
GPU_DEFAULT_TOKENS = 200
# --limit on a CPU (the smoke suite's case): a short check of the mechanics, not a measurement; every
# record is still made from real samples, only fewer (2 the fewest a dispersion needs) and, eager, no
# warm-up (nothing is compiled, so the first call has nothing to hide)
CPU_LIMIT_TOKENS, CPU_LIMIT_PROMPT_LEN, CPU_LIMIT_REPEATS = 4, 32, 2
CPU_NOTE = ("CPU speed numbers are indicative only (shared cores, eager decoding); "
            "time on the target GPU for numbers to compare")


# ---------------------------------------------------------------------------- statistics and timing

def dispersion(values) -> dict[str, Any]:
    """median, min, max, mean and coefficient of variation (sample std / mean) of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no samples")
    mean = float(v.mean())
    cv = float(v.std(ddof=1) / mean) if v.size > 1 and mean != 0 else math.nan
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "mean": mean,
            "cv": cv, "n": int(v.size)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
                 tick: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones: (samples, warm-up times).

    On CUDA each sample is bracketed by events on the current stream (the device's own clock,
    read after a synchronize); elsewhere by ``perf_counter`` around a synchronised call.
    """
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        warm.append(time.perf_counter() - t0)
        tick()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        tick()
    return samples, warm


def copy_bandwidth_samples(device: torch.device, nbytes: int | None = None, repeats: int = 10,
                           warmup: int = 2) -> list[float]:
    """GB/s of ``dst.copy_(src)`` for ``nbytes``-byte buffers, counted as 2 * nbytes (read + write)."""
    nbytes = nbytes or COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds, _ = time_samples(lambda: dst.copy_(src), device, repeats, warmup)
    del src, dst
    return [2 * nbytes / s / 1e9 for s in seconds]


def speedup_interval(fp_tps, scheme_tps, n_boot: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """median(scheme)/median(fp) and its 95% bootstrap interval (each variant's samples resampled)."""
    a = np.asarray(fp_tps, dtype=np.float64)
    b = np.asarray(scheme_tps, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ra = np.median(a[rng.integers(0, a.size, (n_boot, a.size))], axis=1)
    rb = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
    return float(np.median(b) / np.median(a)), percentile_ci(rb / ra)


# ---------------------------------------------------------------------------- byte counting

def weight_bytes(model: nn.Module) -> int:
    """Bytes a dense decoding step reads: every persistent parameter and buffer of every module
    except embedding tables, each storage counted once (see the module docstring)."""
    return _unique_bytes(m for m in model.modules() if not isinstance(m, nn.Embedding))


def total_tensor_bytes(model: nn.Module) -> int:
    """All persistent parameters and buffers, embeddings included, each storage once."""
    return _unique_bytes(model.modules())


def _unique_bytes(modules) -> int:
    seen: set = set()
    total = 0
    for mod in modules:
        for t in _persistent_tensors(mod):
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _persistent_tensors(mod: nn.Module):
    for p in mod._parameters.values():
        if p is not None:
            yield from _storage_tensors(p)
    for name, b in mod._buffers.items():
        if b is not None and name not in mod._non_persistent_buffers_set:
            yield from _storage_tensors(b)


def _storage_tensors(t: torch.Tensor):
    """``t``, or the tensors a wrapper subclass (torchao's quantized weights) holds its data in."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        yield t
        return
    for attr in flatten()[0]:
        inner = getattr(t, attr)
        if isinstance(inner, torch.Tensor):
            yield from _storage_tensors(inner)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


# ---------------------------------------------------------------------------- the runs

@dataclass
class RunResult:
    """One (variant, task) measurement: per-sample seconds and what produced them."""

    task: str
    batch: int
    tokens_per_sample: int  # tokens processed per sample (batch included)
    steps_per_sample: int  # forward passes per sample (weights read once each)
    samples_s: list[float]
    warmup_s: list[float]
    compiled: bool
    compile_error: str | None = None
    peak_extra_bytes: int | None = None
    kv_cache_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    compile_cache: dict[str, Any] | None = None  # compile_cache.compiled_program's record

    @property
    def tokens_per_s(self) -> list[float]:
        return [self.tokens_per_sample / s for s in self.samples_s]

    @property
    def steps_per_s(self) -> list[float]:
        return [self.steps_per_sample / s for s in self.samples_s]


def configure_inductor(tuning: bool = True) -> None:
    """gpt-fast's inductor settings for decoding (``tuning``: coordinate-descent tuning of the
    generated Triton kernels); absent settings in other torch versions are skipped."""
    import torch._inductor.config as cfg

    from evalsuite.measure.compile_cache import use_persistent_caches

    use_persistent_caches()
    for name, value in (("coordinate_descent_tuning", bool(tuning)), ("fx_graph_cache", True),
                        ("autotune_local_cache", True)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    if hasattr(cfg, "triton") and hasattr(cfg.triton, "unique_kernel_names"):
        cfg.triton.unique_kernel_names = True


@dataclass
class CompileSettings:
    """How a run compiles: ``tuning`` (coordinate-descent tuning), ``cache`` (the compiled-program
    store under ``$EVALSUITE_CACHE/compile/``), ``key`` (what the program depends on besides the
    libraries, device and Inductor settings: the model's structure, the call's shapes, the variant)."""

    tuning: bool = True
    cache: bool = True
    key: dict[str, Any] = field(default_factory=dict)


def _run_soft_compiled(eager_fn: Callable, compile_kwargs: dict | None, run: Callable[[Callable], tuple],
                       how: CompileSettings | None = None):
    """``run(fn)`` with ``torch.compile(eager_fn, **compile_kwargs)``; on any compile or first-run
    failure, ``run(eager_fn)`` instead. Returns (run's result, compiled?, error line or None, the
    compiled-program cache's record or None)."""
    if compile_kwargs is None:
        return run(eager_fn), False, None, None
    from evalsuite.measure.compile_cache import compiled_program, environment_parts

    how = how or CompileSettings()
    try:
        # a fresh dynamo cache per run: a model or batch size already seen would otherwise count
        # against the recompile limit, past which torch silently runs eager
        torch._dynamo.reset()
        configure_inductor(how.tuning)
        parts = {"program": eager_fn.__name__, "compile": compile_kwargs, **how.key,
                 **environment_parts(_device_of(how.key))}
        with compiled_program(parts, enabled=how.cache) as record:
            fn = torch.compile(eager_fn, **compile_kwargs)
            out = run(fn)
        record["compile_s"] = round(out[1][0], 3) if out[1] else None  # the first warm-up sample
        return out, True, None, record
    except Exception as e:  # compilation fails in many ways (no compiler, unsupported op, OOM)
        error = f"{type(e).__name__}: {first_line(e)}"
        torch._dynamo.reset()
        return run(eager_fn), False, error, None


def _device_of(key: dict[str, Any]) -> torch.device:
    return torch.device(key.get("device_type", "cpu"))


def _program_key(model: gptfast.Transformer, variant: str, device: torch.device, **call) -> dict[str, Any]:
    """The model- and call-dependent part of a compiled program's cache key."""
    from evalsuite.measure.compile_cache import model_fingerprint

    return {"variant": variant, "model": model_fingerprint(model), "config": vars(model.config).copy(),
            "dtype": str(model.output.weight.dtype) if hasattr(model.output, "weight") else None,
            "device_type": device.type, **call}


def _kv_bytes(model: gptfast.Transformer) -> int:
    return sum(b.numel() * b.element_size() for blk in model.layers if blk.attention.kv_cache is not None
               for b in blk.attention.kv_cache.buffers())


def _drop_caches(model: gptfast.Transformer) -> None:
    for block in model.layers:
        block.attention.kv_cache = None
    model.causal_mask = None


def _peak_tracking(device: torch.device):
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return None


def _peak_extra(device: torch.device, base: int | None) -> int | None:
    if device.type != "cuda" or base is None:
        return None
    synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def decode_run(model: gptfast.Transformer, batch: int, n_tokens: int, repeats: int, warmup: int,
               compile: bool, device: torch.device, seed: int = 0, tick: Callable[[], None] = lambda: None,
               how: CompileSettings | None = None, variant: str = "fp") -> RunResult:
    """Time ``n_tokens`` cached greedy decoding steps at ``batch`` after a DECODE_PROMPT_LEN prompt.

    Every sample restarts at the same position, so all samples do identical work; the prompt's
    prefill runs once, untimed. Compiled runs use CUDA graphs (mode reduce-overhead) as gpt-fast.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, DECODE_PROMPT_LEN), generator=gen).to(device)
    base = _peak_tracking(device)
    model.setup_caches(batch, DECODE_PROMPT_LEN + n_tokens)
    first = gptfast.prefill(model, prompt, torch.arange(DECODE_PROMPT_LEN, device=device))
    input_pos = torch.tensor([DECODE_PROMPT_LEN], device=device, dtype=torch.long)

    def run(step):
        def sample():
            token = first
            input_pos.fill_(DECODE_PROMPT_LEN)
            for _ in range(n_tokens):
                token = step(model, token, input_pos).clone()
                input_pos.add_(1)
            return token

        return time_samples(sample, device, repeats, warmup, tick)

    mode = dict(mode="reduce-overhead", fullgraph=True) if device.type == "cuda" else dict(fullgraph=True)
    how = dataclasses.replace(how or CompileSettings(), key=_program_key(
        model, variant, device, batch=batch, cache_len=DECODE_PROMPT_LEN + n_tokens)) if compile else None
    (samples, warm), compiled, error, cache = _run_soft_compiled(
        gptfast.decode_one_token, mode if compile else None, run, how)
    result = RunResult(task=f"decode_bs{batch}", batch=batch, tokens_per_sample=batch * n_tokens,
                       steps_per_sample=n_tokens, samples_s=samples, warmup_s=warm, compiled=compiled,
                       compile_error=error, peak_extra_bytes=_peak_extra(device, base), kv_cache_bytes=_kv_bytes(model),
                       extra={"n_tokens": n_tokens, "prompt_len": DECODE_PROMPT_LEN}, compile_cache=cache)
    _drop_caches(model)
    return result


def prefill_run(model: gptfast.Transformer, prompt_len: int, repeats: int, warmup: int, compile: bool,
                device: torch.device, seed: int = 0, tick: Callable[[], None] = lambda: None,
                how: CompileSettings | None = None, variant: str = "fp") -> RunResult:
    """Time one forward of a ``prompt_len``-token prompt (batch 1) into the KV cache.

    Compiled prefill (one static shape, no CUDA graphs) only when asked: a long prompt is
    compute-bound, where eager is close to compiled and compilation costs minutes on a 7B shape.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    base = _peak_tracking(device)
    model.setup_caches(1, prompt_len)
    pos = torch.arange(prompt_len, device=device)

    def run(fn):
        return time_samples(lambda: fn(model, prompt, pos), device, repeats, warmup, tick)

    how = dataclasses.replace(how or CompileSettings(), key=_program_key(
        model, variant, device, prompt_len=prompt_len)) if compile else None
    (samples, warm), compiled, error, cache = _run_soft_compiled(
        gptfast.prefill, dict(fullgraph=True) if compile else None, run, how)
    result = RunResult(task=f"prefill_{prompt_len}", batch=1, tokens_per_sample=prompt_len, steps_per_sample=1,
                       samples_s=samples, warmup_s=warm, compiled=compiled, compile_error=error,
                       peak_extra_bytes=_peak_extra(device, base), kv_cache_bytes=_kv_bytes(model),
                       extra={"prompt_len": prompt_len}, compile_cache=cache)
    _drop_caches(model)
    return result


# ---------------------------------------------------------------------------- records

@dataclass
class SpeedSettings:
    n_tokens: int
    prompt_len: int
    batch_sizes: list[int]
    repeats: int
    warmup: int
    compile: bool
    model_label: str
    compile_prefill: bool = False
    seed: int = 0
    tuning: bool = True  # coordinate-descent tuning of compiled kernels (see the stage's docstring)


def record_run(results, variant: str, r: RunResult, weights: int, all_weights: int, copy_gb_s: float | None,
               common: dict[str, Any], device: torch.device) -> None:
    """Append one run's records (tokens_per_s, bandwidth, roofline, compile, memory, size)."""
    tps = dispersion(r.tokens_per_s)
    base_extra = {**common, "batch": r.batch, "compiled": r.compiled, **r.extra}
    if r.compile_error:
        base_extra["compile_error"] = r.compile_error
    cpu_note = " CPU number: mechanics only, never compare with GPU baselines." if device.type != "cuda" else ""
    add = lambda **kw: results.add(stage=STAGE_NAME, task=r.task, variant=variant, **kw)  # noqa: E731
    definition = (f"median over {len(r.samples_s)} samples of {r.tokens_per_sample} tokens / sample seconds "
                  f"(batch {r.batch}; decode excludes the prompt's prefill; {len(r.warmup_s)} untimed warm-up).")
    add(metric="tokens_per_s", value=tps["median"], unit="tokens/s", n=tps["n"], higher_is_better=True,
        definition=definition + cpu_note,
        extra={**base_extra, "min": tps["min"], "max": tps["max"], "mean": tps["mean"], "cv": tps["cv"],
               "samples": r.tokens_per_s, "samples_s": r.samples_s, "warmup_s": r.warmup_s})
    if r.task.startswith("decode"):
        bw = [weights * s / 1e9 for s in r.steps_per_s]
        d = dispersion(bw)
        add(metric="weight_bandwidth_gb_s", value=d["median"], unit="GB/s", n=d["n"], higher_is_better=True,
            definition="weight bytes per step (embeddings excluded) x decoding steps/s / 1e9; median over samples." + cpu_note,
            extra={**base_extra, "min": d["min"], "max": d["max"], "cv": d["cv"], "weight_bytes": weights})
        if copy_gb_s:
            # two bandwidths measured apart, a ratio and no fraction: a shared CPU's copy, timed at another
            # moment's load, bounds nothing (decoding measured 1.7x it), nor does it where weights fit in cache
            add(metric="roofline_fraction", value=d["median"] / copy_gb_s, unit="ratio", n=d["n"], higher_is_better=True,
                definition="weight_bandwidth_gb_s / copy_bandwidth_gb_s (device-to-device copy, this run); it may "
                           "exceed 1 where the weights fit in cache or the copy was timed under other load." + cpu_note,
                extra={**base_extra, "copy_bandwidth_gb_s": copy_gb_s})
    if r.compiled:
        add(metric="compile_s", value=r.warmup_s[0] if r.warmup_s else math.nan, unit="s", n=1, higher_is_better=False,
            definition="wall time of the first warm-up sample of the compiled run: compilation plus one run.",
            extra=dict(base_extra))
    if r.peak_extra_bytes is not None:
        peak, how = all_weights + r.peak_extra_bytes, "weights + peak extra allocation during the run (CUDA allocator)"
    else:
        peak, how = all_weights + r.kv_cache_bytes, "estimate on CPU: weights + KV cache"
    add(metric="peak_memory_gb", value=peak / 1e9, unit="GB", n=1, higher_is_better=False,
        definition=f"{how}, / 1e9." + cpu_note, extra={**base_extra, "kv_cache_bytes": r.kv_cache_bytes})
    add(metric="model_size_gb", value=weights / 1e9, unit="GB", n=1, higher_is_better=False,
        definition="weight bytes read per decoding step (embedding tables excluded, shared storages once) / 1e9.",
        extra={**base_extra, "weight_bytes": weights, "all_tensor_bytes": all_weights})


def record_speedups(results, fp_runs: dict[str, RunResult], variant: str, runs: dict[str, RunResult],
                    common: dict[str, Any], seed: int) -> None:
    for task, r in runs.items():
        ref = fp_runs.get(task)
        if ref is None:
            continue
        value, ci = speedup_interval(ref.tokens_per_s, r.tokens_per_s, seed=seed)
        results.add(stage=STAGE_NAME, task=task, variant=variant, metric="speedup", value=value, unit="x",
                    n=min(len(ref.samples_s), len(r.samples_s)), higher_is_better=True, ci95=ci,
                    definition="median tokens/s of the scheme / median tokens/s of fp; ci95 by bootstrap of "
                               "each variant's samples (the timing noise).",
                    extra={**common, "fp_cv": dispersion(ref.tokens_per_s)["cv"],
                           "scheme_cv": dispersion(r.tokens_per_s)["cv"]})


def samples_per_variant(s: SpeedSettings) -> int:
    """Timed and warm-up samples of one variant: the progress bar's unit."""
    return (len(s.batch_sizes) + (s.prompt_len > 0)) * (s.repeats + s.warmup)


def measure_variant(model: gptfast.Transformer, s: SpeedSettings, device: torch.device,
                    progress: Callable[[str], Callable[[], None]] = lambda what: (lambda: None),
                    variant: str = "fp") -> list[RunResult]:
    """``progress(what)`` names the next measurement and returns the tick its every sample calls."""
    limit = model.config.block_size
    if DECODE_PROMPT_LEN + s.n_tokens > limit or s.prompt_len > limit:
        raise EvalsuiteError(f"--speed-tokens {s.n_tokens} (+{DECODE_PROMPT_LEN} prompt) or --speed-prompt-len "
                             f"{s.prompt_len} exceeds the model's {limit} positions")
    compiling = " (compiling first: takes a while)"
    how = CompileSettings(tuning=s.tuning)
    runs = [decode_run(model, b, s.n_tokens, s.repeats, s.warmup, s.compile, device, s.seed,
                       progress(f"decode_bs{b}" + (compiling if s.compile else "")), how, variant)
            for b in s.batch_sizes]
    if s.prompt_len > 0:
        compile_prefill = s.compile and s.compile_prefill
        runs.append(prefill_run(model, s.prompt_len, s.repeats, s.warmup, compile_prefill, device, s.seed,
                                progress(f"prefill_{s.prompt_len}" + (compiling if compile_prefill else "")),
                                how, variant))
    return runs


def measure_variants(results, variants: Callable[[], Any], s: SpeedSettings, device: torch.device,
                     checkpoint: Callable[[], None] = lambda: None, bar=None) -> None:
    """Measure the device roofline, then each (name, gpt-fast model) that ``variants()`` yields,
    appending records after each variant."""
    common = {"device_type": device.type, "model": s.model_label}
    if device.type == "cuda":
        common["device_name"] = torch.cuda.get_device_name(device)
    copy_samples = copy_bandwidth_samples(device)
    cd = dispersion(copy_samples)
    results.add(stage=STAGE_NAME, task="device", variant="fp", metric="copy_bandwidth_gb_s", value=cd["median"],
                unit="GB/s", n=cd["n"], higher_is_better=None,
                definition="2 x bytes / seconds of a device-to-device copy of "
                           f"{COPY_BYTES.get(device.type, COPY_BYTES['cpu'])} bytes (read + write); median.",
                extra={**common, "min": cd["min"], "max": cd["max"], "cv": cd["cv"], "samples": copy_samples})
    details = results.details.setdefault(STAGE_NAME, {})
    details["device"] = {"copy_bandwidth_gb_s": copy_samples}
    checkpoint()
    fp_runs: dict[str, RunResult] = {}

    def progress_of(name: str):  # the bar names the variant and measurement; every sample ticks it
        def progress(what: str):
            if bar is None:
                return lambda: None
            bar.set_description(f"speed {name} {what}")
            return lambda: bar.update(1)
        return progress

    for name, model in variants():
        weights, all_weights = weight_bytes(model), total_tensor_bytes(model)
        try:
            runs = {r.task: r for r in measure_variant(model, s, device, progress_of(name), name)}
        except torch.cuda.OutOfMemoryError as e:  # one variant too large must not lose the others
            results.add_error(STAGE_NAME, f"out of device memory: {first_line(e, 200)}", variant=name)
            _drop_caches(model)
            del model
            _free(device)
            checkpoint()
            continue
        for r in runs.values():
            record_run(results, name, r, weights, all_weights, cd["median"], common, device)
        if name == "fp":
            fp_runs = runs
        else:
            record_speedups(results, fp_runs, name, runs, common, s.seed)
        details[name] = {t: {"samples_s": r.samples_s, "warmup_s": r.warmup_s, "compiled": r.compiled,
                             "compile_error": r.compile_error} for t, r in runs.items()}
        stored = {t: r.compile_cache for t, r in runs.items() if r.compile_cache is not None}
        if stored:
            results.run.setdefault("speed", {}).setdefault("compile_cache", {})[name] = stored
        for r in runs.values():
            if r.compile_error:
                results.add_error(STAGE_NAME, f"{r.task}: torch.compile failed, timed eager instead ({r.compile_error})",
                                  variant=name)
        del model
        _free(device)
        checkpoint()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- the stage

def settings_from(ctx) -> SpeedSettings:
    device = ctx.device
    n_tokens = ctx.option("speed_tokens") or (GPU_DEFAULT_TOKENS if device.type == "cuda" else CPU_DEFAULT_TOKENS)
    repeats = ctx.option("speed_repeats", 5)
    warmup = ctx.option("speed_warmup", 1)
    prompt_len = ctx.option("speed_prompt_len", 512)
    batch_sizes = parse_batch_sizes(ctx.option("speed_batch_sizes", "1,8"))
    if ctx.limit is not None and device.type == "cpu":  # --limit: a quick look, not a measurement
        n_tokens = min(n_tokens, CPU_LIMIT_TOKENS)
        prompt_len = min(prompt_len, CPU_LIMIT_PROMPT_LEN)
        repeats = min(repeats, CPU_LIMIT_REPEATS)
        if not ctx.option("speed_compile"):
            warmup = 0
    if n_tokens < 1 or repeats < 2 or warmup < 0 or prompt_len < 0:
        raise EvalsuiteError("--speed-tokens must be >= 1, --speed-repeats >= 2, --speed-warmup >= 0, --speed-prompt-len >= 0")
    compile_opt = ctx.option("speed_compile")
    compile = device.type == "cuda" if compile_opt is None else bool(compile_opt)
    if compile:
        warmup = max(int(warmup), 1)  # compilation must land in an untimed sample
    shape = ctx.option("speed_model")
    label = f"random:{shape}" if shape else ctx.loaded.info.name
    return SpeedSettings(n_tokens=int(n_tokens), prompt_len=int(prompt_len), batch_sizes=batch_sizes,
                         repeats=int(repeats), warmup=int(warmup), compile=compile, model_label=label,
                         seed=int(ctx.option("seed", 0) or 0), compile_prefill=bool(ctx.option("speed_compile_prefill")),
                         tuning=ctx.option("speed_tuning", True) is not False)


def parse_batch_sizes(spec: str | list[int]) -> list[int]:
    if isinstance(spec, list):
        return spec
    try:
        sizes = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise EvalsuiteError(f"--speed-batch-sizes {spec!r}: expected comma-separated integers, e.g. 1,8") from None
    if not sizes or any(b < 1 for b in sizes):
        raise EvalsuiteError(f"--speed-batch-sizes {spec!r}: need one or more positive integers")
    return sizes


def as_decoder(model: nn.Module) -> gptfast.Transformer:
    """The gpt-fast decoder that times ``model``: itself, or a view over an HF Llama's modules."""
    return model if isinstance(model, gptfast.Transformer) else gptfast.from_hf(model)


def random_variants(shape: str, configs: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int,
                    skip: tuple[str, ...] = ()):
    """Yields ("fp", random model of ``shape``) then each scheme's quantized copy, one at a time."""
    from evalsuite.quantize import quantize_

    fp = gptfast.random_model(shape, device, dtype, seed=seed)
    yield "fp", fp
    for name, cfg in configs.items():
        yield name, quantize_(copy.deepcopy(fp), cfg, skip=skip)


FAST_SUFFIX = "@triton"


def with_fast_int8(variants: Callable[[], Any], dtype: torch.dtype, results, device: torch.device):
    """After each variant holding int8-wo modules, the same model again with the Triton GEMV
    forward (``<scheme>@triton``), after checking its outputs against the reference forward."""
    from evalsuite.quantize import fast_int8 as kernels

    def gen():
        for name, model in variants():
            yield name, model
            if name == "fp":
                continue
            if not (kernels.HAVE_TRITON and device.type == "cuda"):
                results.add_error(STAGE_NAME, "--speed-int8-kernel needs CUDA and Triton; not timed", variant=name)
                continue
            with kernels.fast_int8(model) as n:
                if n == 0:
                    continue
                error = kernels.check_fast_int8(model, dtype)
                bound = 4 * torch.finfo(dtype).eps  # a few roundings of the output dtype
                if error > bound:
                    results.add_error(STAGE_NAME, f"int8 GEMV differs from the reference forward by {error:.3g} "
                                                  f"(relative, bound {bound:.3g}); not timed", variant=name)
                    continue
                yield name + FAST_SUFFIX, model

    return gen


def run(ctx) -> None:
    s = settings_from(ctx)
    shape = ctx.option("speed_model")
    if shape:
        gptfast.model_args(shape)
        skip = ctx.skip
        variants = lambda: random_variants(shape, ctx.configs, ctx.device, ctx.dtype, s.seed, skip)  # noqa: E731
        for name in ctx.quantized:
            if name not in ctx.configs:  # a --variant-model: its weights cannot be re-made in another shape
                ctx.results.add_error(STAGE_NAME, f"--speed-model {shape} times schemes on random weights; the "
                                                  f"checkpoint variant {name} is not timed", variant=name)
    else:
        variants = lambda: ((name, as_decoder(m)) for name, m in ctx.variants.items())  # noqa: E731
    if ctx.option("speed_int8_kernel"):
        variants = with_fast_int8(variants, ctx.dtype, ctx.results, ctx.device)
    ctx.results.run.setdefault("speed", {}).update({
        "model": s.model_label, "n_tokens": s.n_tokens, "prompt_len": s.prompt_len, "batch_sizes": s.batch_sizes,
        "repeats": s.repeats, "warmup": s.warmup, "compile": s.compile, "torch": torch.__version__,
        "coordinate_descent_tuning": s.compile and s.tuning,
    })
    if ctx.device.type == "cpu":
        ctx.results.run["speed"]["note"] = CPU_NOTE
        if ctx.rank == 0:
            print(f"speed: {CPU_NOTE}" + (f"; --limit: {s.n_tokens} decoded tokens, prefill {s.prompt_len}, "
                                          f"{s.repeats} samples, one thread" if ctx.limit is not None else ""),
                  file=sys.stderr)
    n_variants = 1 + len(ctx.configs) * (2 if ctx.option("speed_int8_kernel") else 1)
    bar = ctx.progress(None, "speed", total=n_variants * samples_per_variant(s), unit="sample")
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and ctx.limit is not None:
        # the mechanics check times on one thread: decoding is thousands of tiny ops, and on a CPU
        # shared with other work each op's thread barrier waits for a descheduled peer (2 threads
        # decoded SmolLM2 16x slower than 1 on a loaded 2-core machine, 2.7 s a token)
        torch.set_num_threads(1)
        ctx.results.run["speed"]["threads"] = 1
    # as gpt-fast: no_grad, not inference mode, so that the tensors made here (KV caches, fused
    # projections, random weights) are ordinary ones that compiled CUDA graphs may update in place
    try:
        with torch.inference_mode(False), torch.no_grad():
            with bar:
                measure_variants(ctx.results, variants, s, ctx.device, ctx.checkpoint, bar)
    finally:
        torch.set_num_threads(threads)


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--speed-model", metavar="SHAPE",
                   help=f"time random weights of a named shape instead of the model ({', '.join(gptfast.SHAPES)})")
    g.add_argument("--speed-tokens", type=int, help=f"decoded tokens per sample (default {GPU_DEFAULT_TOKENS} on GPU, "
                                                    f"{CPU_DEFAULT_TOKENS} on CPU; under --limit on a CPU at most "
                                                    f"{CPU_LIMIT_TOKENS}, prefill at most {CPU_LIMIT_PROMPT_LEN} "
                                                    f"tokens, at most {CPU_LIMIT_REPEATS} samples, no warm-up "
                                                    f"unless compiled)")
    g.add_argument("--speed-batch-sizes", default="1",
                   help="decode batch sizes, comma separated (default 1; each size is one more compile per variant)")
    g.add_argument("--speed-prompt-len", type=int, default=512, help="prefill prompt length; 0 skips prefill (default 512)")
    g.add_argument("--speed-repeats", type=int, default=5, help="timed samples per measurement (default 5)")
    g.add_argument("--speed-warmup", type=int, default=1, help="untimed warm-up samples (default 1)")
    g.add_argument("--speed-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder (CUDA graphs on GPU); default on for CUDA, off for CPU")
    g.add_argument("--speed-int8-kernel", action="store_true",
                   help="also time each int8-wo scheme with the Triton batch-1 GEMV (variant <scheme>@triton; CUDA)")
    g.add_argument("--speed-compile-prefill", action="store_true",
                   help="also compile the prefill forward (default: prefill runs eager)")
    g.add_argument("--speed-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="coordinate-descent tuning of the compiled kernels, as gpt-fast (default on; its "
                        "choices are kept in $EVALSUITE_CACHE, so a machine tunes each program once; without "
                        "it int8-wo decoded at 0.22x fp on an H100, tuned at 0.98x)")


STAGE = Stage(name=STAGE_NAME, help="decode/prefill throughput and bandwidth vs the measured roofline", run=run,
              add_arguments=add_arguments, needs_tokenizer=False)
