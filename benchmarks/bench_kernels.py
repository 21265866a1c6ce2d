"""evalsuite's quantized linear layers against torchao's on Llama-2-7B's linear shapes (issue 31).

One ``nn.Linear`` (bf16, no bias, weights N(0, 0.02)) of each 7B shape — q/k/v/o 4096→4096, gate/up
4096→11008, down 11008→4096 — quantized each way, then timed alone:

- evalsuite: its runtime modules built as the speed stage builds them (``quantize_(model,
  parse_scheme(name))``): ``int8-wo`` (the seed's forward), ``int8-wo+gemv`` (the same modules with the
  Triton batch-1 GEMV of ``--speed-int8-kernel``, CUDA only), ``int4-wo-g128``, ``fp8-wo``, ``fp8-dq``
  (the default forward: emulated) and ``fp8-dq+scaled_mm`` (``EVALSUITE_FP8_SCALED_MM=1``:
  ``torch._scaled_mm`` on CUDA >= sm89);
- torchao 0.18: ``Int8WeightOnlyConfig()``, ``Int4WeightOnlyConfig(group_size=128)`` with the
  ``int4_packing_format`` evalsuite picks for the device (``torchao_config.check_runs_on``:
  ``tile_packed_to_4d`` on an H100 without mslk), ``Float8WeightOnlyConfig()``,
  ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``, applied through evalsuite's
  torchao path;
- bf16: the plain layer.

Each is compiled as the speed stage compiles: decode with ``torch.compile(mode="reduce-overhead",
fullgraph=True)`` (CUDA graphs), prefill with ``fullgraph=True``, gpt-fast's Inductor settings
(coordinate-descent tuning on unless ``--no-tuning``); ``torch._dynamo.reset()`` before each
layer and a raised recompile limit (every ``nn.Linear`` shares one forward code object, so without
them the 9th compiled layer of a process would silently run eager). Numbers:

- ``decode_us``: one call on a 1-token input [1, 1, K], µs; ``prefill_ms``: one call on
  [1, 2048, K], ms. Each the median of ``--repeat`` calls timed with CUDA events after warm-up, a
  256 MiB buffer written before every call so that the weight is read from HBM, not L2 (as in a
  real decode step, where 7B's weights never fit in L2);
- ``sqnr_db``: 10·log10(Σ y_bf16² / Σ (y_bf16 − y)²) of the compiled prefill output against the bf16
  layer's, in float64.

A config that raises (torchao without a kernel here, e.g. "Requires mslk", a compile failure)
gets its row with the error's first line; the script never stops on one. ``--budget-s`` stops
starting new rows once spent (those rows say so), so a time limit never loses the JSON.

    python3 benchmarks/bench_kernels.py --out /tmp/kernels.json       # H100: under 4 minutes
    python3 benchmarks/bench_kernels.py --quick                       # the 4096x4096 shape only
    python3 benchmarks/bench_kernels.py --device cpu --quick          # tiny shapes: the mechanics

Prints one markdown table (shape, scheme, impl, decode µs, prefill ms, SQNR dB, note) and writes
``--out`` (default ``$OUT/kernels.json`` when $OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from benchutil import sync, timed_ms  # noqa: E402

from evalsuite.errors import first_line  # noqa: E402

# (name, in_features K, out_features N) of Llama-2-7B's linear layers
SHAPES = [("q|k|v|o 4096x4096", 4096, 4096), ("gate|up 4096->11008", 4096, 11008), ("down 11008->4096", 11008, 4096)]
CPU_SHAPES = [("tiny 256->512", 256, 512), ("tiny 512->256", 512, 256)]
PREFILL_TOKENS = 2048
CPU_PREFILL_TOKENS = 64
FLUSH_BYTES = 256 << 20  # > 5x an H100's 50 MiB L2
SCALED_MM_ENV = "EVALSUITE_FP8_SCALED_MM"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="GPU: the 4096x4096 shape only; CPU: one tiny shape and a 64-token prefill")
    p.add_argument("--out", type=Path, help="write the JSON here (default: $OUT/kernels.json when $OUT is set)")
    p.add_argument("--repeat", type=int, help="timed calls per number (default 50 decode / 20 prefill; quick: 10 / 5)")
    p.add_argument("--budget-s", type=float, default=200.0, help="start no new row after this many seconds")
    p.add_argument("--no-compile", action="store_true", help="time eager forwards (the mechanics, fast on a CPU)")
    p.add_argument("--no-tuning", action="store_true", help="Inductor without coordinate-descent tuning")
    p.add_argument("--only", help="comma separated scheme names (as in the table) to run; default all")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ the implementations

def evalsuite_scheme(name: str) -> Callable[[nn.Module, torch.device], tuple[nn.Module, str]]:
    def build(model: nn.Module, device: torch.device) -> tuple[nn.Module, str]:
        from evalsuite.quantize import parse_scheme, quantize_
        from evalsuite.quantize.registry import describe

        config = parse_scheme(name)
        model = quantize_(model, config)
        forward = describe(config, model, device, torch.bfloat16).get("forward")
        return model, (f"forward: {forward}" if isinstance(forward, dict) else "")
    return build


def evalsuite_gemv(model: nn.Module, device: torch.device) -> tuple[nn.Module, str]:
    """int8-wo with the speed stage's ``--speed-int8-kernel`` (its check against the seed's forward too)."""
    from evalsuite.quantize import fast_int8, parse_scheme, quantize_

    if device.type != "cuda" or not fast_int8.HAVE_TRITON:
        raise RuntimeError("the Triton GEMV needs CUDA and Triton")
    model = quantize_(model, parse_scheme("int8-wo"))
    for m in model.modules():
        if type(m) is fast_int8.WeightOnlyInt8Linear:
            m.__class__ = fast_int8.FastWeightOnlyInt8Linear
    error = fast_int8.check_fast_int8(model, torch.bfloat16)
    bound = 2 * torch.finfo(torch.bfloat16).eps
    if not error <= bound:
        raise RuntimeError(f"GEMV differs from the reference forward by {error:.3g} (relative, bound {bound:.3g})")
    return model, f"GEMV vs reference {error:.2g}"


def torchao_scheme(attr: str, make: Callable[[Any], Any], text: str):
    """A torchao config applied by evalsuite's torchao path (int4: the packing evalsuite picks here)."""
    def build(model: nn.Module, device: torch.device) -> tuple[nn.Module, str]:
        import torchao.quantization as q

        from evalsuite.quantize import quantize_, torchao_config
        from evalsuite.quantize.spec import Reference

        ref = Reference(text=f"torchao:{text}", source="torchao", attr=attr, kwargs=(), include_head=False)
        cfg = torchao_config.TorchaoConfig(ref=ref, label=attr, config=make(q))
        if attr == "Int4WeightOnlyConfig":  # the fallbacks key on a spec that names no packing
            cfg = torchao_config.check_runs_on(cfg, device, torch.bfloat16)
        model = quantize_(model, cfg)
        packing = cfg.details.get("int4_packing_format") or getattr(cfg.config, "int4_packing_format", None)
        return model, (f"int4_packing_format={getattr(packing, 'value', packing)}" if packing else "")
    return build


