#!/usr/bin/env bash
# Inference benchmark of the xLSTM-7B architecture on one GPU (xlstm-jax bench-generate): random
# bfloat16 weights of the 7b preset, prefill throughput at 2048..32768 prompt tokens (65,536 tokens per
# measurement), time to first token at 128 / 2048 / 16384 tokens, decode tokens/s at B = 1, 8, 64 over
# 256 tokens (both parameter layouts), peak memory, each beside its floor from the copy bandwidth and
# matmul rate measured in the same run. Prints a short table last; JSON in $OUT/bench_generate.json
# (rewritten after every figure, so a run stopped by the time limit keeps what it measured).
# Run from the repository root (on the GPU machine through the device tool):
#     OUT=$OUT bash scripts/gpu_infer.sh
# Environment (defaults in brackets):
#   PARTS     comma-separated parts: prefill, ttft, decode                          [prefill,ttft,decode]
#   LAYOUTS   parameter layouts timed for decoding: unrolled, scan                  [scan,unrolled]
#   REPS      timed repetitions per figure (median)                                 [3]
#   LIMIT     seconds before the benchmark is stopped (the table of what it measured
#             is printed anyway)                                                    [540]
#   EXTRA     further bench-generate options, e.g. "--chunk-size 64"                []
# On a machine without a GPU it runs a tiny configuration instead (a smoke test, seconds).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_infer}; mkdir -p "$OUT"
PARTS=${PARTS:-prefill,ttft,decode}; LAYOUTS=${LAYOUTS:-scan,unrolled}; REPS=${REPS:-3}; LIMIT=${LIMIT:-540}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python}
JSON="$OUT/bench_generate.json"
rm -f "$JSON"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  SIZE_ARGS=()
else
  echo "no NVIDIA GPU: a tiny CPU configuration (smoke test only; the figures mean nothing)" | tee "$OUT/env.txt"
  SIZE_ARGS=(--preset tiny --dtype float32 --prefill-lengths 32,64 --tokens-per-measurement 128
             --ttft-lengths 16,32 --decode-batches 1,2 --decode-tokens 8 --block-size 4 --copy-mib 8 --matmul-n 128)
fi
$PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" | tee -a "$OUT/env.txt"

start=$(date +%s)
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=20 "$LIMIT" $PY -m xlstm_jax bench-generate --parts "$PARTS" \
  --decode-layouts "$LAYOUTS" --reps "$REPS" --json "$JSON" "${SIZE_ARGS[@]}" $EXTRA 2>&1 | tee "$OUT/bench_generate.log"
rc=${PIPESTATUS[0]}
echo "# bench-generate exit status $rc after $(( $(date +%s) - start )) s (124: stopped at LIMIT=$LIMIT s)"
if [ -f "$JSON" ]; then
  echo "==== xLSTM-7B inference on one GPU (table from $JSON) ===="
  $PY -m xlstm_jax bench-generate --table-from "$JSON"
else
  echo "no figures: the benchmark stopped before its first measurement (see $OUT/bench_generate.log)"
fi
exit "$rc"
