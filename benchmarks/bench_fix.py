"""The fix's recipe (issue #30) on the real model: its effective bits per weight, each verification
check, the size-quality frontier, and the fix's cost in ppl stages of the same variant.

For each scheme, one ``evalsuite run --quant SCHEME --suggest-fix`` (in this process, through the
CLI, judged without baselines: the committed ones mark int4 known lossy, and its fix is what is
measured here). The cost unit is the run's own ppl stage (fp + the scheme, as ``evalsuite run``
measures it); the fix's cost is ``stage_seconds.fix`` (formats, sensitivity, search, every
verification round and the frontier's predictions) over it.

    python3 benchmarks/bench_fix.py                            # GPU: SmolLM2, int4-wo-g128 and int4-wo-g32
    python3 benchmarks/bench_fix.py --quant int4-wo-g128 --stages ppl
    python3 benchmarks/bench_fix.py --quant int4-wo-g128 --fix-search greedy   # the measured greedy, to compare
    python3 benchmarks/bench_fix.py --device cpu --limit 4 --context 256 --fix-tokens 512 \\
        --quant int4-wo-g32 --stages ppl                      # CPU smoke
    python3 benchmarks/bench_fix.py --shape llama2-7b --quant int4-wo-g128 --stages ppl --kld-limit-fraction 0.5
        # the fix's time at 7B scale: a random-weight Llama-2-7B-shaped folder (bench_scale's), its KLD
        # limit set to half the KLD a first ppl run measures, so that there is something to fix

Reads $EVALSUITE_MODEL_FILE (default: the installed SmolLM2) and $EVALSUITE_DATA_DIR; writes
``$OUT/fix.json`` and each run's folder under ``$OUT/bench_fix/``, and prints a markdown table for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchutil import write_out  # noqa: E402
from evalsuite.app.fix import SEARCHES, describe_check  # noqa: E402
from evalsuite.commands.cli import main as evalsuite_main  # noqa: E402
from evalsuite.results import Results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default="int4-wo-g128,int4-wo-g32", help="schemes, each fixed in its own run")
    p.add_argument("--stages", default="ppl,tasks",
                   help="the run's stages (default ppl,tasks: the gated accuracy stages a recipe can fix)")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, help="windows and items per task (default: the whole data)")
    p.add_argument("--context", type=int, help="--ppl-context (default the run's, 2048)")
    p.add_argument("--fix-tokens", type=int, default=4096)
    p.add_argument("--fix-budget", default="25%")
    p.add_argument("--fix-rerank", type=int, default=8)
    p.add_argument("--fix-search", default=SEARCHES[0], choices=SEARCHES, help="the fix's search (default path)")
    p.add_argument("--verify-strategies", action="store_true", help="--fix-verify-strategies (costs a verification each)")
    p.add_argument("--shape", help="a random-weight folder of this bench_scale shape (llama2-7b, llama3-8b, tiny) "
                                   "instead of the real model")
    p.add_argument("--kld-limit-fraction", type=float,
                   help="first measure each scheme's KLD (a ppl run), then fix it against a KLD limit of this fraction "
                        "of it (--gates): a scheme that passes its real limits still gets a fix to time")
    return p.parse_args(argv)


def run_argv(a, scheme: str, model: str, data_dir: str, out: Path, baselines: Path, gates: Path | None = None,
             fix: bool = True) -> list[str]:
    argv = ["run", "--model", model, "--quant", scheme, "--stages", a.stages, "--device", a.device,
            "--data-dir", data_dir, "--out", str(out), "--no-history", "--no-progress", "--baselines", str(baselines)]
    if fix:
        argv += ["--suggest-fix", "--fix-tokens", str(a.fix_tokens), "--fix-budget", a.fix_budget,
                 "--fix-rerank", str(a.fix_rerank), "--fix-search", a.fix_search]
    if gates:
        argv += ["--gates", str(gates)]
    if a.limit:
        argv += ["--limit", str(a.limit)]
    if a.context:
        argv += ["--ppl-context", str(a.context)]
    if a.verify_strategies:
        argv.append("--fix-verify-strategies")
    return argv


def frontier_table(scheme: str, fix: dict) -> list[str]:
    """Markdown rows: the verified recipes of the search, the last point of each round, the strategies."""
    from evalsuite.report.document import frontier_rows

    return [f"| {' | '.join(r)} |" for r in frontier_rows(scheme, fix.get("frontier") or [])]


def build_model(shape: str, target: Path) -> tuple[str, dict]:
    """bench_scale's random-weight Llama folder of ``shape`` (drawn on the GPU where there is one)."""
    import torch

    from benchmarks.bench_scale import build_folder, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build_folder(target, shape, load_tokenizer(), device)
    print(f"built {shape}: {built['n_params'] / 1e9:.2f}B parameters in {built['build_s']} s", flush=True)
    return str(target), {k: v for k, v in built.items() if k != "config"}