@contextlib.contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def implementations() -> list[tuple[str, str, Callable, str | None]]:
    """(scheme, impl, build(model, device) -> (model, note), $EVALSUITE_FP8_SCALED_MM) in table order."""
    plain = None
    return [
        ("bf16", "torch", lambda m, d: (m, ""), plain),
        ("int8-wo", "evalsuite", evalsuite_scheme("int8-wo"), plain),
        ("int8-wo+gemv", "evalsuite", evalsuite_gemv, plain),
        ("int8-wo", "torchao", torchao_scheme("Int8WeightOnlyConfig", lambda q: q.Int8WeightOnlyConfig(),
                                              "Int8WeightOnlyConfig()"), plain),
        ("int4-wo-g128", "evalsuite", evalsuite_scheme("int4-wo-g128"), plain),
        ("int4-wo-g128", "torchao", torchao_scheme("Int4WeightOnlyConfig",
                                                   lambda q: q.Int4WeightOnlyConfig(group_size=128),
                                                   "Int4WeightOnlyConfig(group_size=128)"), plain),
        ("fp8-wo", "evalsuite", evalsuite_scheme("fp8-wo"), plain),
        ("fp8-wo", "torchao", torchao_scheme("Float8WeightOnlyConfig", lambda q: q.Float8WeightOnlyConfig(),
                                             "Float8WeightOnlyConfig()"), plain),
        ("fp8-dq", "evalsuite", evalsuite_scheme("fp8-dq"), plain),
        ("fp8-dq+scaled_mm", "evalsuite", evalsuite_scheme("fp8-dq"), "1"),
        ("fp8-dq", "torchao", torchao_scheme(
            "Float8DynamicActivationFloat8WeightConfig",
            lambda q: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow()),
            "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())"), plain),
    ]


