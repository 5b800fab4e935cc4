#!/usr/bin/env bash
# The sixth session's second device call (issue 9, the small row), ~5 minutes on an H200:
#   (tests)   the compiled tests of the new pieces: the tt.scan primitive, gates_impl="kernel"
#             (tests/kernels/test_chunkwise_pallas.py, test_pallas_variants.py: interpret-mode cases
#             compiled here), the recurrent pull-back of m; three processes side by side;
#   (bench)   fw / fwbw, exact, of the small row and of the 8 x 8192 rows with and without
#             gates_impl="kernel" (and states_bf16 at the small row), one process per head preset;
#   (profile) the small row with gates_impl="kernel" (command buffers off).
# Usage (repository root): OUT=$OUT bash scripts/gpu_small.sh; everything in $OUT/small.tgz.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_small}; mkdir -p "$OUT"; W=$(mktemp -d); PY=${PYTHON:-python3}
pack() { (cd "$W" && tar czf "$OUT/small.tgz" .) 2>/dev/null; }
T="-q -p no:xdist -p no:cacheprovider -o addopts= -rA --tb=short"
timeout -k 10 200 $PY -m pytest $T tests/kernels/test_triton_scan.py tests/kernels/test_chunkwise_pallas.py \
  -k "scan or in_kernel" > "$W/tests_0.log" 2>&1 &
timeout -k 10 200 $PY -m pytest $T tests/kernels/test_pallas_variants.py -k "kernel or pullback" > "$W/tests_1.log" 2>&1 &
timeout -k 10 200 $PY -m pytest $T tests/kernels/test_chunkwise_pallas.py -k "test_compiled_against" > "$W/tests_2.log" 2>&1 &
wait; pack
B="$PY -m xlstm_jax bench --no-ceilings --reps 20 --warmup 3 --grad-mode exact --modes fw fwbw"
SP="chunkwise_pallas:recompute_states_in_bw=False"
timeout -k 10 120 $B --heads small --shapes 16,2048 --kernels chunkwise_auto "$SP,gates_impl=kernel" \
  "$SP,gates_impl=kernel,states_bf16=True" "$SP,states_bf16=True" --json "$W/bench_small.json" > "$W/bench_small.log" 2>&1
pack
MS="chunkwise_mosaic:recompute_states_in_bw=False,states_bf16=True"
timeout -k 10 150 $B --heads standard --shapes 8,8192 --kernels chunkwise_auto \
  "$MS,bw_kernels=mosaic,pipeline_slots=1,gates_impl=kernel" --json "$W/bench_std.json" > "$W/bench_std.log" 2>&1
pack
timeout -k 10 150 $B --heads 7b --shapes 8,8192 --kernels chunkwise_auto \
  "$MS,bw_kernels=mosaic_split,pipeline_slots=2,gates_impl=kernel" --json "$W/bench_7b.json" > "$W/bench_7b.log" 2>&1
pack
XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout -k 10 90 $B --heads small --shapes 16,2048 --reps 10 \
  --kernels "$SP,gates_impl=kernel" --profile "$W/prof" > "$W/prof_small.log" 2>&1
pack
{
  for f in "$W"/tests_*.log; do echo "$(basename "$f"): $(tail -n 1 "$f")"; grep -E "^(FAILED|ERROR)" "$f" | head -n 8; done
  for f in "$W"/bench_*.log; do grep -E "^chunkwise" "$f" | grep -E " fw | fwbw " | sed "s/  */ /g" | cut -c1-200; done
  sed -n '/^profile /,/more kernels/p' "$W/prof_small.log" | cut -c1-140 | head -n 34
} > "$OUT/summary.txt" 2>&1
pack; cat "$OUT/summary.txt"
