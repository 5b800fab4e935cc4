#!/usr/bin/env bash
# The first GPU run of the split Mosaic dQ / dK kernels (chunkwise_mosaic bw_kernels="mosaic_split":
# the score gradient of each block pair computed once, bw_parallel_split.py; docs/benchmarks.md),
# one device call of ~4 minutes on an H200:
#   (tests) the three compiled gradient cases of tests/kernels/test_chunkwise_mosaic.py with
#           bw_kernels=mosaic_split (standard, 7B, small heads; float64 reference), one process each;
#   (bench) fwbw of chunkwise_mosaic (bw_kernels mosaic, the default) and :bw_kernels=mosaic_split at
#           standard 8 x 8192, 7B 8 x 8192 and small 16 x 2048, profiled (every kernel named; command
#           buffers off).
# Usage (repository root): OUT=$OUT bash scripts/gpu_mosaic_split.sh [PART ...], PART in tests bench.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_mosaic_split}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=${*:-tests bench}
want() { [[ " $PARTS " == *" $1 "* ]]; }
t_all=$(date +%s)
if want tests; then
  n=0
  for sel in "128-256" "256-512" "64-128"; do
    timeout -k 10 "${TEST_LIMIT:-150}" $PY -m pytest -q -p no:cacheprovider -o addopts= \
      -k "test_gpu_gradients_against and mosaic_split and $sel" \
      tests/kernels/test_chunkwise_mosaic.py > "$OUT/tests_$n.log" 2>&1 &
    n=$((n + 1))
  done
  wait
fi
if want bench; then
  for r in ${ROWS:-standard:8,8192 7b:8,8192 small:16,2048}; do
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout -k 10 "${BENCH_LIMIT:-75}" \
      $PY -m xlstm_jax bench --heads "${r%%:*}" --shapes "${r#*:}" --modes fwbw --grad-mode exact \
      --kernels chunkwise_mosaic chunkwise_mosaic:bw_kernels=mosaic_split --reps 10 --no-ceilings \
      --profile "$OUT/prof" --json "$OUT/bench_${r%%:*}.json" > "$OUT/bench_${r%%:*}.log" 2>&1
    echo "bench $r: rc=$?" >> "$OUT/bench_${r%%:*}.log"
  done
fi
rm -rf "$OUT/prof"  # traces stay on the machine; the logs hold the breakdowns
for f in "$OUT"/tests_*.log; do
  [ -f "$f" ] && echo "tests $(basename "$f"): $(grep -E '[0-9]+ (passed|failed|error|deselected)' "$f" | tail -n 1)" \
    && grep -E "^(FAILED|ERROR)|Error" "$f" | head -n 6 | cut -c1-300
done
for f in "$OUT"/bench_*.log; do
  [ -f "$f" ] && sed -n '/^profile /,/more kernels/p' "$f" | grep -E "^profile|pallas" | cut -c1-150 && tail -n 1 "$f"
done
echo "total $(( $(date +%s) - t_all )) s"
