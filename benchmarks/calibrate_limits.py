"""The measurement behind the fp8 gate limits and layer floors: ppl + layers for fp8-wo, fp8-dq,
fp8-dq-tensor and int8-wo on the default model, and the limits int8's rule gives them.

    source .gpu/env.sh && python3 benchmarks/calibrate_limits.py --out /tmp/calibrate     # on the GPU
    python3 benchmarks/calibrate_limits.py --from RUN/results.json                         # re-read a run
    python3 benchmarks/calibrate_limits.py --out /tmp/c -- --device cpu --limit 2          # the mechanics

Runs ``evalsuite run --stages ppl,layers --quant fp8-wo,fp8-dq,fp8-dq-tensor,int8-wo`` (anything after
``--`` is passed on: ``--model``, ``--device``, ``--limit``, ...), then prints per variant the measured
``kld_mean`` and ``ppl_ratio`` with their 95% CIs (paired bootstrap over windows, as the gate reads
them), the noise floor (``fp@noise``), the lowest weight / output / hidden-state SQNR with the layer
or block, the limits in force, and the limits derived the way int8's were (docs/limits.md):

- layer floors: about 5 dB under the worst honest layer or block, ``floor(min_sqnr - 5)``;
- ``kld_mean_max``: the variant's KLD times the headroom int8-wo's limit has over int8-wo's KLD in
  the same run (``0.01 / kld(int8-wo)``), rounded up to two significant digits;
- ``ppl_ratio_max``: the same on the excess over 1, ``1 + (ratio - 1) * (1.01 - 1) / (ratio(int8-wo) - 1)``.

A proposal whose CI reaches past it is flagged (the gate could not PASS it). Writes the table's
numbers to ``OUT/limits.json`` (``--out``, default ``$OUT/calibrate`` when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evalsuite.judge.config import load_gate_config  # noqa: E402
from evalsuite.measure.layer_thresholds import load_thresholds  # noqa: E402
from evalsuite.results import Results  # noqa: E402

SCHEMES = "fp8-wo,fp8-dq,fp8-dq-tensor,int8-wo"
REFERENCE = "int8-wo"
FLOOR_MARGIN_DB = 5.0
VIEWS = {"weight": "min_weight_sqnr_db", "output": "min_output_sqnr_db", "hidden": "min_hidden_sqnr_db"}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", default=SCHEMES, help=f"schemes to measure (default {SCHEMES}; must include {REFERENCE})")
    p.add_argument("--out", type=Path, help="run folder and limits.json (default $OUT/calibrate)")
    p.add_argument("--from", dest="from_", type=Path, help="read this results.json instead of running")
    a = p.parse_args(argv)
    if a.out is None and a.from_ is None:
        if not os.environ.get("OUT"):
            p.error("give --out DIR (or set $OUT), or --from RESULTS.json")
        a.out = Path(os.environ["OUT"]) / "calibrate"
    return a, extra


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (0.0123 → 0.013)."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def _record(results: Results, stage: str, variant: str, metric: str, task: str | None = None):
    found = [r for r in results.find(stage, task, variant, metric) if r.value is not None]
    return found[0] if found else None


def _ci(rec) -> list[float] | None:
    return list(rec.ci95) if rec is not None and rec.ci95 else None


def _side(ci: list[float] | None, value: float | None, limit: float | None) -> str:
    """Where a measured interval sits against a ``_max`` limit, as the gate reads it."""
    if limit is None or value is None:
        return "no limit" if limit is None else "not measured"
    lo, hi = ci if ci else (value, value)
    return "passes" if hi < limit else "fails" if lo > limit else "straddles"


def calibrate(results: Results, reference: str = REFERENCE) -> dict[str, Any]:
    """Per variant: measurements, limits in force, proposed limits by int8's rule (module docstring)."""
    gates = load_gate_config(None)
    floors = load_thresholds(None)
    ref_kld = _record(results, "ppl", reference, "kld_mean")
    ref_ratio = _record(results, "ppl", reference, "ppl_ratio")
    ref_limits = gates.scheme(reference)[1]
    headroom_kld = ref_limits["kld_mean_max"] / ref_kld.value if ref_kld and ref_kld.value > 0 else None
    headroom_ratio = ((ref_limits["ppl_ratio_max"] - 1) / (ref_ratio.value - 1)
                      if ref_ratio and ref_ratio.value > 1 else None)
    noise = _record(results, "ppl", "fp@noise", "kld_mean")
    out: dict[str, Any] = {"reference": reference, "headroom_kld": headroom_kld, "headroom_ppl_ratio": headroom_ratio,
                           "noise_floor_kld_mean": noise.value if noise else None, "noise_floor_ci95": _ci(noise),
                           "variants": {}}
    variants = [v for v in dict.fromkeys(r.variant for r in results.records)
                if v not in ("fp", "fp@noise") and "@" not in v]
    for variant in variants:
        pattern, limits = gates.scheme(variant)
        base = floors.for_scheme(variant)[0]
        kld, ratio = _record(results, "ppl", variant, "kld_mean"), _record(results, "ppl", variant, "ppl_ratio")
        row: dict[str, Any] = {"gate_pattern": pattern, "measured": {}, "limits": {}, "proposed": {}, "flags": []}
        for name, rec, limit_key in (("kld_mean", kld, "kld_mean_max"), ("ppl_ratio", ratio, "ppl_ratio_max")):
            value = rec.value if rec else None
            row["measured"][name] = {"value": value, "ci95": _ci(rec)}
            row["limits"][limit_key] = {"value": limits.get(limit_key),
                                        "side": _side(_ci(rec), value, limits.get(limit_key))}
        if kld and headroom_kld:
            row["proposed"]["kld_mean_max"] = round_up(kld.value * headroom_kld)
        if ratio and headroom_ratio:
            row["proposed"]["ppl_ratio_max"] = 1 + round_up(max(ratio.value - 1, 0) * headroom_ratio)
        for key, name in (("kld_mean_max", "kld_mean"), ("ppl_ratio_max", "ppl_ratio")):
            ci = row["measured"][name]["ci95"]
            if key in row["proposed"] and ci and ci[1] >= row["proposed"][key]:
                row["flags"].append(f"{key} {row['proposed'][key]:.4g} is inside {name}'s CI {ci}: could not PASS")
        for view, metric in VIEWS.items():
            rec = _record(results, "layers", variant, metric, task="all")
            worst = (rec.extra.get("worst") or rec.extra.get("worst_block")) if rec else None
            row["measured"][metric] = {"value": rec.value if rec else None, "worst": worst}
            row["limits"][f"{view}_sqnr_db"] = getattr(base, f"{view}_sqnr_db")
            if rec is not None:
                row["proposed"][f"{view}_sqnr_db"] = float(math.floor(rec.value - FLOOR_MARGIN_DB))
        out["variants"][variant] = row
    return out


