#!/usr/bin/env bash
# The whole command on SmolLM2 (issue 18, items 4 and 5), on one GPU after `source .gpu/env.sh`:
#
#   bash benchmarks/gpu_whole.sh runs     the default `evalsuite run` (all stages, int8-wo) twice in fresh
#                                         processes on one fresh cache folder: the first as on a fresh
#                                         machine, the second as the next run on the same machine
#   bash benchmarks/gpu_whole.sh matrix   the shipped configs/nightly.yaml's three-scheme entry (int8-wo,
#                                         int4-wo-g128, int8-dq, all stages, each its own process) on a
#                                         fresh cache folder; the matrix's wall time over its first entry's
#
# Each run's wall time, stage seconds, load phases, fp-cache statuses and compile-cache counters go to
# stdout and $OUT/whole-<phase>.json. The model is $EVALSUITE_MODEL_FILE (the device machine has the
# GGUF, not the package).
set -u
phase=${1:?usage: gpu_whole.sh runs|matrix}
OUT=${OUT:-/tmp/evalsuite-whole}
WORK=$(mktemp -d)
M=${EVALSUITE_MODEL_FILE:?source .gpu/env.sh first}
mkdir -p "$OUT"
export EVALSUITE_CACHE="$WORK/cache"

summarise() {  # results.json paths -> one JSON line each
  python3 - "$@" <<'EOF'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))["run"]
    print(json.dumps({"results": path, "stage_seconds": r.get("stage_seconds"), "load_seconds": r.get("load_seconds"),
                      "fp_cache": {k: v.get("status") for k, v in (r.get("fp_cache") or {}).items()},
                      "compile_cache": r.get("compile_cache"),
                      "speed_compile_cache": {v: {t: (c.get("status"), c.get("compile_s"), c.get("inductor"))
                                                  for t, c in runs.items()}
                                              for v, runs in ((r.get("speed") or {}).get("compile_cache") or {}).items()}}))
EOF
}

case $phase in
runs)
  : > "$OUT/whole-runs.txt"
  for pass in fresh second; do
    t0=$(date +%s.%N)
    python3 -m evalsuite run --model "$M" --out "$WORK/run-$pass" --no-progress > "$WORK/$pass.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    wall=$(python3 -c "print(round($t1 - $t0, 1))")
    echo "$pass: exit $rc, wall $wall s: $(tail -1 "$WORK/$pass.log")" | tee -a "$OUT/whole-runs.txt"
    [ -f "$WORK/run-$pass/results.json" ] && summarise "$WORK/run-$pass/results.json" | tee -a "$OUT/whole-runs.txt"
    cp "$WORK/$pass.log" "$OUT/whole-$pass.log"
    [ -f "$WORK/run-$pass/results.json" ] && cp "$WORK/run-$pass/results.json" "$OUT/whole-$pass.results.json"
  done
  ;;
matrix)
  cfg="$WORK/nightly.yaml"
  sed "s|^  device: cuda|  device: cuda\n  model: $M|" configs/nightly.yaml > "$cfg"
  t0=$(date +%s.%N)
  python3 -m evalsuite nightly --config "$cfg" --out "$WORK/matrix" --no-history \
    --only smollm2_int8-wo_all,smollm2_int4-wo-g128_all,smollm2_int8-dq_all > "$WORK/matrix.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  wall=$(python3 -c "print(round($t1 - $t0, 1))")
  tail -5 "$WORK/matrix.log"
  echo "matrix: exit $rc, wall $wall s" | tee "$OUT/whole-matrix.txt"
  python3 - "$WORK/matrix/summary.json" "$wall" <<'EOF' | tee -a "$OUT/whole-matrix.txt"
import json, sys
s = json.load(open(sys.argv[1]))
entries = s.get("entries", [])
for e in entries:
    print(e.get("name"), e.get("status"), e.get("seconds") or e.get("duration_s"), e.get("exit_code"))
first = entries[0].get("seconds") or entries[0].get("duration_s") if entries else None
if first:
    print(f"matrix wall / first entry: {float(sys.argv[2]) / float(first):.2f}")
EOF
  for f in "$WORK"/matrix/entries/*/results.json "$WORK"/matrix/entries/*/*/results.json; do
    [ -f "$f" ] && summarise "$f" | tee -a "$OUT/whole-matrix.txt"
  done
  ;;
esac
rm -rf "$WORK"