# ------------------------------------------------------------------------------ measuring one row

def configure_dynamo() -> None:
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 64))
    if hasattr(dc, "fail_on_recompile_limit_hit"):  # a silent fallback to eager would time the wrong thing
        dc.fail_on_recompile_limit_hit = True


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    noise = (ref - y).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def measure_row(shape: tuple[str, int, int], scheme: str, impl: str, build: Callable, scaled_mm: str | None,
                fp: nn.Module, inputs: dict[str, torch.Tensor], ref: torch.Tensor, a: argparse.Namespace,
                device: torch.device, flush: Callable | None) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": shape[0], "in_features": shape[1], "out_features": shape[2], "scheme": scheme,
                           "impl": impl, "decode_us": None, "prefill_ms": None, "sqnr_db": None, "note": "",
                           "errors": {}, "compiled": not a.no_compile}
    repeats = {"decode": a.repeat or (10 if a.quick else 50), "prefill": a.repeat or (5 if a.quick else 20)}
    with env(SCALED_MM_ENV, scaled_mm), torch.no_grad():
        try:
            model, row["note"] = build(copy.deepcopy(fp), device)
        except Exception as e:  # noqa: BLE001 - no kernel here, a missing package: the row says which
            row["errors"]["build"] = line(e)
            return row
        for phase in ("prefill", "decode"):  # prefill first: its output gives the SQNR
            torch._dynamo.reset()
            x = inputs[phase]
            try:
                if a.no_compile:
                    fn = model
                else:
                    mode = dict(mode="reduce-overhead") if phase == "decode" and device.type == "cuda" else {}
                    fn = torch.compile(model, fullgraph=True, dynamic=False, **mode)
                t0 = time.perf_counter()
                for _ in range(3):  # compile, then CUDA-graph recording, then a plain replay
                    y = fn(x)
                sync(device)
                row[f"{phase}_warmup_s"] = round(time.perf_counter() - t0, 3)
                if phase == "prefill":
                    row["sqnr_db"] = sqnr_db(ref, y.float())
                t = timed_ms(lambda: fn(x), device, repeats[phase], warmup=2, before=flush)
            except Exception as e:  # noqa: BLE001 - one phase failing must not lose the other
                row["errors"][phase] = line(e)
                continue
            row[f"{phase}_runs_ms"] = t["runs_ms"]
            if phase == "decode":
                row["decode_us"] = t["median_ms"] * 1e3
            else:
                row["prefill_ms"] = t["median_ms"]
        del model
    torch._dynamo.reset()
    return row


# ------------------------------------------------------------------------------ the table

def fmt(v, digits: int) -> str:
    return "—" if v is None else ("inf" if v == math.inf else f"{v:.{digits}f}")


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| shape | scheme | impl | decode µs | prefill ms | SQNR dB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "; ".join([f"{k}: {v}" for k, v in r["errors"].items()] + ([r["note"]] if r["note"] else []))
        out.append(f"| {r['shape']} | {r['scheme']} | {r['impl']} | {fmt(r['decode_us'], 1)} | "
                   f"{fmt(r['prefill_ms'], 3)} | {fmt(r['sqnr_db'], 1)} | {note.replace('|', '/')[:160]} |")
    return "\n".join(out)