def _fmt(value, ci=None, digits=4) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}g}"
    return text + (f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]" if ci else "")


def table(cal: dict[str, Any]) -> str:
    lines = [f"reference {cal['reference']}: headroom of its limits over its measurement, KLD ×"
             f"{_fmt(cal['headroom_kld'], digits=3)}, ppl-ratio excess ×{_fmt(cal['headroom_ppl_ratio'], digits=3)}; "
             f"noise floor fp@noise kld_mean {_fmt(cal['noise_floor_kld_mean'], cal['noise_floor_ci95'])}", "",
             "| variant | kld_mean [95% CI] | limit (now → proposed) | ppl_ratio [95% CI] | limit (now → proposed) "
             "| min weight / output / hidden SQNR dB | floors (now → proposed) | worst layer / block |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, r in cal["variants"].items():
        m, lim, prop = r["measured"], r["limits"], r["proposed"]
        sqnr = " / ".join(_fmt(m[metric]["value"], digits=3) for metric in VIEWS.values())
        floors = " / ".join(f"{lim[f'{v}_sqnr_db']:g}→{_fmt(prop.get(f'{v}_sqnr_db'), digits=3)}" for v in VIEWS)
        worst = ", ".join(str(m[metric]["worst"]) for metric in ("min_output_sqnr_db", "min_hidden_sqnr_db"))
        lines.append(
            f"| {variant} | {_fmt(m['kld_mean']['value'], m['kld_mean']['ci95'])} | "
            f"{_fmt(lim['kld_mean_max']['value'])} ({lim['kld_mean_max']['side']}) → {_fmt(prop.get('kld_mean_max'))} | "
            f"{_fmt(m['ppl_ratio']['value'], m['ppl_ratio']['ci95'], 5)} | "
            f"{_fmt(lim['ppl_ratio_max']['value'])} ({lim['ppl_ratio_max']['side']}) → "
            f"{_fmt(prop.get('ppl_ratio_max'), digits=4)} | {sqnr} | {floors} | {worst} |")
    flags = [f"- {v}: {f}" for v, r in cal["variants"].items() for f in r["flags"]]
    return "\n".join(lines + ([""] + flags if flags else []))


def main(argv=None) -> int:
    a, extra = parse_args(argv)
    if a.from_ is not None:
        path = a.from_
    else:
        if REFERENCE not in a.quant.split(","):
            print(f"--quant must include {REFERENCE}: the limits are scaled from its", file=sys.stderr)
            return 2
        from evalsuite.commands.cli import main as evalsuite_main

        run_dir = a.out / "run"
        code = evalsuite_main(["run", "--stages", "ppl,layers", "--quant", a.quant, "--out", str(run_dir),
                               "--no-history", "--no-progress", *extra])
        print(f"evalsuite run exited {code}")
        if code not in (0, 1):
            return code
        path = run_dir / "results.json"
    results = Results.load(path)
    cal = calibrate(results)
    cal["results"] = str(path)
    cal["run"] = {k: results.run.get(k) for k in ("model", "device", "dtype", "model_sha256", "git_revision")
                  if k in results.run}
    print(table(cal))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "limits.json").write_text(json.dumps(cal, indent=1, default=str))
        print(f"wrote {a.out / 'limits.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
