#!/usr/bin/env bash
# The sixth session's closing device call (issue 9), ~9 minutes on an H200:
#   (tests)   side by side: the compiled tests of the new pieces (the tt.scan primitive, gates_impl=
#             "kernel", gate_grads_impl="kernel", the recurrent m pull-back) and gpu_final.sh's
#             Mosaic tests (which run the new pull-back in the Mosaic family's backward);
#   (choose)  the small row's candidates timed in one process (fw / fwbw, exact): the shipped entry
#             (chunkwise_auto) and the new gate paths; scripts/choose_small.py writes the fastest by
#             fwbw (new options only if their tests passed) into a tuning table, $XLSTM_JAX_TUNING_CACHE
#             for the rest of the call;
#   (final)   scripts/gpu_final.sh without its tests and variants: the peer, the seven rows of
#             chunkwise_auto (the small row with the chosen entry), the error check, the small profile;
#   (timers)  scripts/small_timers.py for ours (the chosen entry) and the peer.
# Usage (repository root): OUT=$OUT bash scripts/gpu_choose.sh; carry .whl and .peers. Everything in
# $OUT/choose.tgz and $OUT/final.tgz; $OUT/summary.txt.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_choose}; mkdir -p "$OUT"; W=$(mktemp -d); PY=${PYTHON:-python3}; T0=$(date +%s)
pack() { (cd "$W" && tar czf "$OUT/choose.tgz" .) 2>/dev/null; }
T="-q -p no:xdist -p no:cacheprovider -o addopts= -rA --tb=short"
timeout -k 10 170 $PY -m pytest $T tests/kernels/test_triton_scan.py tests/kernels/test_chunkwise_pallas.py \
  -k "scan or in_kernel" > "$W/new_tests_0.log" 2>&1 &
timeout -k 10 170 $PY -m pytest $T tests/kernels/test_pallas_variants.py \
  -k "gates-kernel or gate_grads-kernel or without_initial" > "$W/new_tests_1.log" 2>&1 &
timeout -k 10 170 $PY -m pytest $T tests/kernels/test_pallas_variants.py \
  -k "pullback or scanned or sequential" > "$W/new_tests_2.log" 2>&1 &
n=0
for sel in "test_gpu_against and 64-128-bfloat16" "test_gpu_gradients_against and pipeline_slots" \
    "test_gpu_gradients_match or test_gpu_matches" "test_gpu_gradients_against and mosaic_split and 256-512"; do
  timeout -k 10 170 $PY -m pytest $T -m "not slow" -k "$sel" tests/kernels/test_chunkwise_mosaic.py \
    > "$W/mosaic_tests_$n.log" 2>&1 &
  n=$((n + 1))
done
wait; pack
SP="chunkwise_pallas:recompute_states_in_bw=False"
timeout -k 10 110 $PY -m xlstm_jax bench --no-ceilings --reps 20 --warmup 3 --grad-mode exact --modes fw fwbw \
  --heads small --shapes 16,2048 --kernels chunkwise_auto "$SP,gates_impl=kernel" \
  "$SP,gates_impl=kernel,gate_grads_impl=kernel" "$SP,gates_impl=kernel,gate_grads_impl=kernel,states_bf16=True" \
  --json "$W/bench_candidates.json" > "$W/bench_candidates.log" 2>&1
$PY scripts/choose_small.py "$W/bench_candidates.json" "$W/tuning.json" "$W"/new_tests_*.log > "$W/choice.txt" 2>&1
pack
if [ -s "$W/tuning.json" ]; then export XLSTM_JAX_TUNING_CACHE="$W/tuning.json"; fi
left=$(( 575 - ($(date +%s) - T0) ))
OUT="$OUT" LIMIT=$(( left - 50 )) SKIP_TESTS=1 SKIP_VARIANTS=1 PROFILE_ROWS="small:16,2048" \
  bash scripts/gpu_final.sh > "$W/final_stdout.txt" 2>&1
for impl in ours peer; do
  [ $(( 590 - ($(date +%s) - T0) )) -gt 25 ] || break
  PYTHONPATH=/tmp/peers:$PYTHONPATH timeout 22 $PY scripts/small_timers.py $impl small 16,2048 2>&1 | grep RESULT
done > "$W/timers.txt"
{
  for f in "$W"/new_tests_*.log "$W"/mosaic_tests_*.log; do
    echo "$(basename "$f"): $(grep -v '^\s*$' "$f" | tail -n 1)"; grep -E "^(FAILED|ERROR)" "$f" | head -n 8
  done
  cat "$W/choice.txt"
  cat "$OUT/summary.txt" 2>/dev/null | grep -v "^tests "
  cat "$W/timers.txt"
  echo "choose total $(( $(date +%s) - T0 )) s"
} > "$W/summary_all.txt"
pack; cp "$W/summary_all.txt" "$OUT/summary.txt"; cat "$OUT/summary.txt"
