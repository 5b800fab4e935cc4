#!/usr/bin/env bash
# A short closing device call (~5 minutes): the three timers of scripts/small_timers.py for the
# per-call floor (one elementwise kernel), ours and the peer at the small row, then scripts/gpu_final.sh
# without its tests, error check, variants and profiles (the peer and the seven rows of chunkwise_auto
# with the shipped table). Usage: OUT=$OUT bash scripts/gpu_last.sh (carry .whl and .peers).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_last}; mkdir -p "$OUT"; PY=${PYTHON:-python3}
OUT="$OUT" LIMIT=${LIMIT:-250} SKIP_TESTS=1 SKIP_CHECK=1 SKIP_VARIANTS=1 PROFILE_ROWS="" \
  bash scripts/gpu_final.sh > "$OUT/final_stdout.txt" 2>&1
for impl in floor ours peer; do
  PYTHONPATH=/tmp/peers:$PYTHONPATH timeout 25 $PY scripts/small_timers.py $impl small 16,2048 2>&1 | grep RESULT
done > "$OUT/timers.txt"
sed -n '/^chunkwise_auto (same/,/^goal/p' "$OUT/summary.txt"; grep -E "^(peer|ours|total)" "$OUT/summary.txt"; cat "$OUT/timers.txt"
