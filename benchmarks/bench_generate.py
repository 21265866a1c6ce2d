"""Benchmark of generation: GSM8K (lm-eval's gsm8k task, 5 shots, up to 256 new tokens) for fp and
int8-wo on SmolLM2, our adapter (KV-cached, batched ``generate_until``) vs lm-eval's HFLM.

    source .gpu/env.sh && python3 benchmarks/bench_generate.py                 # GPU: 1319 questions
    python3 benchmarks/bench_generate.py --quick                               # CPU smoke run

Times (device synchronised around each): ``fast_s[variant]`` = TorchLM answering every request of the
task plus lm-eval's filters and scoring, under the fused forwards as the tasks stage runs it;
``hf_s[variant]`` = the same through HFLM (batch ``--hf-batch-size``) on the first ``--hf-limit``
questions only (HFLM on all 1319 x 2 does not fit the device call), and ``hf_extrapolated_s`` =
hf_s x n / hf_limit: the questions are in the file's order, so the subset is a fair sample of
lengths. ``speedup`` = hf_extrapolated_s / fast_s per variant.
Agreement: in float32, the two adapters' generated texts on the first ``--check`` questions, for fp
and int8-wo (``identical``, and the first differing question if any). Writes ``$OUT/generate.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
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
    args = p.parse_args()

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

    def variants_in(dt):
        loaded = load_model(model_path, device=device, dtype=dt)
        return loaded.tokenizer, {"fp": loaded.model, cfg.name: quantize_(copy.deepcopy(loaded.model), cfg)}

    tok, variants = variants_in(dtype)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": str(dtype).replace("torch.", ""), "kernels": args.kernels, "hf_batch_size": args.hf_batch_size}
    with torch.inference_mode(), stage.lm_eval_session():
        tm = stage.task_manager(stage.task_dirs(), data_dir)
        task = stage.load_task(tm, "gsm8k")
        by_doc = stage.build_requests(task, limit)
        n = len(by_doc)
        report.update(n=n, hf_limit=min(hf_limit, n), check=min(check_n, n),
                      generation_kwargs=next(iter(by_doc.values()))[0].args[1])
        # warm-up: CUDA context, cuBLAS, the fused kernels' compilation, on two questions
        warm = subset(by_doc, 2)
        for model in variants.values():
            with fast_forward_all(model, enabled=args.kernels == "fused"):
                texts(TorchLM(model, tok, device=device), warm)
        report["fast_s"], report["hf_s"], report["hf_extrapolated_s"], report["speedup"] = {}, {}, {}, {}
        report["exact_match"] = {}
        encode_cache: dict = {}
        for variant, model in variants.items():
            lm = TorchLM(model, tok, device=device, encode_cache=encode_cache)
            with fast_forward_all(model, enabled=args.kernels == "fused"):
                answers, s = timed(lambda: texts(lm, by_doc), device)
            scores, score_s = timed(lambda: em(task, by_doc, answers), device)
            report["fast_s"][variant] = round(s + score_s, 3)
            report["exact_match"][variant] = scores
            hf_docs = subset(by_doc, hf_limit)
            hf = HFLM(pretrained=model, tokenizer=tok, batch_size=args.hf_batch_size, device=str(device))
            hf_answers, hs = timed(lambda: texts(hf, hf_docs), device)
            _, hscore_s = timed(lambda: em(task, hf_docs, hf_answers), device)
            report["hf_s"][variant] = round(hs + hscore_s, 3)
            report["hf_extrapolated_s"][variant] = round((hs + hscore_s) * n / len(hf_docs), 3)
            report["speedup"][variant] = round(report["hf_extrapolated_s"][variant] / report["fast_s"][variant], 2)
            report.setdefault("same_text_bf16_subset", {})[variant] = float(np.mean(
                [a == b for a, b in zip(answers[:len(hf_docs)], hf_answers)]))
            print(f"{variant}: fast {report['fast_s'][variant]:.2f}s for {n}; HFLM {report['hf_s'][variant]:.2f}s for "
                  f"{len(hf_docs)} -> {report['hf_extrapolated_s'][variant]:.1f}s for {n} (extrapolated); "
                  f"speed-up {report['speedup'][variant]}x; exact match {scores}", flush=True)
        del variants
        # identical greedy outputs in float32 (HFLM runs eager HF forwards; ours as the stage runs it)
        tok32, variants32 = variants_in(torch.float32)
        check_docs = subset(by_doc, check_n)
        report["fp32_check"] = {}
        for variant, model in variants32.items():
            with fast_forward_all(model, enabled=args.kernels == "fused"):
                ours = texts(TorchLM(model, tok32, device=device), check_docs)
            theirs = texts(HFLM(pretrained=model, tokenizer=tok32, batch_size=args.hf_batch_size, device=str(device)),
                           check_docs)
            same = [a == b for a, b in zip(ours, theirs)]
            first = next((k for k, s in enumerate(same) if not s), None)
            report["fp32_check"][variant] = {
                "n": len(same), "identical": int(sum(same)),
                "first_difference": None if first is None else {"doc": first, "ours": ours[first], "hflm": theirs[first]}}
            print(f"fp32 {variant}: {sum(same)}/{len(same)} identical generations (ours vs HFLM)", flush=True)
    total_fast = sum(report["fast_s"].values())
    total_hf = sum(report["hf_extrapolated_s"].values())
    report["total_speedup"] = round(total_hf / total_fast, 2)
    print(f"total fp + int8-wo: fast {total_fast:.2f}s, HFLM {total_hf:.1f}s (extrapolated from {report['hf_limit']} "
          f"of {n} questions): {report['total_speedup']}x")
    write_out("generate", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
