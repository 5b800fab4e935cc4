#!/usr/bin/env bash
# The project's one GPU script: runs on the GPU machine (device tool) from the repository root; the
# package is used from the working tree (PYTHONPATH, `python3 -m xlstm_jax`), nothing is installed.
#   SECTIONS    space-separated subset of: env tests check bench infer peers   (default: all)
#   TESTS       pytest selection for the tests section (default: tests/kernels tests/models)
#   CHECK_ARGS  extra arguments of `xlstm-jax check` (every sequence and step kernel vs float64)
#   BENCH_ARGS  extra arguments of `xlstm-jax bench` (default workload: the three head presets;
#               e.g. --heads standard --kernels chunkwise_pallas --grad-mode exact tfla --check)
#   DECODE_ARGS extra arguments of `xlstm-jax bench-decode` (e.g. --sweep, --dump-hlo DIR)
# Full logs and JSON results go to $OUT (or /tmp/xlstm_out); a short table is printed last.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_out}; mkdir -p "$OUT"
SECTIONS=${SECTIONS:-env tests check bench infer peers}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
summary=()

if has env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.txt"
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
fi

if has tests; then
  t0=$(date +%s)
  python3 -m pytest -q -x ${TESTS:-tests/kernels tests/models} -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 30
  rc=${PIPESTATUS[0]}
  summary+=("tests: rc=$rc $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -n 1) ($(( $(date +%s) - t0 )) s)")
fi

if has check; then
  python3 -m xlstm_jax check ${CHECK_ARGS:-} --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log" | tail -n 20
  summary+=("check: rc=${PIPESTATUS[0]} ($(grep -E 'all within|FAILED' "$OUT/check.log" | tail -n 1 | sed -E 's/.*\((all within|FAILED)\).*/\1/'))")
fi

if has bench; then
  python3 -m xlstm_jax bench ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -n 60
  summary+=("bench: rc=${PIPESTATUS[0]} (table above, JSON in bench.json)")
fi

if has infer; then
  python3 -m xlstm_jax bench-decode ${DECODE_ARGS:-} --json "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench_decode.log" | tail -n 30
  summary+=("infer: rc=${PIPESTATUS[0]} (bench-decode table above, JSON in bench_decode.json)")
fi

if has peers; then
  if [ -d .whl ] && [ -f .peers/run_peers.sh ]; then
    T=${PEER_T:-150} JAX_IMPLS=${JAX_IMPLS-jaxtriton_limit_chunk64 attention} TORCH_IMPLS=${TORCH_IMPLS-} \
      bash .peers/run_peers.sh 2>&1 | tee "$OUT/peers.log" | grep -E "RESULT|rc="
    summary+=("peers: $(grep -c '^RESULT' "$OUT/peers.log") results")
  else
    summary+=("peers: skipped (carry .whl and .peers)")
  fi
fi

echo "==================== summary ===================="
for line in "${summary[@]}"; do echo "$line"; done
