#!/usr/bin/env bash
# The gate on unchanged code, on one H200 (after `source .gpu/env.sh`), in two calls of <= 10 min:
#
#   call 1:  bash benchmarks/gpu_gate.sh calibrate
#            bench_aa (5 fresh `--stages ppl,tasks` runs: default twice, other batch sizes, --kernels
#            eager, --task-packing off) -> $OUT/baselines/<model>/cuda-bf16/noise.json; the blessed full
#            default run; `evalsuite baseline update` into $OUT/baselines; then, time permitting, one
#            full default run judged against those baselines.
#   between: copy $OUT/baselines/SmolLM2-135M-Instruct.Q4_1/cuda-bf16/{fp,int8-wo}.{json,npz} and
#            noise.json into reports/baselines/SmolLM2-135M-Instruct.Q4_1/cuda-bf16/ and commit.
#   call 2:  bash benchmarks/gpu_gate.sh verify
#            fresh `python3 -m evalsuite run` processes against the committed baselines: two full
#            default runs (all stages, ~190 s each, ~150 s of it torch.compile in the speed stage),
#            --kernels eager, --ppl-batch 4 --task-batch-size 512, and default runs without the speed
#            stage while time is left (eager and batch sizes do not change what speed measures, and a
#            speed baseline timed with other kernels is reported, not gated).
#
# Prints and appends to $OUT/gate_summary.txt each run's exit code, time and verdict summary, and
# its FAIL / INCONCLUSIVE lines. BUDGET (default 570 s) bounds the call: a run that would not fit is
# listed as SKIPPED, not started.
set -u
phase=${1:?usage: gpu_gate.sh calibrate|verify}
OUT=${OUT:-/tmp/evalsuite-gate}; export OUT
WORK=${WORK:-/tmp/evalsuite-gate-work}
mkdir -p "$OUT/logs" "$WORK"
M=${EVALSUITE_MODEL_FILE:?source .gpu/env.sh first}
D=${EVALSUITE_DATA_DIR:?source .gpu/env.sh first}
BUDGET=${BUDGET:-570}
# calibrate writes the new baselines here and verify reads them from here: on a device machine a path
# outside the repository (e.g. /root/stash/baselines) survives from one call to the next while the
# machine is held, so verify judges against exactly the files that are then committed
GATE_BASELINES=${GATE_BASELINES:-}
START=$(date +%s)
summary="$OUT/gate_summary.txt"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

run() {  # run LABEL NEEDED_SECONDS [evalsuite run options...]
  local label=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then
    echo "$label SKIPPED: needs ~${need}s, $(left)s left" | tee -a "$summary"; return
  fi
  local t0; t0=$(date +%s)
  python3 -m evalsuite run --model "$M" --data-dir "$D" --no-history --no-progress --out "$WORK/$label" "$@" \
    > "$OUT/logs/$label.log" 2>&1
  local rc=$?
  echo "$label rc=$rc $(( $(date +%s) - t0 ))s  options: $*" | tee -a "$summary"
  grep -E "^gate (PASSED|FAILED)" "$OUT/logs/$label.log" | tail -1 | tee -a "$summary"
  grep -E "^(FAIL|INCONCLUSIVE|WITHIN-NOISE) " "$OUT/logs/$label.log" | cut -c1-220 | head -30 >> "$summary"
  [ -f "$WORK/$label/report.md" ] && cp "$WORK/$label/report.md" "$OUT/logs/$label.report.md"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
echo "phase $phase, git $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$summary"
case "$phase" in
  calibrate)
    t0=$(date +%s)
    B=${GATE_BASELINES:-$OUT/baselines}
    timeout 300 python3 benchmarks/bench_aa.py --write-baselines "$B" --runs-dir "$WORK/aa" \
      > "$OUT/logs/bench_aa.log" 2>&1
    echo "bench_aa rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$summary"
    tail -25 "$OUT/logs/bench_aa.log"
    run blessed 200 --baselines "$B"
    python3 -m evalsuite baseline update "$WORK/blessed/results.json" --baselines "$B" | tee -a "$summary"
    [ "$B" = "$OUT/baselines" ] || cp -r "$B" "$OUT/baselines"
    run default-1 200 --baselines "$B"
    ;;
  verify)
    if [ -n "$GATE_BASELINES" ]; then set -- --baselines "$GATE_BASELINES"; else set --; fi
    run default-2 200 "$@"
    run eager 90 --kernels eager --stages ppl,tasks,layers "$@"
    run batch 70 --ppl-batch 4 --task-batch-size 512 --stages ppl,tasks,layers "$@"
    run default-3 200 "$@"
    run default-4-no-speed 60 --stages ppl,tasks,layers "$@"
    run default-5-no-speed 60 --stages ppl,tasks,layers "$@"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
cat "$summary"
