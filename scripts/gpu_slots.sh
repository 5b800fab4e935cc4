#!/usr/bin/env bash
# One device call (~8 minutes on an H200) for issue 9's fifth session:
#   (tests)   the compiled Mosaic tests (gpu_mosaic.sh tests: three processes; the refactored dQ/dK
#             epilogues and the single-buffered forward / dV kernels, pipeline_slots=1) and
#             tests/models/test_backend_registry.py (its highest-precision comparison), side by side,
#             each under TEST_LIMIT seconds, none preallocating the GPU's memory;
#   (bench)   fw and fwbw of chunkwise_mosaic with pipeline_slots 2 (the default) and 1, and with the
#             DHV tile 64 (siz_b_DH_parallel=64: two programs per SM with either slot count), at
#             8 x 8192 (standard and 7B heads) and the small row 16 x 2048;
#   (profile) the per-kernel profile of the faster slot count at the standard heads, 8 x 8192,
#             command buffers off (every kernel named);
#   (cmdbuf)  the small row (chunkwise_pallas) with XLA command buffers as default, off, and with
#             --xla_gpu_graph_min_graph_size=1: whether the launch gaps there are command-buffer
#             bound.
# Usage (repository root): OUT=$OUT bash scripts/gpu_slots.sh [PART ...] (default: all four).
# Logs and JSON under $OUT; the summary is printed last.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_slots}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=${*:-tests bench profile cmdbuf}
want() { [[ " $PARTS " == *" $1 "* ]]; }
t_all=$(date +%s)
summary=()

if want tests; then
  t0=$(date +%s)
  OUT="$OUT/tests" PYTHON=$PY TEST_LIMIT="${TEST_LIMIT:-270}" bash scripts/gpu_mosaic.sh tests > "$OUT/tests_mosaic.log" 2>&1 &
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${TEST_LIMIT:-270}" $PY -m pytest -q -p no:cacheprovider \
    -o addopts= -m "not slow" tests/models/test_backend_registry.py > "$OUT/tests_backend.log" 2>&1 &
  wait
  summary+=("tests: $(( $(date +%s) - t0 )) s")
fi

if want bench; then
  K="chunkwise_mosaic chunkwise_mosaic:pipeline_slots=1 chunkwise_mosaic:siz_b_DH_parallel=64 chunkwise_mosaic:siz_b_DH_parallel=64,pipeline_slots=1"
  for r in standard:8,8192 7b:8,8192 small:16,2048; do
    t0=$(date +%s)
    timeout -k 10 "${BENCH_LIMIT:-110}" $PY -m xlstm_jax bench --heads "${r%%:*}" --shapes "${r#*:}" --kernels $K \
      --modes fw fwbw --reps 10 --warmup 2 --no-ceilings --json "$OUT/slots_${r%%:*}.json" > "$OUT/slots_${r%%:*}.log" 2>&1
    summary+=("bench $r: rc=$? ($(( $(date +%s) - t0 )) s)")
  done
fi

if want profile; then
  t0=$(date +%s)
  mkdir -p "$OUT/profile"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout -k 10 "${PROFILE_LIMIT:-90}" \
    $PY -m xlstm_jax bench --heads standard --shapes 8,8192 --kernels chunkwise_mosaic:pipeline_slots=1 \
    --modes fw fwbw --reps 10 --no-ceilings --profile "$OUT/profile" --json "$OUT/profile/bench.json" \
    > "$OUT/profile/standard.log" 2>&1
  summary+=("profile: rc=$? ($(( $(date +%s) - t0 )) s)")
fi

if want cmdbuf; then
  for v in default off min1; do
    t0=$(date +%s)
    case $v in
      default) flags="${XLA_FLAGS:-}" ;;
      off) flags="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" ;;
      min1) flags="${XLA_FLAGS:-} --xla_gpu_graph_min_graph_size=1" ;;
    esac
    XLA_FLAGS="$flags" timeout -k 10 "${CMDBUF_LIMIT:-60}" $PY -m xlstm_jax bench --heads small --shapes 16,2048 \
      --kernels chunkwise_pallas --modes fw fwbw --reps 20 --warmup 3 --no-ceilings --label "cmdbuf_$v" \
      --json "$OUT/cmdbuf_$v.json" > "$OUT/cmdbuf_$v.log" 2>&1
    summary+=("cmdbuf $v: rc=$? ($(( $(date +%s) - t0 )) s)")
  done
fi

echo "==================== summary ===================="
for f in "$OUT"/tests/mosaic_tests_*.log "$OUT/tests_backend.log"; do
  [ -f "$f" ] && echo "tests $(basename "$f"): $(grep -E '[0-9]+ (passed|failed|error)' "$f" | tail -n 1)" \
    && grep -E "^(FAILED|ERROR)" "$f" | head -n 10
done
[ -f "$OUT/profile/standard.log" ] && sed -n '/^profile /,/more kernels/p' "$OUT/profile/standard.log" \
  | grep -E "^profile|^ " | cut -c1-150 | head -n 40
for f in "$OUT"/slots_*.log "$OUT"/cmdbuf_*.log; do
  [ -f "$f" ] || continue
  echo "--- $(basename "$f")"
  grep -E "^\| |ms|error|Error" "$f" | grep -v "^\s*$" | tail -n 14
done
for line in "${summary[@]}"; do echo "$line"; done
echo "total $(( $(date +%s) - t_all )) s"