def probe_limits(a, scheme: str, model: str, data_dir: str, root: Path, baselines: Path) -> tuple[Path, dict]:
    """A ppl run of ``scheme`` (no fix), and a gates file whose KLD limit is ``--kld-limit-fraction`` of
    the KLD it measured (its ppl-ratio limit left loose): the next run's fix has that much to remove."""
    probe_dir = root / f"{scheme}.probe"
    argv = run_argv(a, scheme, model, data_dir, probe_dir, baselines, fix=False)
    argv[argv.index("--stages") + 1] = "ppl"
    t = time.perf_counter()
    code = evalsuite_main(argv)
    results = Results.load(probe_dir / "results.json")
    kld = next(m.value for m in results.find(stage="ppl", variant=scheme, metric="kld_mean"))
    limit = a.kld_limit_fraction * kld
    gates = root / f"{scheme}.gates.yaml"
    gates.write_text(f'schemes:\n  "{scheme}*": {{kld_mean_max: {limit:.6g}, ppl_ratio_max: 100}}\n')
    print(f"{scheme}: probe KLD {kld:.4g} (exit {code}); fixing against kld_mean_max {limit:.4g}", flush=True)
    return gates, {"kld_mean": kld, "kld_mean_max": limit, "exit_code": code,
                   "wall_s": round(time.perf_counter() - t, 2), "stage_seconds": results.run.get("stage_seconds")}


def main(argv=None) -> int:
    from evalsuite.load.model import default_model_path

    a = parse_args(argv)
    model = os.environ.get("EVALSUITE_MODEL_FILE") or str(default_model_path())
    data_dir = os.environ.get("EVALSUITE_DATA_DIR", "data")
    root = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_fix-")) / "bench_fix"
    baselines = root / "no-baselines"
    baselines.mkdir(parents=True, exist_ok=True)
    out: dict = {"args": vars(a), "model": model, "schemes": {}}
    built_dir = None
    if a.shape:  # outside $OUT (a 7B folder is 13 GB), removed when the benchmark ends
        built_dir = Path(tempfile.mkdtemp(prefix="bench_fix-model-"))
        model, out["built"] = build_model(a.shape, built_dir / a.shape)
        out["model"] = model
    try:
        return _run(a, model, data_dir, root, baselines, out)
    finally:
        if built_dir is not None:
            shutil.rmtree(built_dir, ignore_errors=True)


def _run(a, model: str, data_dir: str, root: Path, baselines: Path, out: dict) -> int:
    summary, frontier = [], []
    for scheme in a.quant.split(","):
        run_dir = root / scheme
        gates = None
        if a.kld_limit_fraction:
            gates, out.setdefault("probe", {})[scheme] = probe_limits(a, scheme, model, data_dir, root, baselines)
        argv_run = run_argv(a, scheme, model, data_dir, run_dir, baselines, gates)
        t = time.perf_counter()
        code = evalsuite_main(argv_run)
        wall = time.perf_counter() - t
        results = Results.load(run_dir / "results.json")
        seconds = results.run.get("stage_seconds") or {}
        fix = (results.details.get("fix") or {}).get(scheme)
        entry = {"exit_code": code, "wall_s": wall, "stage_seconds": seconds, "argv": argv_run,
                 "device": results.run.get("device"), "failing": [v["check"] for v in results.verdicts if v.get("failing")]}
        out["schemes"][scheme] = entry
        print(f"\n== {scheme}: exit {code}, failing {entry['failing'] or 'none'}; stage seconds {seconds}", flush=True)
        if not fix:
            print(f"{scheme}: no fix (the scheme passed its limits)")
            write_out("fix", out)
            continue
        ppl_s, fix_s = seconds.get("ppl"), seconds.get("fix")
        entry["fix"] = {k: fix.get(k) for k in (
            "status", "bits_per_weight", "bits_per_weight_scheme", "bytes_extra", "budget_bytes", "layers_raised",
            "layers_quantized", "layers_by_scheme", "raised", "predicted", "before", "verified", "verification_checks",
            "rounds", "frontier", "seconds", "command", "recipe", "recipe_content", "stop_reason", "search",
            "seconds_estimate")}
        entry["fix_over_ppl_stage"] = fix_s / ppl_s if ppl_s and fix_s else None
        print(f"recipe {fix['recipe']}: {fix['bits_per_weight']:.3f} bits/weight (scheme alone "
              f"{fix['bits_per_weight_scheme']:.3f}), {fix['layers_raised']} of {fix['layers_quantized']} layers raised "
              f"{fix['layers_by_scheme']}; status {fix['status']} after {fix['seconds']['rounds']} round(s)")
        for c in fix["verification_checks"]:
            print(f"  {describe_check(c)}")
        if entry["fix_over_ppl_stage"] is not None:
            print(f"fix {fix_s:.1f} s = {entry['fix_over_ppl_stage']:.2f} ppl stages (ppl stage {ppl_s:.1f} s; "
                  f"{fix['seconds']})")
        print(f"  {fix['command']}", flush=True)
        verified = fix["verified"]["metrics"].get("kld_mean", {}).get("value")
        kld = "" if verified is None else f"{verified:.4g}"
        cost = "" if entry["fix_over_ppl_stage"] is None else f"{entry['fix_over_ppl_stage']:.2f}"
        summary.append(f"| {scheme} | {fix['status']} | {fix['bits_per_weight']:.3f} | {fix['bits_per_weight_scheme']:.3f} "
                       f"| {fix['layers_raised']} | {kld} | {fix['verified']['verdict']} | {fix['seconds']['rounds']} "
                       f"| {cost} |")
        frontier += frontier_table(scheme, fix)
        write_out("fix", out)
    print("\n| scheme | status | recipe bits/weight | scheme bits/weight | layers raised | verified KLD | gate | rounds "
          "| fix / ppl stage |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(summary))
    print("\n| scheme | strategy | bits/weight | extra MiB | predicted KLD (calibration) | verified KLD (evaluation) "
          "| verdict |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(frontier))
    out["table"], out["frontier_table"] = summary, frontier
    write_out("fix", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
