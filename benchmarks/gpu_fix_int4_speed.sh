#!/usr/bin/env bash
# One device call (after `source .gpu/env.sh`, <= 10 min on one H200) for SmolLM2:
#   1. benchmarks/bench_fix.py (issue 17: the fix vs simple strategies, its cost in ppl stages) and the
#      fix's GPU test;
#   2. the blessed full run of fp + int8-wo + int4-wo-g128 (all stages) and `baseline update` of the
#      int4-wo-g128 baseline from it (schema /2: paired data) -> $OUT/int4-wo-g128.{json,npz};
#   3. speed A/A: fresh `--stages speed` processes of the default fp + int8-wo, to measure the
#      between-process spread of tokens/s and of the speed-up (issue 14) -> $OUT/speed_aa.json
#      (with the 3-variant process of step 2 as one more, other-variant-set, sample).
# EVALSUITE_CACHE should point at a folder that survives between calls (compile caches).
set -u
OUT=${OUT:-/tmp/evalsuite-a}; export OUT; mkdir -p "$OUT"
W=${WORK:-/root/stash/work}; mkdir -p "$W"
M=${EVALSUITE_MODEL_FILE:?source .gpu/env.sh first}; D=${EVALSUITE_DATA_DIR:?source .gpu/env.sh first}
BUDGET=${BUDGET:-560}; START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
say "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) rev ${EVALSUITE_GIT_REVISION:-?}"

t0=$(date +%s); timeout 240 python3 benchmarks/bench_fix.py > "$OUT/fix.log" 2>&1
say "bench_fix rc=$? $(( $(date +%s) - t0 ))s"
t0=$(date +%s); timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fix.py > "$OUT/pytest_fix.log" 2>&1
say "pytest gpu test_fix rc=$? $(( $(date +%s) - t0 ))s"

runs=()
if [ "$(left)" -gt 200 ]; then
  t0=$(date +%s)
  python3 -m evalsuite run --model "$M" --data-dir "$D" --quant int8-wo,int4-wo-g128 --no-history --no-progress \
    --out "$W/blessed-int4" > "$OUT/blessed_int4.log" 2>&1
  say "blessed int8-wo,int4-wo-g128 rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^gate " "$OUT/blessed_int4.log" | tee -a "$OUT/summary.txt"
  python3 -m evalsuite baseline update "$W/blessed-int4/results.json" --variant int4-wo-g128 --baselines "$W/bl" \
    | tee -a "$OUT/summary.txt"
  cp "$W"/bl/*/*/int4-wo-g128.json "$W"/bl/*/*/int4-wo-g128.npz "$OUT/" 2>/dev/null
  runs+=("$W/blessed-int4/results.json")
fi
i=0
while [ "$(left)" -gt 45 ] && [ $i -lt 6 ]; do
  i=$((i+1)); t0=$(date +%s)
  python3 -m evalsuite run --model "$M" --data-dir "$D" --stages speed --no-history --no-progress \
    --out "$W/speed-$i" > "$W/speed-$i.log" 2>&1
  say "speed-$i rc=$? $(( $(date +%s) - t0 ))s"; runs+=("$W/speed-$i/results.json")
done
python3 - "${runs[@]}" > "$OUT/speed_aa.json" <<'PY'
import json, sys
out = []
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except OSError:
        continue
    recs = [m for m in r.get("metrics", r.get("records", [])) if m.get("stage") == "speed"]
    out.append({"results": path, "schemes": r["run"].get("schemes"),
                "speed": [{k: m.get(k) for k in ("task", "variant", "metric", "value", "ci95", "n")} | {"cv": (m.get("extra") or {}).get("cv")} for m in recs
                          if m.get("metric") in ("tokens_per_s", "speedup", "roofline_fraction")]})
print(json.dumps(out, indent=1))
PY
cat "$OUT/summary.txt"