def versions() -> dict[str, Any]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001 - recorded, each torchao row then says why it failed
        out["torchao"] = f"not importable ({line(e)})"
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu --quick for the mechanics)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    shapes = (CPU_SHAPES[:1] if a.quick else CPU_SHAPES) if device.type == "cpu" else (SHAPES[:1] if a.quick else SHAPES)
    tokens = CPU_PREFILL_TOKENS if device.type == "cpu" else PREFILL_TOKENS
    impls = implementations()
    if a.only:
        wanted = {s.strip() for s in a.only.split(",") if s.strip()}
        unknown = wanted - {i[0] for i in impls}
        if unknown:
            print(f"--only: unknown scheme(s) {', '.join(sorted(unknown))}; known: "
                  f"{', '.join(dict.fromkeys(i[0] for i in impls))}", file=sys.stderr)
            return 2
        impls = [i for i in impls if i[0] in wanted]
    if not a.no_compile:
        from evalsuite.measure.speed import configure_inductor

        configure_inductor(tuning=not a.no_tuning)
        configure_dynamo()
    flush = None
    if device.type == "cuda":
        scratch = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
        flush = scratch.zero_
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_kernels on {device_name}: {versions()}; prefill {tokens} tokens; "
          f"{'eager' if a.no_compile else 'compiled'}", flush=True)

    t_start = time.perf_counter()
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)

    def payload(stopped: str | None = None) -> dict:
        return {"device": device_name, "device_type": device.type, "dtype": str(dtype), "versions": versions(),
                "prefill_tokens": tokens, "compiled": not a.no_compile, "tuning": not a.no_tuning,
                "elapsed_s": round(time.perf_counter() - t_start, 1), "stopped": stopped,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "rows": rows}

    target = a.out or (Path(os.environ["OUT"]) / "kernels.json" if os.environ.get("OUT") else None)

    def save(stopped: str | None = None) -> None:
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(payload(stopped), indent=1, default=str))

    stopped = None
    # a step limit's SIGTERM ends the rows, not the script: the table and JSON of the rows measured
    # are still written (each row is saved as it ends too)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        measure_rows(shapes, impls, rows, gen, tokens, dtype, a, device, flush, t_start, save)
    except Stopped as e:
        stopped = f"stopped by {e} after {len(rows)} rows"
        print(f"\n{stopped}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)

    elapsed = time.perf_counter() - t_start
    print()
    print(markdown(rows))
    clock = "CUDA-event timings, an L2 flush before each call" if device.type == "cuda" else "wall-clock timings"
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; decode = 1 token, prefill = {tokens} tokens, medians of {clock}; "
          f"SQNR of the prefill output vs the bf16 layer's")
    save(stopped)
    if target is not None:
        print(f"wrote {target}")
    return 0


class Stopped(Exception):
    """SIGTERM arrived while rows were being measured."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def measure_rows(shapes, impls, rows: list, gen, tokens: int, dtype, a, device, flush, t_start: float,
                 save: Callable[[], None]) -> None:
    """Appends a row per (shape, implementation) to ``rows``, saving after each."""
    for shape in shapes:
        _, k, n = shape
        fp = nn.Sequential(nn.Linear(k, n, bias=False))
        with torch.no_grad():
            fp[0].weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        fp = fp.to(device=device, dtype=dtype)
        inputs = {"decode": torch.randn(1, 1, k, generator=gen).to(device, dtype),
                  "prefill": torch.randn(1, tokens, k, generator=gen).to(device, dtype)}
        with torch.no_grad():
            ref = fp(inputs["prefill"]).float()
        for scheme, impl, build, scaled_mm in impls:
            if time.perf_counter() - t_start > a.budget_s:
                rows.append({"shape": shape[0], "in_features": k, "out_features": n, "scheme": scheme, "impl": impl,
                             "decode_us": None, "prefill_ms": None, "sqnr_db": None, "note": "",
                             "errors": {"skipped": f"not measured: the --budget-s {a.budget_s:g} s budget was spent"},
                             "compiled": not a.no_compile})
                continue
            t0 = time.perf_counter()
            row = measure_row(shape, scheme, impl, build, scaled_mm, fp, inputs, ref, a, device, flush)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            print(f"  {shape[0]:22} {scheme:17} {impl:9} decode {fmt(row['decode_us'], 1):>8} µs  prefill "
                  f"{fmt(row['prefill_ms'], 3):>8} ms  SQNR {fmt(row['sqnr_db'], 1):>5} dB  ({row['seconds']} s)"
                  + (f"  {row['errors']}" if row["errors"] else ""), flush=True)
            save()
        del fp, inputs, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
