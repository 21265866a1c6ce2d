"""The fix's two searches (issue #30) side by side on one calibration slice: recipe size at a KLD target
and the forwards each spent.

    python3 benchmarks/compare_fix_search.py                          # GPU: SmolLM2, int4-wo-g128, 4096 tokens
    python3 benchmarks/compare_fix_search.py --device cpu --tokens 512 --context 512   # CPU (fp32)

Searches (``evalsuite.measure.sensitivity``), each from every layer in the scheme to the first
assignment whose measured KLD and ln(ppl ratio) are below the target (``--target-kld``, default 0.12 =
0.8 x int4's 0.15 limit; ln ratio below 0.8 ln 1.15), within a 25% byte budget:

- ``path``: Fisher estimates, then a bisection of the estimated path (``--fix-search path``, default);
- ``greedy``: Fisher estimates as the prior, every move measured (``--fix-search greedy``);
- ``greedy-loo``: the search before 2026-12-08: one counterfactual forward a layer (its leave-one-out
  KLD drop) as the prior, then the same measured greedy.

Reads $EVALSUITE_MODEL_FILE (default: the installed SmolLM2) and $EVALSUITE_DATA_DIR; writes
``$OUT/fix_search.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchutil import write_out  # noqa: E402


def main(argv=None) -> int:
    import torch

    from evalsuite.app.fix import budget_bytes, parse_budget
    from evalsuite.load.model import default_model_path, load_model
    from evalsuite.measure import sensitivity as S
    from evalsuite.measure.corpus import load_corpus
    from evalsuite.measure.perplexity import select_stats
    from evalsuite.quantize import parse_scheme, quantize_

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", default="int4-wo-g128")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target-kld", type=float, default=0.12)
    p.add_argument("--searches", default="path,greedy,greedy-loo")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(os.environ.get("EVALSUITE_MODEL_FILE") or default_model_path(), device, dtype)
    fp = loaded.model
    q = quantize_(copy.deepcopy(fp), parse_scheme(a.scheme))
    text, source, _ = load_corpus("wikitext2-valid", Path(os.environ.get("EVALSUITE_DATA_DIR", "data")))
    windows = S.calibration_windows(loaded.tokenizer, text, a.tokens, a.context, source)
    formats = S.layer_formats(fp, S.quantized_layer_names(q), S.candidate_schemes(a.scheme), q)
    stats_fn, _, _ = select_stats(device, False, True)
    budget = budget_bytes(parse_budget("25%"), formats)
    ln_target = 0.8 * math.log(1.15)

    def target(m) -> bool:
        return m.kld_mean <= a.target_kld and m.ln_ppl_ratio <= ln_target

    with torch.inference_mode():
        cf = S.Counterfactuals(fp, q, windows.input_ids, device, stats_fn,
                               batch_size=len(windows) if device.type == "cuda" else 1)
    batch = max(1, min(8, len(formats) // 25))
    out = {"args": vars(a), "device": str(device), "layers": len(formats), "tokens": int(windows.n_scored.sum()),
           "bits_per_weight_scheme": S.bits_per_weight(formats, {}), "runs": {}}
    t = time.perf_counter()
    prior, _ = S.fisher_prior(S.fisher_estimates(fp, formats, cf.batches)[0], formats)
    fisher_s = time.perf_counter() - t
    rows = []
    for name in a.searches.split(","):
        f0, t = cf.forwards, time.perf_counter()
        with torch.inference_mode():
            if name == "path":
                s = S.path_search(cf, formats, target, budget, prior)
            elif name == "greedy":
                s = S.greedy_formats(cf, formats, target, budget, batch=batch, prior=prior)
            elif name == "greedy-loo":
                base = cf.measure_modules({})
                loo = {}
                for n, fs in formats.items():  # the old prior: a layer in fp, measured; intermediate formats unknown
                    drop = base.kld_mean - cf.measure_modules({n: fs[-1].module}).kld_mean
                    loo.update({(n, j): drop / max(fs[j].bytes - fs[0].bytes, 1) for j in range(1, len(fs))})
                s = S.greedy_formats(cf, formats, target, budget, batch=batch, prior=loo)
            else:
                raise SystemExit(f"unknown search {name}")
        seconds = time.perf_counter() - t + (0.0 if name == "greedy-loo" else fisher_s)
        run = {"bits_per_weight": s.bits_per_weight, "kld_mean": s.metrics.kld_mean, "ppl_ratio": s.metrics.ppl_ratio,
               "met": s.met, "forwards": cf.forwards - f0, "seconds": round(seconds, 2),
               "layers_raised": sum(1 for v in s.assignment.values() if v != a.scheme)}
        out["runs"][name] = run
        rows.append(f"| {name} | {run['bits_per_weight']:.3f} | {run['kld_mean']:.4g} | {run['ppl_ratio']:.4g} | "
                    f"{run['layers_raised']} | {run['forwards']} | {run['seconds']:.1f} |")
        print(rows[-1], flush=True)
        write_out("fix_search", out)
    print(f"\n{a.scheme} on {out['tokens']} calibration tokens ({device}, {dtype}); scheme alone "
          f"{out['bits_per_weight_scheme']:.3f} bits/weight; Fisher estimates {fisher_s:.1f} s; target KLD {a.target_kld}")
    print("| search | bits/weight | KLD (calibration) | ppl ratio | layers raised | forwards | seconds |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
