"""Benchmark of the tasks stage: wall time per task for fp and int8-wo, fast adapter vs lm-eval's HFLM.

    EVALSUITE_DATA_DIR=../shared/data python3 benchmarks/bench_tasks.py            # GPU, full tasks
    python3 benchmarks/bench_tasks.py --quick                                      # CPU-feasible smoke run

Times: ``build_s`` = lm-eval building the task's requests (once per task, shared by variants),
``fast_s[variant]`` = TorchLM answering every request plus lm-eval's per-item scoring,
``hf_s[variant]`` = the same through HFLM (with --hf). The device is synchronised around each timing.
Last, ``stage_end_to_end_s`` = the tasks stage itself (``evalsuite.measure.tasks.run``) over the same
tasks and variants, where the next task's requests are tokenized while the device works, and the
results file is saved after every variant as ``evalsuite run`` does: the number the stage's target is
about (the per-task times above run everything in sequence).
Agreement with HFLM: the largest per-item |log-likelihood difference| in nats and the fraction of
items with the same acc. Writes ``$OUT/tasks.json`` when $OUT is set.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchutil import sync, timed, write_out  # noqa: E402

from evalsuite.load.fast_forward import fast_forward_all  # noqa: E402
from evalsuite.load.model import prefer_expandable_segments  # noqa: E402
from evalsuite.measure import tasks as stage  # noqa: E402
from evalsuite.measure.lm_adapter import TorchLM  # noqa: E402

prefer_expandable_segments()  # as the CLI does, before any CUDA allocation

MIRRORED = "arc_easy,arc_challenge,piqa,winogrande,lambada_openai,boolq,copa,openbookqa"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 items per task, CPU fp32 allowed")
    p.add_argument("--tasks", default=MIRRORED)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, help="default: the adapter's (4096 on GPU)")
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--hf", default="arc_easy,piqa,lambada_openai",
                   help="tasks also run through lm-eval's HFLM (batch 32), '' for none")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--kernels", choices=["fused", "eager"], default="fused",
                   help="fast adapter's forwards under fast_forward (as the stage runs them) or eager")
    p.add_argument("--packing", choices=["auto", "off"], default="auto",
                   help="the fast adapter's packed batches (auto: on a GPU for Llama models, as the stage) or off")
    p.add_argument("--cprofile", action="store_true",
                   help="print the 25 costliest functions (own time) of the fast adapter's runs; a wait on the "
                        "device shows as tolist()")
    args = p.parse_args()

    from evalsuite.load import default_model_path, load_model
    from evalsuite.quantize import parse_schemes, quantize_

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, len(os.sched_getaffinity(0)))))
    limit = args.limit or (8 if args.quick else None)
    data_dir = Path(os.environ.get("EVALSUITE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    model_path = Path(os.environ["EVALSUITE_MODEL_FILE"]) if os.environ.get("EVALSUITE_MODEL_FILE") else default_model_path()

    loaded = load_model(model_path, device=device, dtype=dtype)
    (cfg,) = parse_schemes("int8-wo")
    variants = {"fp": loaded.model, cfg.name: quantize_(copy.deepcopy(loaded.model), cfg)}
    tok = loaded.tokenizer
    hf_tasks = [t for t in args.hf.split(",") if t]

    t_setup = time.perf_counter()
    with stage.lm_eval_session():
        tm = stage.task_manager(stage.task_dirs(), data_dir)
    setup_s = time.perf_counter() - t_setup
    # warm-up: CUDA context, cuBLAS handles, tokenizer, and the fused kernels' one-time compilation
    # (Triton caches it on disk: a machine pays it on its first run only)
    t_warm = time.perf_counter()
    for model in variants.values():
        with torch.inference_mode(), fast_forward_all(model, enabled=args.kernels == "fused"):
            TorchLM(model, tok, device=device)._loglikelihood_tokens([(("w", "u"), list(range(1, 64)), [5, 6])])
    sync(device)
    warmup_s = time.perf_counter() - t_warm

    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": str(dtype).replace("torch.", ""), "limit": limit, "batch_size": args.batch_size,
                    "packing": args.packing,
                    "task_manager_s": round(setup_s, 3), "warmup_s": round(warmup_s, 3), "tasks": {}}
    encode_cache: dict = {}
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
    total_fast = total_build = total_hf = 0.0
    with torch.inference_mode(), stage.lm_eval_session():
        for name in [t for t in args.tasks.split(",") if t]:
            (task, by_doc), build_s = timed(lambda: _build(tm, name, limit), device)
            row: dict = {"n": len(by_doc), "build_s": round(build_s, 3), "fast_s": {}, "metrics": {}}
            fast_ll = {}
            fast_acc = {}
            for variant, model in variants.items():
                lm = TorchLM(model, tok, device=device, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                             encode_cache=encode_cache, packed=False if args.packing == "off" else None)
                if profiler is not None:
                    profiler.enable()
                with fast_forward_all(model, enabled=args.kernels == "fused"):
                    per_doc, s = timed(lambda: stage.run_model(lm, task, by_doc), device)
                if profiler is not None:
                    profiler.disable()
                row["fast_s"][variant] = round(s, 3)
                total_fast += s
                fast_ll[variant] = stage.loglikelihoods(by_doc)
                fast_acc[variant] = [d.get("acc") for d in per_doc.values()]
                docs = list(per_doc.values())
                row["metrics"][variant] = {r["metric"]: r["value"] for r in stage.variant_records(task, name, variant, docs, {})}
                if variant != "fp":
                    fp_docs = [{"acc": a} for a in fast_acc["fp"]] if fast_acc["fp"][0] is not None else None
                    if fp_docs:
                        paired = stage.paired_records(name, variant, fp_docs, [{"acc": a} for a in fast_acc[variant]], {})
                        row["metrics"][variant].update({r["metric"]: r["value"] for r in paired})
            total_build += build_s
            if name in hf_tasks:
                from lm_eval.models.huggingface import HFLM

                row["hf_s"], row["hf_max_abs_ll_diff"], row["hf_same_acc"] = {}, {}, {}
                for variant, model in variants.items():
                    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=args.hf_batch_size, device=str(device))
                    per_doc, s = timed(lambda: stage.run_model(hf, task, by_doc), device)
                    row["hf_s"][variant] = round(s, 3)
                    total_hf += s
                    ref_ll = stage.loglikelihoods(by_doc)
                    diffs = [abs(a - b) for x, y in zip(fast_ll[variant], ref_ll) for a, b in zip(x, y)]
                    row["hf_max_abs_ll_diff"][variant] = float(np.max(diffs))
                    ref_acc = [d.get("acc") for d in per_doc.values()]
                    row["hf_same_acc"][variant] = float(np.mean([a == b for a, b in zip(fast_acc[variant], ref_acc)]))
                    row["metrics"][variant + "@hf"] = {k: float(v) for k, v in _mean_metrics(per_doc).items()}
            report["tasks"][name] = row
            print(f"{name:16s} n={row['n']:5d} build {build_s:6.2f}s  fast " +
                  "  ".join(f"{v} {s:6.2f}s" for v, s in row["fast_s"].items()) +
                  ("  hf " + "  ".join(f"{v} {s:6.2f}s" for v, s in row["hf_s"].items()) if "hf_s" in row else "") +
                  "  " + "  ".join(f"{v}:" + ",".join(f"{k}={x:.4f}" for k, x in m.items() if k in ("acc", "acc_norm", "ppl", "delta_acc", "mcnemar_p"))
                                   for v, m in row["metrics"].items()), flush=True)
    report["total_fast_s"] = round(total_fast, 3)
    report["total_build_s"] = round(total_build, 3)
    report["total_hf_s"] = round(total_hf, 3)
    report["total_stage_s"] = round(setup_s + total_build + total_fast, 3)
    # the stage itself, end to end (task manager, request building and tokenizing in a worker thread
    # while the device runs the previous task, both variants, records): the number the target is for
    from evalsuite.app.config import RunConfig
    from evalsuite.measure.context import RunContext
    from evalsuite.results import Results

    ns = RunConfig.of_options(tasks=args.tasks, suite=None, tasks_dir=[], task_limit=limit, task_batch_size=args.batch_size,
                            task_batch_tokens=args.batch_tokens, lm_adapter="fast", kernels=args.kernels, seed=0,
                            task_packing=args.packing)
    results = Results(run={"schemes": [cfg.name]})
    with tempfile.TemporaryDirectory() as tmp:  # the results file saved after every variant, as evalsuite run does
        ctx = RunContext(loaded=loaded, variants=variants, configs={cfg.name: cfg}, device=device, dtype=dtype,
                         config=ns, results=results, data_dir=data_dir, show_progress=False,
                         checkpoint=lambda: results.save(Path(tmp) / "results.json"))
        with torch.inference_mode():
            _, stage_s = timed(lambda: stage.run(ctx), device)
    report["stage_end_to_end_s"] = round(stage_s, 3)
    report["stage_seconds_per_variant"] = {t: d["seconds"] for t, d in ctx.results.details["tasks"].items()}
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"total: fast (fp + int8-wo, all tasks) {total_fast:.2f}s, request building {total_build:.2f}s, "
          f"task manager {setup_s:.2f}s (sum {report['total_stage_s']:.2f}s); the stage end to end {stage_s:.2f}s; "
          f"HFLM on {','.join(hf_tasks) or '-'} {total_hf:.2f}s")
    write_out("tasks", report)
    return 0


def _build(tm, name, limit):
    task = stage.load_task(tm, name)
    return task, stage.build_requests(task, limit)


def _mean_metrics(per_doc: dict) -> dict:
    first = next(iter(per_doc.values()))
    return {k: np.mean([d[k] for d in per_doc.values()]) for k, v in first.items() if isinstance(v, (int, float, bool))}


if __name__ == "__main__":
    sys.exit(main())
