"""Benchmark of generation: GSM8K (lm-eval's gsm8k task, 5 shots, up to 256 new tokens) for fp and
int8-wo on SmolLM2, our adapter (static KV cache, CUDA-graph decoding, batched ``generate_until``) vs
lm-eval's HFLM.

    OUT=... timeout 540 python3 benchmarks/bench_generate.py                  # GPU: 1319 questions
    python3 benchmarks/bench_generate.py --quick --path static                # CPU smoke run (16 new tokens)

Times (device synchronised around each): ``fast_s[variant]`` = TorchLM answering every request of the
task plus lm-eval's filters and scoring, under the fused forwards as the tasks stage runs it;
``hf_s[variant]`` = the same through HFLM (batch ``--hf-batch-size``) on the first ``--hf-limit``
questions only (HFLM on all 1319 x 2 does not fit the device call), and ``hf_extrapolated_s`` =
hf_s x n / hf_limit: the questions are in the file's order, so the subset is a fair sample of
lengths (an extrapolation, not a measurement). ``speedup`` = hf_extrapolated_s / fast_s per variant.
Agreement: in float32, the two adapters' generated texts on the first ``--check`` questions, for fp
and int8-wo (``identical``, and the first differing question if any). ``decode`` = which decoding
path ours took (static / dynamic, CUDA graph or why not). ``$OUT/generate.json`` is rewritten after
every part, so a call cut short keeps what it measured; a part that would not fit ``--budget-s``
(estimated from HFLM's own pace) is skipped and named in ``skipped``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchutil import timed, write_out  # noqa: E402

from evalsuite.load.fast_forward import fast_forward_all  # noqa: E402
from evalsuite.load.model import prefer_expandable_segments  # noqa: E402
from evalsuite.measure import tasks as stage  # noqa: E402
from evalsuite.measure.lm_adapter import TorchLM  # noqa: E402

prefer_expandable_segments()


def subset(by_doc: dict, n: int) -> dict:
    return dict(list(by_doc.items())[:n])


def texts(lm, by_doc: dict) -> list[str]:
    return stage.answer(lm, by_doc)


def em(task, by_doc: dict, answers: list) -> dict[str, float]:
    per_doc = stage.score(task, by_doc, answers)
    return {m: float(np.mean([d[m] for d in per_doc.values()])) for m in next(iter(per_doc.values()))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 4 questions, 2 for HFLM and the check")
    p.add_argument("--limit", type=int, help="questions (default all 1319)")
    p.add_argument("--hf-limit", type=int, default=128, help="questions HFLM answers per variant (then extrapolated)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--check", type=int, default=100, help="questions whose fp32 texts both adapters must agree on")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="timing dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--kernels", choices=["fused", "eager"], default="fused")
    p.add_argument("--path", choices=["static", "dynamic"], help="our decoding path (default: the adapter's own)")
    p.add_argument("--max-gen-toks", type=int, help="new tokens per question (default the task's 256; --quick: 16)")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="skip a later part that would end past this many seconds from the start (default 500)")
    args = p.parse_args()
    t_start = time.perf_counter()

    from lm_eval.models.huggingface import HFLM

    from evalsuite.load import default_model_path, load_model
    from evalsuite.quantize import parse_schemes, quantize_

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    limit = args.limit or (4 if args.quick else None)
    hf_limit = 2 if args.quick else args.hf_limit
    check_n = 2 if args.quick else args.check
    data_dir = Path(os.environ.get("EVALSUITE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    model_path = Path(os.environ["EVALSUITE_MODEL_FILE"]) if os.environ.get("EVALSUITE_MODEL_FILE") else default_model_path()
    (cfg,) = parse_schemes("int8-wo")
    fused = args.kernels == "fused"

    def variants_in(dt):
        loaded = load_model(model_path, device=device, dtype=dt)
        return loaded.tokenizer, {"fp": loaded.model, cfg.name: quantize_(copy.deepcopy(loaded.model), cfg)}

    def ours(model, tok, **kw):
        lm = TorchLM(model, tok, device=device, **kw)
        lm.generation_path = args.path
        return lm

    def elapsed():
        return time.perf_counter() - t_start

    def fits(estimate_s, part):
        if estimate_s is None or elapsed() + estimate_s <= args.budget_s:
            return True
        report["skipped"].append(f"{part}: ~{estimate_s:.0f}s estimated at {elapsed():.0f}s of {args.budget_s:.0f}s")
        print(f"skipped {part} (estimated {estimate_s:.0f}s, budget {args.budget_s:.0f}s)", flush=True)
        write_out("generate", report)
        return False

    tok, variants = variants_in(dtype)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": str(dtype).replace("torch.", ""), "kernels": args.kernels, "hf_batch_size": args.hf_batch_size,
                    "torch": torch.__version__, "path_asked": args.path, "skipped": [],
                    "fast_s": {}, "hf_s": {}, "hf_extrapolated_s": {}, "speedup": {}, "exact_match": {},
                    "decode": {}, "same_text_bf16_subset": {}, "fp32_check": {}}
    with torch.inference_mode(), stage.lm_eval_session():
        tm = stage.task_manager(stage.task_dirs(), data_dir)
        task = stage.load_task(tm, "gsm8k")
        by_doc = stage.build_requests(task, limit)
        max_gen_toks = args.max_gen_toks or (16 if args.quick else None)
        if max_gen_toks:  # both adapters read the request's own generation arguments
            for group in by_doc.values():
                for inst in group:
                    inst.arguments = (inst.args[0], {**inst.args[1], "max_gen_toks": max_gen_toks})
        n = len(by_doc)
        report.update(n=n, hf_limit=min(hf_limit, n), check=min(check_n, n),
                      generation_kwargs=next(iter(by_doc.values()))[0].args[1])
        # warm-up: CUDA context, cuBLAS, the fused kernels' compilation, on two questions
        warm = subset(by_doc, 1 if args.quick else 2)
        for model in variants.values():
            with fast_forward_all(model, enabled=fused):
                texts(ours(model, tok), warm)
        encode_cache: dict = {}
        all_answers = {}
        for variant, model in variants.items():  # ours first: the headline numbers
            lm = ours(model, tok, encode_cache=encode_cache)
            with fast_forward_all(model, enabled=fused):
                answers, s = timed(lambda: texts(lm, by_doc), device)
            scores, score_s = timed(lambda: em(task, by_doc, answers), device)
            all_answers[variant] = answers
            report["fast_s"][variant] = round(s + score_s, 3)
            report["exact_match"][variant] = scores
            report["decode"][variant] = getattr(lm, "generation_info", None)
            print(f"{variant}: ours {report['fast_s'][variant]:.2f}s for {n} questions; exact match {scores}; "
                  f"decode {report['decode'][variant]}", flush=True)
            write_out("generate", report)
        hf_docs = subset(by_doc, hf_limit)
        for variant, model in variants.items():
            previous = report["hf_s"].get("fp")
            if not fits(None if previous is None else previous * 1.2, f"HFLM {variant}"):
                continue
            hf = HFLM(pretrained=model, tokenizer=tok, batch_size=args.hf_batch_size, device=str(device))
            hf_answers, hs = timed(lambda: texts(hf, hf_docs), device)
            _, hscore_s = timed(lambda: em(task, hf_docs, hf_answers), device)
            report["hf_s"][variant] = round(hs + hscore_s, 3)
            report["hf_extrapolated_s"][variant] = round((hs + hscore_s) * n / len(hf_docs), 3)
            report["speedup"][variant] = round(report["hf_extrapolated_s"][variant] / report["fast_s"][variant], 2)
            report["same_text_bf16_subset"][variant] = float(np.mean(
                [a == b for a, b in zip(all_answers[variant][:len(hf_docs)], hf_answers)]))
            print(f"{variant}: HFLM {report['hf_s'][variant]:.2f}s for {len(hf_docs)} -> "
                  f"{report['hf_extrapolated_s'][variant]:.1f}s for {n} (extrapolated); speed-up "
                  f"{report['speedup'][variant]}x", flush=True)
            write_out("generate", report)
        if report["hf_s"]:
            total_fast = sum(report["fast_s"][v] for v in report["hf_s"])
            total_hf = sum(report["hf_extrapolated_s"].values())
            report["total_speedup"] = round(total_hf / total_fast, 2)
            print(f"total {' + '.join(report['hf_s'])}: ours {total_fast:.2f}s, HFLM {total_hf:.1f}s (extrapolated "
                  f"from {report['hf_limit']} of {n} questions): {report['total_speedup']}x", flush=True)
            write_out("generate", report)
        del variants
        if not check_n:  # --check 0: no float32 agreement check
            variants32 = {}
        else:  # identical greedy outputs in float32 (HFLM runs eager HF forwards; ours as the stage runs it)
            tok32, variants32 = variants_in(torch.float32)
        check_docs = subset(by_doc, check_n)
        hf_per_question = max(report["hf_s"].values(), default=None)
        for variant, model in variants32.items():
            estimate = None if hf_per_question is None else 2.0 * hf_per_question * len(check_docs) / len(hf_docs)
            if not fits(estimate, f"fp32 check {variant}"):
                continue
            lm = ours(model, tok32)
            with fast_forward_all(model, enabled=fused):
                mine = texts(lm, check_docs)
            theirs = texts(HFLM(pretrained=model, tokenizer=tok32, batch_size=args.hf_batch_size, device=str(device)),
                           check_docs)
            same = [a == b for a, b in zip(mine, theirs)]
            first = next((k for k, s in enumerate(same) if not s), None)
            report["fp32_check"][variant] = {
                "n": len(same), "identical": int(sum(same)), "decode": getattr(lm, "generation_info", None),
                "first_difference": None if first is None else {"doc": first, "ours": mine[first], "hflm": theirs[first]}}
            print(f"fp32 {variant}: {sum(same)}/{len(same)} identical generations (ours vs HFLM)", flush=True)
            write_out("generate", report)
    report["wall_s"] = round(elapsed(), 1)
    write_out("generate", report)
    print(f"done in {report['wall_s']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
