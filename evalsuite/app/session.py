"""``evalsuite run``: load → quantize → measure → judge → report, in that order.

Each stage's output is saved before the next starts, so a failure late in a run loses nothing.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from evalsuite import distributed
from evalsuite.versions import __version__
from evalsuite.errors import EvalsuiteError, first_line, raise_interrupted, signal_name, user_error
from evalsuite.app.config import DTYPES, RunConfig
from evalsuite.measure import STAGE_MODULES, get_stage, parse_stages
from evalsuite.results import Results

PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "gguf", "accelerate", "tabulate", "numpy")


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
    from evalsuite.versions import package_versions as installed

    return {"evalsuite": __version__, **installed(PACKAGES)}


def git_revision() -> str | None:
    # a copy of the tree without its .git (a device machine, a container) says which commit it is
    if os.environ.get("EVALSUITE_GIT_REVISION"):
        return os.environ["EVALSUITE_GIT_REVISION"]
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


def validate_user_files(config: RunConfig, stages: list[str]) -> None:
    """Read every option and user file the judge and the stages will need, so that a typo in a
    gates file or a missing baseline fails in a second, not after hours of stages."""
    from evalsuite.app.judge_report import gate_config
    from evalsuite.judge.baseline import load_baselines

    j = config.judge
    gate_config(j)  # --gates (types and keys checked), --sigma
    if j.baseline:
        load_baselines(j.baseline)
    if j.baselines and Path(j.baselines).exists() and not Path(j.baselines).is_dir():
        raise EvalsuiteError(f"--baselines {j.baselines}: is a file, not a folder (give it to --baseline)")
    if "layers" in stages and config.option("layer_thresholds"):
        from evalsuite.measure.layer_thresholds import load_thresholds

        load_thresholds(config.option("layer_thresholds"))
    if config.output.resume and config.output.force:
        raise EvalsuiteError("--resume and --force contradict each other; give one")


# what the run records resolved (the device type too, and the model's sha256 once it is loaded)
RESUME_KEYS = ("schemes", "quant_specs", "dtype", "kernels", "seed", "limit", "suite", "data_dir", "tp")
def resumable(previous: Results, run: dict, path: Path, config: RunConfig) -> list[str]:
    """The stages of ``previous`` a resumed run keeps; refuses one measured otherwise than this run:
    the resolved run settings, then every measuring option except those of stages it does not keep."""
    from evalsuite.judge.completeness import stages_finished

    kept = stages_finished(previous)
    differs = {k: (previous.run.get(k), run.get(k)) for k in RESUME_KEYS if previous.run.get(k) != run.get(k)}
    if (previous.run.get("device") or {}).get("type") != run["device"]["type"]:
        differs["device"] = ((previous.run.get("device") or {}).get("type"), run["device"]["type"])
    before = previous.run.get("options")
    if before is None:
        raise EvalsuiteError(f"--resume {path}: the previous run does not record its options (an older evalsuite), "
                             "so resuming cannot check that it was measured as this run would be; use --force")
    others = set().union(*(config.stages.options.of(s) for s in STAGE_MODULES if s not in kept))
    now_opts = run.get("options") or {}
    for k in sorted((set(before) | set(now_opts)) - others):
        if before.get(k) != now_opts.get(k):
            differs["--" + k.replace("_", "-")] = (before.get(k), now_opts.get(k))
    if differs:
        raise EvalsuiteError(f"--resume {path}: the previous run differs in {', '.join(differs)} "
                             f"({'; '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in differs.items())}); "
                             "resume with the same options or use --force")
    return kept


def use_smoke_suite(config: RunConfig) -> RunConfig:
    """``--suite smoke``: the embedded sample replaces any data dir, and the run is marked partial
    (never silently: it is only ever chosen by name)."""
    if config.option("suite") != "smoke":
        return config
    from evalsuite.data import SMOKE_DIR, SMOKE_LAYER_TOKENS, SMOKE_LIMIT, SMOKE_PPL_CONTEXT, SMOKE_SUITE

    options = {"suite": SMOKE_SUITE}
    if config.stages.options.get("ppl_context") == 2048:  # the full protocol's default: short windows for a sample
        options["ppl_context"] = SMOKE_PPL_CONTEXT
    if "layer_tokens" in config.stages.options and config.stages.options["layer_tokens"] is None:
        options["layer_tokens"] = SMOKE_LAYER_TOKENS
    limit = config.data.limit if config.data.limit is not None else SMOKE_LIMIT
    return config.with_options(**options).with_data(data_dir=str(SMOKE_DIR), limit=limit)


def run(config: RunConfig, preloaded=None) -> int:
    """The run of ``config``; ``preloaded`` (a LoadedModel: the Python API's in-memory model) replaces
    loading ``config.model.path``."""
    # Validate everything cheap before loading anything heavy.
    from evalsuite.load.model import default_model_path, detect_format
    from evalsuite.load.variant import parse_variant_models
    from evalsuite.quantize import parse_schemes
    from evalsuite.quantize.policy import parse_skip

    m = config.model
    stages = parse_stages(config.stages.spec)
    if not stages and config.stages.spec.strip().lower() != "none":
        raise EvalsuiteError(f"--stages {config.stages.spec!r}: nothing to run; give stage names, 'all', or 'none' "
                             "(load and quantize only, nothing judged)")
    quant = m.quant_spec
    timeout = m.handler_timeout
    if timeout is not None and not timeout > 0:
        raise EvalsuiteError(f"--handler-timeout {timeout:g}: must be a positive number of seconds")
    configs = parse_schemes(quant, parse_skip(m.skip_layers), timeout)  # imports (runs) a user's handler file
    if timeout is not None and not any(hasattr(c, "timeout_s") for c in configs):
        raise EvalsuiteError("--handler-timeout bounds a --quant FILE.py:Name or package.module:Name handler, and "
                             f"--quant {quant} names none")
    model_path = Path(preloaded.info.path) if preloaded else Path(m.path) if m.path else default_model_path()
    variant_specs = parse_variant_models(list(m.variant_models) or None, {c.name for c in configs}, reference=model_path)
    if config.runtime.tp != 1:
        from evalsuite.load import tp

        if preloaded is not None:
            raise EvalsuiteError("--tp: the Python API's in-memory model is not sharded; run 'evalsuite run --tp' "
                                 "under torchrun instead")
        stages = tp.validate(config.runtime.tp, distributed.launch_env().world_size, configs, stages, config.stages.spec)
        # the fused Triton MLP would bypass the sharded projections; the fp cache is keyed per process
        config = config.with_runtime(kernels="eager", fp_cache="off")
    smoke = config.option("suite") == "smoke"
    config = use_smoke_suite(config)
    if preloaded is None:
        detect_format(model_path)
    data_dir = Path(config.data.data_dir) if config.data.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise EvalsuiteError(f"--data-dir {data_dir}: no such directory")
    if config.data.limit is not None and config.data.limit < 1:
        raise EvalsuiteError("--limit must be at least 1")
    stage_objs = {s: get_stage(s) for s in stages}
    for stage in stage_objs.values():
        if stage.validate is not None:
            stage.validate(config)
    validate_user_files(config, stages)
    if config.fix.suggest:
        from evalsuite.app import fix

        fix.validate(config.fix, config.option("ppl_corpus"))

    import torch

    from evalsuite.app import run_dir
    from evalsuite.quantize.registry import check_runs_on, packing_note

    from evalsuite.measure.context import progress_bars_off

    show_progress = sys.stderr.isatty() and not config.runtime.no_progress
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    elif hasattr(os, "sched_getaffinity"):
        # torchrun ranks on one host share its cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    torch.manual_seed(config.runtime.seed)
    device = resolve_device(m.device)
    if device.type == "cuda":  # before any Triton kernel or torch.compile graph is built
        from evalsuite.measure.compile_cache import use_persistent_caches

        use_persistent_caches()
    # batched tokenization on all cores where a GPU does the model work (the tasks stage tokenizes
    # ~50k strings per run); on a CPU the cores belong to torch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if device.type == "cuda" else "false")
    # under torchrun: join the process group, one GPU per rank; only rank 0 writes files
    dist_env = distributed.init(device.type)
    device = distributed.device_for(device, dist_env)
    layout = _tp_layout(config.runtime.tp, device, dist_env)
    dtype_name, dtype = resolve_dtype(m.dtype, device)
    # a torchao config without a kernel here: one line, before the load (int4: a packing that has one)
    configs = check_runs_on(configs, device, dtype)
    if dist_env.is_writer:
        for note in filter(None, map(packing_note, configs)):
            print(note, file=sys.stderr)
    out = config.output
    out_dir = Path(out.out) if out.out else default_out_dir(
        preloaded.info.name if preloaded else model_path.stem if model_path.is_file() else model_path.name)
    out_dir = distributed.broadcast(out_dir, dist_env.world_size)  # ranks' clocks may straddle a second
    lock, previous_path = run_dir.claim(out_dir, out.resume, out.force) if dist_env.is_writer else (None, None)
    # SIGTERM (a CI job cancelled, a nightly matrix stopping) and SIGHUP end a run as Ctrl-C does:
    # where it stopped is recorded and the lock released
    import threading

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        # libraries' own bars (GGUF conversion, weight loading, lm-eval's request building) clutter CI logs
        with contextlib.nullcontext() if show_progress else progress_bars_off():
            return _run_locked(config, stages, configs, variant_specs, model_path, data_dir, device,
                               dtype_name, dtype, dist_env, out_dir, previous_path, show_progress, preloaded, smoke,
                               layout)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if lock is not None:
            lock.release()


def layer_coverage(fp, changed: set[str], cfg, skip: tuple[str, ...]) -> dict | None:
    """The linear layers the layer policy gave a handler that it left as they were (torchao skips a
    layer its kernel cannot take, e.g. int4 where ``in_features`` is not a multiple of the group),
    or None when it quantized every one: how many, of which shapes, and why where that is known."""
    from evalsuite.quantize.policy import LayerPolicy

    chosen = LayerPolicy(include_head=bool(getattr(cfg, "include_head", False)), skip=skip).select(fp)
    left = [n for n in chosen if n not in changed]
    if not left:
        return None
    shapes: dict[str, int] = {}
    widths: set[int] = set()
    for name in left:
        m = fp.get_submodule(name)
        key = f"{m.in_features}->{m.out_features}"
        shapes[key] = shapes.get(key, 0) + 1
        widths.add(m.in_features)
    out = {"chosen": len(chosen), "quantized": len(chosen) - len(left), "left": len(left),
           "fraction_quantized": round((len(chosen) - len(left)) / len(chosen), 4),
           "left_shapes": shapes, "left_examples": left[:3]}
    group = getattr(getattr(cfg, "config", None), "group_size", None)
    if isinstance(group, int) and group > 0:
        bad = sorted(w for w in widths if w % group)
        if bad:
            out["why"] = f"in_features {', '.join(map(str, bad))} not a multiple of group_size {group}"
    return out


def describe_coverage(variant: str, spec: str, c: dict, dtype) -> str:
    """The quantize step's one line for a ``layer_coverage`` entry."""
    from evalsuite.judge.within import coverage_words

    return (f"--quant {variant} ({spec}): {coverage_words(c, str(dtype).removeprefix('torch.'))}. Its verdicts are "
            "for that model; --skip-layers makes the choice explicit")


def refuse_unchanged(variant: str, changed_layers: int, spec: str) -> None:
    """A variant whose every layer is bit-identical to fp's quantized nothing: measuring it would pass
    every check and report the quantizer as perfect."""
    if changed_layers == 0:
        raise EvalsuiteError(f"variant {variant} ({spec}): no layer differs from fp (0 layers changed, weights "
                             "bit-identical): it quantized nothing, so there is nothing to measure")


def _tp_layout(tp_size: int, device, dist_env):
    """The (dp, tp) mesh under --tp N; without it every rank is a data-parallel replica."""
    if tp_size == 1:
        from evalsuite.load.tp import Layout

        return Layout(dp=dist_env.world_size, dp_rank=dist_env.rank)
    from evalsuite.load import tp

    layout = tp.init_mesh(device.type, dist_env.world_size, tp_size)
    if dist_env.is_writer:
        print(f"--tp {layout.tp}: {layout.dp} replica(s) of {layout.tp} ranks; attention and MLP sharded, embedding "
              "and output head replicated; stages gen and speed not run; --kernels eager, --fp-cache off",
              file=sys.stderr)
    return layout


def _sharder(layout, device):
    """``shard(model, variant name)``: the model's tensor-parallel shards on ``device`` (--tp)."""
    from evalsuite.load import tp

    return lambda model, name: tp.shard(model, layout, device, name)


def _run_locked(config: RunConfig, stages, configs, variant_specs, model_path, data_dir, device, dtype_name, dtype,
                dist_env, out_dir, previous_path, show_progress, preloaded=None, smoke=False, layout=None) -> int:
    import torch

    from evalsuite.load import load_model
    from evalsuite.load.variant import load_variant_model
    from evalsuite.measure.context import RunContext
    from evalsuite.measure.layer_capture import paired_layers
    from evalsuite.measure.phase_timer import NO_IDLE_ON_CPU, DeviceBusy
    from evalsuite.quantize import quantize_
    from evalsuite.quantize.policy import LayerPolicy, parse_skip
    from evalsuite.quantize.recipe import RecipeConfig
    from evalsuite.quantize.registry import describe as describe_scheme
    from evalsuite.measure.validate import check_variant

    results_path = out_dir / "results.json"
    sharded = layout is not None and layout.tp > 1
    # under --tp every rank loads and quantizes the whole model on the CPU, then keeps its shards
    load_device = torch.device("cpu") if sharded else device
    results = Results(run={
        "argv": list(config.argv),
        "started": now(),
        "schemes": [c.name for c in configs] + [v.name for v in variant_specs],
        "quant_specs": {c.name: c.spec for c in configs if hasattr(c, "spec")},
        "stages": stages,  # requested; "stages_finished" says which ran to their end
        "stages_finished": [],
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()},
        "dtype": dtype_name,
        "kernels": config.runtime.kernels,
        "seed": config.runtime.seed,
        "limit": config.data.limit,
        "partial": config.data.limit is not None or smoke,
        "suite": config.option("suite"),
        "data_dir": str(data_dir.resolve()) if data_dir else None,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "stage_seconds": {},
        "world_size": dist_env.world_size,
        "tp": layout.tp if layout is not None else 1,
        "options": config.measurement_options(),
        "config": config.to_record(),
    })
    previous = Results.load(previous_path) if previous_path is not None else None
    to_run = list(stages)
    if previous is not None:
        kept = [s for s in resumable(previous, results.run, previous_path, config) if s in STAGE_MODULES]
        to_run = [s for s in stages if s not in kept]
        results.run["stages"] = [s for s in STAGE_MODULES if s in set(stages) | set(kept)]
        results.run["stages_finished"] = [s for s in STAGE_MODULES if s in kept]
        results.run["stage_seconds"] = {s: t for s, t in previous.run.get("stage_seconds", {}).items() if s in kept}
        results.run["stage_idle"] = {s: t for s, t in (previous.run.get("stage_idle") or {}).items() if s in kept}
        results.run["resumed_from"] = {"started": previous.run.get("started"), "kept_stages": list(results.run["stages_finished"])}
        if "tasks" in kept and "tasks_requested" in previous.run:
            results.run["tasks_requested"] = previous.run["tasks_requested"]
        results.run["partial"] = results.run["partial"] or bool(previous.run.get("partial"))
        results.records = [r for r in previous.records if r.stage in kept]
        results.details = {k: v for k, v in previous.details.items() if k in kept}
        results.errors = [e for e in previous.errors if e.get("stage") in kept]
        print(f"resuming {previous_path}: keeping {', '.join(kept) or 'no stage'}; running {', '.join(to_run) or 'nothing'}",
              file=sys.stderr)

    rescued: list[Path] = []  # where the results went once --out could not take them

    def checkpoint() -> None:
        nonlocal results_path
        if not dist_env.is_writer:
            return
        try:
            results.save(results_path)
        except OSError as e:
            if rescued:
                raise
            # the folder vanished, became a file, or refuses writes: save elsewhere, then stop
            from evalsuite.app.run_dir import rescue_dir

            results_path = rescue_dir(out_dir) / "results.json"
            rescued.append(results_path)
            raise EvalsuiteError(f"--out {out_dir}: cannot write {e.filename or out_dir} any more "
                                 f"({e.strerror or first_line(e)})") from None

    def timed(name: str, measure: bool = False):
        class _T:
            def __enter__(self):
                results.run["running"] = name
                self.t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                if measure:  # a run killed in this stage then says which one it was
                    checkpoint()
                self.busy = None
                if measure and name != "speed":
                    self.busy = DeviceBusy(ctx.variants.values(), device).__enter__()

            def __exit__(self, exc_type, *exc):
                if self.busy is not None:
                    self.busy.__exit__(exc_type, *exc)
                if exc_type is not None:  # a stage that raised did not finish: no time, not finished
                    return
                results.run["stage_seconds"][name] = round(time.perf_counter() - self.t0, 3)
                if measure:  # the fraction of the stage's wall time the device sat idle (measure.phase_timer)
                    results.run.setdefault("stage_idle", {})[name] = (
                        self.busy.record() if self.busy is not None else
                        {"fraction": None, "reason": NO_IDLE_ON_CPU} if device.type != "cuda" else
                        {"fraction": None, "reason": "not measured: events around its forwards would perturb "
                                                     "the timing it measures"})
                if device.type == "cuda":  # what the stage held at most, models included
                    results.run.setdefault("stage_peak_gpu_bytes", {})[name] = torch.cuda.max_memory_allocated(device)
                    if dist_env.world_size > 1:  # every rank's GPU (under --tp each holds other shards)
                        results.run.setdefault("stage_peak_gpu_bytes_per_rank", {})[name] = distributed.all_ranks(
                            torch.cuda.max_memory_allocated(device), dist_env.world_size)
                if measure:
                    results.run["stages_finished"].append(name)
                results.run["running"] = None
                checkpoint()

        return _T()

    def save_stopped(extra: dict) -> str:
        """Save what a stopped run has; says where it is, in words for the one error line."""
        results.run.update(extra)
        for _ in range(2):  # a second try goes to the rescue folder where --out failed
            try:
                checkpoint()
            except EvalsuiteError:
                continue
            except OSError as e:  # even the rescue folder is full: the last good checkpoint stays, whole
                return f"could not save the results ({e.strerror}); {results_path} holds the last checkpoint"
            except Exception as e:  # noqa: BLE001 - content never fails a save (Results.to_json); anything else must not hide the error
                return f"could not save the results ({type(e).__name__}: {e}); {results_path} holds the last checkpoint"
            return f"results so far saved to {results_path}"
        return f"could not save the results; {results_path} holds the last checkpoint"

    if smoke and dist_env.is_writer:
        from evalsuite.data import SMOKE_PPL_CONTEXT, smoke_notice
        from evalsuite.report.table import fill, terminal_width

        print(fill(smoke_notice(config.data.limit, config.option("ppl_context", SMOKE_PPL_CONTEXT)), terminal_width()),
              file=sys.stderr)
    skip = parse_skip(config.model.skip_layers)
    arch, tokenizer_path = config.model.arch, config.model.tokenizer
    try:
        with timed("load"):
            loaded = preloaded or load_model(model_path, device=load_device, dtype=dtype, arch=arch,
                                             tokenizer_path=tokenizer_path)
            info = loaded.info
            results.run["model"] = {"path": info.path, "name": info.name, "format": info.format, "sha256": info.sha256,
                                    "n_params": info.n_params, "arch": info.arch}
            results.run["load_seconds"] = info.extra.get("seconds", {})  # read (and a GGUF's parts), hash, to_device
            results.run["load_source"] = info.extra.get("source")  # gguf streamed | gguf cache | gguf via transformers | ...
            if previous is not None and (previous.run.get("model") or {}).get("sha256") != info.sha256:
                raise EvalsuiteError(f"--resume {previous_path}: the previous run measured another model "
                                     f"({(previous.run.get('model') or {}).get('name')}); use --force to replace it")
            if skip:  # a pattern that matches nothing is a typo, whatever --quant is
                LayerPolicy(skip=skip).select(loaded.model)
            if config.judge.baseline:  # another model's or dtype's baseline: say so before the stages
                from evalsuite.judge.baseline import check_identity, load_baselines

                for b in load_baselines(config.judge.baseline):
                    check_identity(b, results, f"--baseline {config.judge.baseline}")
            variants = {"fp": loaded.model}
            for spec in variant_specs:
                var = load_variant_model(spec, loaded, load_device, dtype, arch=arch)
                if var.info.sha256 == info.sha256:
                    raise EvalsuiteError(f"--variant-model {spec.spec}: the same weights as --model {model_path} "
                                         f"(sha256 {info.sha256[:12]}); a model compared with itself proves nothing")
                check_variant(spec.name, var.model, info.vocab_size, load_device, f"--variant-model {spec.path}")
                variants[spec.name] = var.model
                results.run.setdefault("variant_models", {})[spec.name] = {
                    "path": var.info.path, "format": var.info.format, "sha256": var.info.sha256, "arch": var.info.arch}
                before = ((previous.run.get("variant_models") or {}).get(spec.name) or {}) if previous else {}
                if before.get("sha256") not in (None, var.info.sha256):
                    raise EvalsuiteError(f"--resume {previous_path}: --variant-model {spec.name} holds other weights "
                                         f"than the previous run's (sha256 {before['sha256'][:12]}, now "
                                         f"{var.info.sha256[:12]}); use --force to replace it")
        with timed("quantize"):
            # modules paired by name with the fp model whose type or weight changed (see measure.layer_capture)
            quantized_layers = results.run["quantized_layers"] = {
                name: len(paired_layers(loaded.model, mod)) for name, mod in variants.items() if name != "fp"}
            for name, n in quantized_layers.items():
                refuse_unchanged(name, n, f"--variant-model {name}")
            shard = _sharder(layout, device) if sharded else (lambda model, name: model)
            variants.update({name: shard(mod, name) for name, mod in variants.items() if name != "fp"})
            for cfg in configs:
                t0 = time.perf_counter()
                variants[cfg.name] = quantize_(copy.deepcopy(loaded.model), cfg, skip=skip)
                results.run.setdefault("quantize_seconds", {})[cfg.name] = round(time.perf_counter() - t0, 3)
                if hasattr(cfg, "spec"):  # not one of evalsuite's own schemes: check what it made
                    check_variant(cfg.name, variants[cfg.name], info.vocab_size, load_device, cfg.spec)
                changed = paired_layers(loaded.model, variants[cfg.name])
                quantized_layers[cfg.name] = len(changed)
                refuse_unchanged(cfg.name, quantized_layers[cfg.name], getattr(cfg, "spec", cfg.name))
                if hasattr(cfg, "spec") and not isinstance(cfg, RecipeConfig):  # torchao's or a user's handler
                    coverage = layer_coverage(loaded.model, set(changed), cfg, skip)
                    if coverage is not None:
                        results.run.setdefault("quant_coverage", {})[cfg.name] = coverage
                        if dist_env.is_writer:
                            print(describe_coverage(cfg.name, cfg.spec, coverage, dtype), file=sys.stderr)
                details = describe_scheme(cfg, variants[cfg.name], device, dtype)  # packing, fp8 forward path
                if details:
                    results.run.setdefault("quant_details", {})[cfg.name] = details
                # under --tp each variant keeps its shards at once: one whole copy at a time on the CPU
                variants[cfg.name] = shard(variants[cfg.name], cfg.name)
            variants["fp"] = shard(loaded.model, "fp")  # last: every variant was copied from its whole weights

        def reload(new_dtype):
            if preloaded is not None:  # no source to reload from: the same weights, cast
                return copy.deepcopy(preloaded.model).to(new_dtype)
            model = load_model(model_path, device=load_device, dtype=new_dtype, arch=arch,
                               tokenizer_path=tokenizer_path).model
            return _sharder(layout, device)(model, f"fp in {new_dtype}") if sharded else model

        ctx = RunContext(
            loaded=loaded, variants=variants, configs={c.name: c for c in configs}, device=device, dtype=dtype,
            config=config, results=results, data_dir=data_dir, limit=config.data.limit, reload=reload,
            checkpoint=checkpoint,
            show_progress=show_progress,
            rank=layout.dp_rank, world_size=layout.dp, tp_rank=layout.tp_rank,
        )
        measure_stages(ctx, to_run, lambda name: timed(name, measure=True))
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: say where, keep what was measured
        stage = results.run.get("running")
        saved = save_stopped({"interrupted": {"signal": signal_name(e), "stage": stage}, "ended": now()})
        print(f"evalsuite: {signal_name(e)} during stage {stage}; {saved}", file=sys.stderr)
        raise
    except Exception as e:
        stage = results.run.get("running")
        if stage not in STAGE_MODULES:  # a measure stage's error is recorded by measure_stages
            results.add_error(stage, stage_error(e))
        user = user_error(e)
        if user is not None:
            raise EvalsuiteError(f"{user} ({save_stopped({'finished': now()})})") from None
        # a bug, not a user error: keep what was measured, then let it surface
        saved = save_stopped({"finished": now()})
        print(f"evalsuite: stage {stage!r} crashed; {saved}", file=sys.stderr)
        raise
    results.run["finished"] = now()
    if device.type == "cuda":
        from evalsuite.measure.compile_cache import cache_counters

        results.run["compile_cache"] = cache_counters()
    try:
        checkpoint()
    except EvalsuiteError as e:  # --out went away after the last stage: the rescue folder takes them
        raise EvalsuiteError(f"{e} ({save_stopped({})})") from None
    remeasure = None
    if config.judge.confirm and dist_env.world_size == 1:
        from evalsuite.app.confirm import remeasure as remeasure_stages

        def remeasure(stages, variants):
            return remeasure_stages(ctx, results, stages, variants, out_dir, measure_stages)
    try:
        code = finish(results, out_dir, config, remeasure) if dist_env.is_writer else 0
    except OSError as e:  # the reports could not be written into --out: the results go elsewhere, whole
        from evalsuite.app.run_dir import rescue_dir

        rescue = results.save(rescue_dir(out_dir) / "results.json")
        raise EvalsuiteError(f"--out {out_dir}: cannot write {e.filename or out_dir} "
                             f"({e.strerror or first_line(e)}); the results are saved to {rescue}") from None
    if not stages:  # asked for load and quantize only: they worked; the verdict says INCOMPLETE
        from evalsuite.judge.checks import EXIT_INCOMPLETE

        print("--stages none: loaded and quantized only; nothing was measured, so 'evalsuite gate' on these "
              f"results exits {EXIT_INCOMPLETE} (INCOMPLETE)")
        code = 0 if code == EXIT_INCOMPLETE else code
    if code in (0, 1) and config.fix.suggest and dist_env.world_size == 1:
        suggest_fix(ctx, results, out_dir, config)
    return distributed.broadcast(code, dist_env.world_size)  # every rank exits as rank 0 does


