#!/usr/bin/env bash
# The speed options of chunkwise_pallas against the XLA glue (issue 9; docs/benchmarks.md, "The XLA
# glue around the Pallas kernels, and four options against it") on one GPU, in one call:
#   (a) compiled tests of the option kernels (test_pallas_variants.py whole; the fused / dkdv /
#       validation / float64 cases of test_chunkwise_pallas.py) and the Mosaic family's compiled
#       tests, three pytest processes side by side, each under TEST_LIMIT seconds;
#   (b) the small row (8, 64, 128 at 16 x 2048), fw and fwbw, the defaults and five option sets;
#   (c) the standard and 7B heads at BIG_SHAPES (default 8,8192), the defaults and two option sets,
#       plus chunkwise_mosaic at the standard heads (MOSAIC=0 leaves it out).
# Usage (repository root, GPU machine): OUT=$OUT bash scripts/gpu_glue.sh [PART ...], PART one of
# tests small big (default: all three). Writes $OUT/glue_tests_*.log, $OUT/glue_small.json,
# $OUT/glue_big.json and their logs; prints each table.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_glue}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=${*:-tests small big}
want() { [[ " $PARTS " == *" $1 "* ]]; }
P=chunkwise_pallas

if want tests; then
  t0=$(date +%s)
  L=${TEST_LIMIT:-240}
  timeout -k 10 "$L" $PY -m pytest -q -o addopts= -p no:cacheprovider tests/kernels/test_pallas_variants.py \
    > "$OUT/glue_tests_0.log" 2>&1 &
  timeout -k 10 "$L" $PY -m pytest -q -o addopts= -p no:cacheprovider tests/kernels/test_chunkwise_pallas.py \
    -k "fused or dkdv or validation or test_against" > "$OUT/glue_tests_1.log" 2>&1 &
  timeout -k 10 "$L" $PY -m pytest -q -o addopts= -p no:cacheprovider -m "not slow" -k "not test_interpret" \
    tests/kernels/test_chunkwise_mosaic.py > "$OUT/glue_tests_2.log" 2>&1 &
  wait
  for f in "$OUT"/glue_tests_*.log; do
    echo "--- $f: $(grep -E '[0-9]+ (passed|failed|error)' "$f" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$f" | head -n 20
  done
  echo "tests: $(( $(date +%s) - t0 )) s"
fi

if want small; then
  timeout -k 10 "${SMALL_LIMIT:-200}" $PY -m xlstm_jax bench --heads small --no-ceilings --modes fw fwbw \
    --reps "${REPS:-20}" --warmup 2 --kernels $P $P:gate_grads_impl=fused \
    $P:gate_grads_impl=fused,save_gates=true \
    $P:gates_impl=pallas,gate_grads_impl=fused,save_gates=true \
    $P:gates_impl=fused,gate_grads_impl=fused,save_gates=true \
    $P:gates_impl=fused,gate_grads_impl=fused,save_gates=true,fuse_dkdv=true \
    --json "$OUT/glue_small.json" > "$OUT/glue_small.log" 2>&1
  echo "small: rc=$?"; sed -n '/^kernel /,$p' "$OUT/glue_small.log" | head -n 20
fi

if want big; then
  mk=(); [ "${MOSAIC:-1}" = 1 ] && mk=(chunkwise_mosaic)
  for heads in standard 7b; do
    extra=(); [ $heads = standard ] && extra=("${mk[@]}")
    timeout -k 10 "${BIG_LIMIT:-200}" $PY -m xlstm_jax bench --heads $heads --shapes ${BIG_SHAPES:-8,8192} \
      --no-ceilings --modes fw fwbw --reps "${REPS_BIG:-10}" --warmup 2 \
      --kernels $P $P:gate_grads_impl=fused,save_gates=true $P:gates_impl=fused,gate_grads_impl=fused,save_gates=true \
      "${extra[@]}" --json "$OUT/glue_big_$heads.json" > "$OUT/glue_big_$heads.log" 2>&1
    echo "big $heads: rc=$?"; sed -n '/^kernel /,$p' "$OUT/glue_big_$heads.log" | head -n 20
  done
fi
