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
#   speed:   bash benchmarks/gpu_gate.sh speed-noise      (call it twice: 5 processes of ~200 s)
#            fresh `--stages speed` processes (the default three times, --quant int8-wo,int4-wo-g128 in
#            both orders); once 3+ are done, bench_aa --speed-only --from them -> the between-process
#            spread of tokens/s and of the speed-up per speed task, merged into the noise.json in
#            GATE_BASELINES (default reports/baselines; its ppl/tasks statistics are kept); then one
#            speed-only process with three variants judged against it.
#
# Prints and appends to $OUT/gate_summary.txt each run's exit code, time and verdict summary, and
# its FAIL / INCONCLUSIVE lines. BUDGET (default 570 s) bounds the call: a run that would not fit is
# listed as SKIPPED, not started.
set -u
phase=${1:?usage: gpu_gate.sh calibrate|verify|speed-noise}
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
  # the headline and its wrapped continuation lines
  awk '/^gate (PASSED|FAILED|INCOMPLETE)/{p=1; print; next} p && /^  /{print; next} {p=0}' "$OUT/logs/$label.log" \
    | tee -a "$summary"
  grep -E "^(FAIL|INCONCLUSIVE|WITHIN-NOISE) " "$OUT/logs/$label.log" | cut -c1-220 | head -30 >> "$summary"
  [ -f "$WORK/$label/report.md" ] && cp "$WORK/$label/report.md" "$OUT/logs/$label.report.md"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
echo "phase $phase, git $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$summary"
case "$phase" in
  calibrate)
    t0=$(date +%s)
    B=${GATE_BASELINES:-$OUT/baselines}
    timeout 300 python3 benchmarks/bench_aa.py --speed-configs "" --write-baselines "$B" --runs-dir "$WORK/aa" \
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
  speed-noise)
    # fresh speed-only processes (each ~150-200 s, mostly torch.compile), skipping those already
    # done in $WORK by an earlier call; once 3 or more exist, bench_aa calibrates from them
    B=${GATE_BASELINES:-reports/baselines}
    for spec in "speed-a:int8-wo" "speed-b:int8-wo" "speed-c:int8-wo,int4-wo-g128" "speed-d:int4-wo-g128,int8-wo" \
                "speed-e:int8-wo"; do
      label=${spec%%:*}
      [ -f "$WORK/$label/results.json" ] || run "$label" 220 --stages speed --quant "${spec#*:}" --baselines "$WORK/none"
    done
    done_runs=$(ls "$WORK"/speed-?/results.json 2>/dev/null)
    if [ "$(echo "$done_runs" | grep -c results.json)" -ge 3 ]; then
      python3 benchmarks/bench_aa.py --speed-only --write-baselines "$B" --from $done_runs \
        > "$OUT/logs/bench_aa_speed.log" 2>&1
      echo "bench_aa --speed-only rc=$? from $(echo "$done_runs" | wc -l) runs -> $B" | tee -a "$summary"
      grep -E "^speed/" "$OUT/logs/bench_aa_speed.log" | tee -a "$summary"
      # comes back with $OUT: commit it as reports/baselines/<model>/cuda-bf16/noise.json
      mkdir -p "$OUT/noise" && find "$B" -name noise.json -exec cp --parents {} "$OUT/noise/" \;
      run three-variants-speed 220 --stages speed --baselines "$B" \
        --quant "int8-wo,int4-wo-g128,mine=examples/int8_handler.py:WeightOnlyInt8QuantHandler"
    else
      echo "speed-noise: fewer than 3 speed runs so far; call this phase again" | tee -a "$summary"
    fi
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
cat "$summary"