def suggest_fix(ctx, results: Results, out_dir: Path, config: RunConfig) -> None:
    """``--suggest-fix``: the fix of every scheme beyond a within-run limit (failing, or known lossy and
    gated on its baseline), written into the results and reports; the run's exit code stays the judge's."""
    from evalsuite.app import fix
    from evalsuite.app.judge_report import gate_config
    from evalsuite.report import write_reports

    fails = fix.failing_checks(results.verdicts)
    if not fails:
        print("--suggest-fix: every scheme meets its within-run limits: no fix needed")
        return
    t0 = time.perf_counter()
    try:
        fix.suggest(ctx, results, gate_config(config.judge), fails, out_dir, measure_stages)
    except KeyboardInterrupt as e:  # the run's verdict stands; what the fix found so far is kept, marked so
        for variant in fails:
            entry = results.details.setdefault("fix", {}).setdefault(variant, {})
            if entry.get("status") not in ("verified", "verification failed", "no recipe within the budget"):
                entry["status"] = f"interrupted by {signal_name(e)}"
        raise
    finally:  # a verification that failed leaves what was found, and its error, in the reports
        results.run["stage_seconds"]["fix"] = round(time.perf_counter() - t0, 3)
        write_reports(results, out_dir)


def finish(results: Results, out_dir: Path, config: RunConfig, remeasure=None) -> int:
    """Judge, write reports, print the table; the exit code says whether a gate failed."""
    from evalsuite.app.judge_report import judge_and_report

    return judge_and_report(results, out_dir, config.judge, remeasure, explicit_out=config.output.out is not None)


