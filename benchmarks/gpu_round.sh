#!/usr/bin/env bash
# One device call's worth of GPU checks, in priority order, after `source .gpu/env.sh`:
#
#   bash benchmarks/gpu_round.sh STEP[:SECONDS] ...
#
# Each step runs under its own `timeout` (default 300 s) and only while the call's budget ($ROUND_S,
# default 570 s, counted from this script's start) has room for it, so that one slow step never
# takes the results of the others with it. Steps:
#   whole      benchmarks/gpu_whole.sh runs (the default run twice: fresh machine, then second run)
#   gsm8k      benchmarks/gpu_soundness.sh gsm8k
#   formats    benchmarks/gpu_soundness.sh formats (ppl, tasks, layers, then speed, for five schemes)
#   kernels    benchmarks/gpu_soundness.sh kernels (evalsuite vs torchao kernels on 7B shapes)
#   gputests   pytest -m gpu (every GPU-marked test)
#   scale7b    benchmarks/bench_scale.py, Llama-2-7B shape, int8-wo, ppl stage, cold and warm
#   limits     benchmarks/calibrate_limits.py (fp8 and int8 ppl + layers)
#   fix        benchmarks/bench_fix.py $FIX_ARGS (default: --quant int4-wo-g128 --stages ppl,tasks; issue 30)
#   fixsearch  benchmarks/compare_fix_search.py (the fix's searches side by side on the calibration slice)
# Every step's stdout goes to $OUT/round-<step>.log and its exit code and seconds to $OUT/round.txt.
set -u
OUT=${OUT:-/tmp/evalsuite-round}
ROUND_S=${ROUND_S:-570}
mkdir -p "$OUT"
t_start=$(date +%s)
for spec in "$@"; do
  step=${spec%%:*}; limit=300; [ "$spec" != "$step" ] && limit=${spec#*:}
  left=$(( ROUND_S - ($(date +%s) - t_start) ))
  if [ "$left" -lt 20 ]; then echo "$step: skipped, $left s left in the round" | tee -a "$OUT/round.txt"; continue; fi
  [ "$limit" -gt "$left" ] && limit=$left
  case $step in
    whole)    cmd=(bash benchmarks/gpu_whole.sh runs) ;;
    gsm8k)    cmd=(bash benchmarks/gpu_soundness.sh gsm8k) ;;
    formats)  cmd=(bash benchmarks/gpu_soundness.sh formats) ;;
    kernels)  # the benchmark's own budget ends its rows early enough to print the table and JSON in time
              # (a row compiles for up to ~50 s past it; a SIGTERM still leaves the rows measured)
              cmd=(env KERNELS_BUDGET_S=$(( limit > 200 ? limit - 90 : limit / 2 )) bash benchmarks/gpu_soundness.sh kernels) ;;
    gputests) cmd=(python3 -m pytest -q -s -rfEs -m gpu -p no:cacheprovider tests) ;;
    scale7b)  cmd=(python3 benchmarks/bench_scale.py --shapes llama2-7b --schemes int8-wo --stages ppl --warm
                   --budget-s $((limit - 10))) ;;
    limits)   cmd=(python3 benchmarks/calibrate_limits.py --out "$OUT/calibrate") ;;
    fix)      cmd=(python3 benchmarks/bench_fix.py ${FIX_ARGS:---quant int4-wo-g128 --stages ppl,tasks}) ;;
    fixsearch) cmd=(python3 benchmarks/compare_fix_search.py) ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "${cmd[@]}" > "$OUT/round-$step.log" 2>&1
  rc=$?
  echo "$step: exit $rc in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s (limit $limit s)" | tee -a "$OUT/round.txt"
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$OUT/round.txt" 2>&1
