#!/usr/bin/env bash
# Every GPU measurement in one call on the device machine (after `source .gpu/env.sh`):
#   bash benchmarks/gpu_all.sh [bench ...]      (default: all benchmarks/bench_*.py, then the gpu tests)
# Writes $OUT/<bench>.json (each script's own), $OUT/logs.txt (every log, one after another) and
# $OUT/summary.txt; BENCH_TIMEOUT (default 240 s) bounds each benchmark.
set -u
OUT=${OUT:-/tmp/evalsuite-bench}; mkdir -p "$OUT"
export OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/summary.txt"
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then benches=(benchmarks/bench_*.py gpu-tests); fi
for b in "${benches[@]}"; do
  name=$(basename "$b" .py)
  log=$(mktemp)
  t0=$(date +%s)
  if [ "$b" = gpu-tests ]; then
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$log" 2>&1
  else
    timeout "${BENCH_TIMEOUT:-240}" python3 "$b" > "$log" 2>&1
  fi
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  { echo "===== $name (rc=$rc)"; grep -v "it/s\]" "$log"; } >> "$OUT/logs.txt"
  tail -5 "$log"
done