def stage_error(e: BaseException) -> str:
    """How a stage's error is recorded in results.json's ``errors``: a user's mistake in its one line,
    anything else as an internal error with its type."""
    user = user_error(e)
    return str(user) if user is not None else f"internal error: {type(e).__name__}: {e}"


def measure_stages(ctx, stages: list[str], timer=None) -> None:
    """The run loop: each of ``stages`` (in run order) over ``ctx`` (its models, its config, its
    results), each under ``timer(name)`` (default: its seconds in ``results.run["stage_seconds"]``).
    A stage that raises is recorded in ``ctx.results.errors`` (``stage_error``) and the error goes on.
    Used by ``evalsuite run``, ``--confirm``'s re-measurement, a fix verification and ``evaluate()``."""
    import torch

    for name in stages:
        stage = get_stage(name)
        with (timer or _stage_seconds(ctx.results))(name):
            try:
                with torch.inference_mode():
                    stage.run(ctx)
            except Exception as e:
                ctx.results.add_error(name, stage_error(e))
                raise


def _stage_seconds(results: Results):
    @contextlib.contextmanager
    def timer(name: str):
        t0 = time.perf_counter()
        yield
        results.run.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 3)

    return timer


def fix_results(config: RunConfig, results: Results, path: Path, *, gates: str | None = None, device: str | None = None,
                model: str | None = None, data_dir: str | None = None, threads: int | None = None) -> int:
    """``evalsuite fix RESULTS.json``: re-judge the run's within-run limits and fix each failing scheme,
    with the run's ``config`` (its fix options replaced by the command's); loads the run's model."""
    import torch

    from evalsuite.app import fix
    from evalsuite.judge.checks import finalize
    from evalsuite.judge.config import load_gate_config
    from evalsuite.judge.within import within_run_checks

    gate = load_gate_config(gates or config.judge.gates, strict=config.judge.strict)  # the run's limits by default
    checks = finalize(within_run_checks(results, gate), gate.strict)
    fails = fix.failing_checks([c.to_dict() for c in checks])
    if not fails:
        print("every scheme meets its within-run limits: no fix needed")
        return 0
    fix.validate(config.fix, config.option("ppl_corpus"))
    model_path = Path(model or (results.run.get("model") or {}).get("path") or "")
    if not model_path.exists():
        raise EvalsuiteError(f"{path}: the run's model {model_path} is not there; pass --model PATH")
    data_dir = data_dir or results.run.get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise EvalsuiteError(f"data dir {data_dir} is not there; pass --data-dir DIR")
    unknown = [v for v in fails if v not in (results.run.get("schemes") or [])]
    if unknown:
        raise EvalsuiteError(f"{path}: failing variants {', '.join(unknown)} are not schemes of the run")

    from evalsuite.load import load_model
    from evalsuite.measure.context import RunContext
    from evalsuite.quantize import parse_scheme, quantize_
    from evalsuite.quantize.policy import parse_skip
    from evalsuite.report import write_reports

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device or (results.run.get("device") or {}).get("type") or "auto")
    dtype = getattr(torch, DTYPES[results.run.get("dtype", "fp32")])
    loaded = load_model(model_path, device=dev, dtype=dtype, arch=config.model.arch, tokenizer_path=config.model.tokenizer)
    # a named variant (NAME=SPEC, a recipe) is re-made from its spec as the run recorded it
    specs = results.run.get("quant_specs") or {}
    configs = {v: parse_scheme(f"{v}={specs[v]}" if v in specs else v) for v in fails}
    skip = parse_skip(config.model.skip_layers)
    variants = {"fp": loaded.model, **{v: quantize_(copy.deepcopy(loaded.model), c, skip=skip) for v, c in configs.items()}}
    config = config.with_data(data_dir=str(data_dir) if data_dir else None, limit=results.run.get("limit"))
    ctx = RunContext(loaded=loaded, variants=variants, configs=configs, device=dev, dtype=dtype, config=config,
                     results=results, data_dir=Path(data_dir) if data_dir else None, limit=results.run.get("limit"),
                     show_progress=sys.stderr.isatty())
    try:
        details = fix.suggest(ctx, results, gate, fails, path.parent, measure_stages)
    finally:
        write_reports(results, path.parent)
    return fix.exit_code(details)
