#!/usr/bin/env bash
# The first GPU run of the Mosaic backward kernels (chunkwise_mosaic bw_kernels="mosaic"; issue 14,
# docs/benchmarks.md "Mosaic GPU backward kernels"), one device call of ~8-9 minutes on an H200:
#   (a) tests/kernels/test_chunkwise_mosaic.py compiled (not slow, not interpret), three pytest
#       processes side by side, each under 300 s, none preallocating the GPU's memory;
#   (b) the seven rows: scripts/gpu_speed.sh with the peer first, the shipped table, exact
#       gradients, kernels chunkwise_pallas, chunkwise_mosaic, chunkwise_mosaic:bw_kernels=mosaic;
#   (c) per-kernel profiles of both Mosaic variants at 8 x 8192 (standard, 7B heads) and the small
#       row (scripts/gpu_suite.sh SECTIONS=kprofile; command buffers off).
# Usage (repository root, carry .whl and .peers for the peer): OUT=$OUT bash scripts/gpu_mosaic_bw.sh
# [PART ...], PART in tests speed kprofile (default: all three). Everything goes to $OUT/mosaic_bw.tgz
# (logs and JSON; no traces) as well, so that one file comes back; the tables are printed last.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_mosaic_bw}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=${*:-tests speed kprofile}
want() { [[ " $PARTS " == *" $1 "* ]]; }
W=$(mktemp -d)
t_all=$(date +%s)

if want tests; then  # the Mosaic test file in gpu_mosaic.sh's three processes (logs mosaic_tests_*.log)
  OUT="$W" PYTHON=$PY TEST_LIMIT="${TEST_LIMIT:-300}" bash scripts/gpu_mosaic.sh tests > "$W/tests_mosaic.log" 2>&1
fi

if want speed; then
  OUT="$W/speed" PEER_FIRST=1 SKIP_TUNE=1 BENCH_GRAD_MODES=exact \
    BENCH_KERNELS="chunkwise_pallas chunkwise_mosaic chunkwise_mosaic:bw_kernels=mosaic" \
    timeout -k 10 "${SPEED_LIMIT:-330}" bash scripts/gpu_speed.sh > "$W/speed.log" 2>&1
  echo "speed: rc=$?" >> "$W/speed.log"
  OUT="$W/speed" ONLY_TABLE=1 bash scripts/gpu_speed.sh > "$W/speed_table.log" 2>&1
fi

if want kprofile; then
  OUT="$W/kp" SECTIONS=kprofile KPROFILE_ROWS="standard:8,8192 7b:8,8192 small:16,2048" KPROFILE_LIMIT=120 \
    KPROFILE_KERNELS="chunkwise_mosaic chunkwise_mosaic:bw_kernels=mosaic" bash scripts/gpu_suite.sh \
    > "$W/kprofile.log" 2>&1
fi

(cd "$W" && find . \( -name "*.log" -o -name "*.json" -o -name "*.jsonl" \) -print0 | tar czf "$OUT/mosaic_bw.tgz" --null -T -)
for f in "$W"/mosaic_tests_*.log; do
  [ -f "$f" ] && echo "tests $(basename "$f"): $(grep -E '[0-9]+ (passed|failed|error)' "$f" | tail -n 1)" \
    && grep -E "^(FAILED|ERROR)" "$f" | head -n 10
done
[ -f "$W/kprofile.log" ] && grep -hE "^profile" "$W"/kp/kprofile/*.log 2>/dev/null | cut -c1-200
[ -f "$W/speed_table.log" ] && tail -n 32 "$W/speed_table.log"
echo "total $(( $(date +%s) - t_all )) s; files: $OUT/mosaic_bw.tgz"
