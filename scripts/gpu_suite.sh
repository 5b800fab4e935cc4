#!/usr/bin/env bash
# The project's one GPU script: runs on the GPU machine (device tool) from the repository root; the
# package is used from the working tree (PYTHONPATH, `python3 -m xlstm_jax`), nothing is installed.
# Each section runs in its own processes under a time limit and adds one line to the summary printed
# last; full logs and JSON go to $OUT (or /tmp/xlstm_out).
#   SECTIONS    space-separated subset of (default: env tests check bench):
#     env       GPU, driver, versions
#     tests     compiled GPU tests: TESTS (default: the kernel tests; pytest without the default
#               addopts, as the GPU machine has no pytest-xdist), split by file over TEST_JOBS
#               parallel pytest processes (Triton compiles are CPU-bound; the GPU is shared), each
#               under TEST_LIMIT seconds
#     check     `xlstm-jax check` (every sequence and step kernel vs float64), CHECK_ARGS
#     bench     `xlstm-jax bench`, BENCH_ARGS (default: the three head presets)
#     packed    issue 11 figures: standard workload B8 S8192 bf16, chunkwise_pallas, exact and tfla,
#               exp and sigmoid input gates, unpacked and packed documents of 100-4000 tokens
#     baseline  same-run comparison with the package of another commit (BASELINE_DIR, default
#               .baseline, carried): chunkwise_pallas at the standard workload B8 S8192 through the
#               peers' timer (.peers/peer_shapes.py ours_exact), old then new
#     speed     scripts/gpu_speed.sh (tune + seven-row table against the peer); these four write
#               into $OUT/<section>/
#     train     scripts/gpu_train.sh (bench-train: MFU, profiles, old vs new settings)
#     generate  scripts/gpu_infer.sh (bench-generate: prefill, time to first token, decode)
#     decode    `xlstm-jax bench-decode`, DECODE_ARGS
#     mosaic    scripts/gpu_mosaic.sh (the Mosaic GPU family: tests, forward timings)
#     kprofile  per-kernel time breakdown (`xlstm-jax bench --profile`) of chunkwise_pallas, fw and
#               fwbw, at KPROFILE_ROWS (default: the small, standard and 7B heads at one shape each;
#               KPROFILE_KERNELS, default chunkwise_pallas); XLA command buffers off, so that every
#               XLA op is its own named event; traces and HLO text in $OUT/kprofile/
#     peers     the peers of docs/benchmarks.md (carry .whl and .peers)
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/xlstm_out}; mkdir -p "$OUT"; export OUT
SECTIONS=${SECTIONS:-env tests check bench}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
summary=()
t_all=$(date +%s)
since() { echo "$(( $(date +%s) - $1 )) s"; }

if has env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.txt"
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
fi

# run_sub NAME: the sub-script of a section, into $OUT/NAME, its last lines shown
run_sub() {
  local name=$1 script=scripts/gpu_$1.sh t0=$(date +%s) rc
  [ "$name" = generate ] && script=scripts/gpu_infer.sh
  mkdir -p "$OUT/$name"
  OUT="$OUT/$name" bash "$script" > "$OUT/section_$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-40}" "$OUT/section_$name.log"
  summary+=("$name: rc=$rc ($(since $t0); log section_$name.log)")
}

# speed first: the sections after it use its tuned table
if has speed; then
  run_sub speed
  if [ -f "$OUT/speed/tuning_cache.json" ]; then
    export XLSTM_JAX_TUNING_CACHE=$OUT/speed/tuning_cache.json
  fi
fi

if has tests; then
  t0=$(date +%s)
  files=(${TESTS:-tests/kernels/test_chunkwise_pallas.py tests/kernels/test_extreme_gates.py tests/kernels/test_segments_sigmoid.py tests/kernels/test_pallas_variants.py tests/kernels/test_recurrent_step_pallas.py tests/kernels/test_tuning.py})
  jobs_n=${TEST_JOBS:-4}
  for ((j = 0; j < jobs_n; j++)); do
    shard=()
    for ((x = j; x < ${#files[@]}; x += jobs_n)); do shard+=("${files[$x]}"); done
    [ ${#shard[@]} -eq 0 ] && continue
    timeout -k 10 "${TEST_LIMIT:-240}" python3 -m pytest -q -o addopts= ${TEST_SELECT:-} "${shard[@]}" -p no:cacheprovider \
      > "$OUT/tests_$j.log" 2>&1 &
  done
  wait
  for f in "$OUT"/tests_*.log; do
    echo "--- $f: $(grep -E '[0-9]+ (passed|failed|error)' "$f" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$f" | head -n 20
  done
  summary+=("tests: $(cat "$OUT"/tests_*.log | grep -E '[0-9]+ (passed|failed|error)' | tr '\n' ';') ($(since $t0))")
fi

if has check; then
  timeout -k 10 "${CHECK_LIMIT:-300}" python3 -m xlstm_jax check ${CHECK_ARGS:-} --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log" | tail -n 20
  summary+=("check: rc=${PIPESTATUS[0]} ($(grep -E 'all within|FAILED' "$OUT/check.log" | tail -n 1 | sed -E 's/.*\((all within|FAILED)\).*/\1/'))")
fi

if has bench; then
  timeout -k 10 "${BENCH_LIMIT:-400}" python3 -m xlstm_jax bench ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -n 60
  summary+=("bench: rc=${PIPESTATUS[0]} (table above, JSON in bench.json)")
fi

if has packed; then
  t0=$(date +%s)
  timeout -k 10 "${PACKED_LIMIT:-150}" python3 -m xlstm_jax bench --heads standard --shapes 8,8192 \
    --kernels chunkwise_pallas --grad-mode exact tfla --input-gate exp sigmoid --packed off 100,4000 \
    --reps "${PACKED_REPS:-10}" --no-ceilings --json "$OUT/bench_packed.json" > "$OUT/bench_packed.log" 2>&1
  rc=$?
  sed -n '/^kernel /,$p' "$OUT/bench_packed.log" | head -n 30
  summary+=("packed: rc=$rc ($(since $t0); table above, JSON in bench_packed.json)")
fi

if has baseline; then
  t0=$(date +%s)
  BASE=${BASELINE_DIR:-.baseline}
  if [ -f .peers/peer_shapes.py ] && [ -d "$BASE/xlstm_jax" ]; then
    for side in old new; do
      path=$PWD; [ $side = old ] && path=$PWD/$BASE
      PYTHONPATH=$path timeout -k 10 120 python3 .peers/peer_shapes.py ours_exact std "8,8192" \
        > "$OUT/baseline_$side.log" 2>&1
      echo "$side: $(grep '^RESULT' "$OUT/baseline_$side.log")"
    done
    summary+=("baseline: $(grep -h '^RESULT' "$OUT"/baseline_old.log "$OUT"/baseline_new.log | sed -E 's/.*"fw_ms": ([0-9.]+), "fwbw_ms": ([0-9.]+).*/\1\/\2 ms/' | tr '\n' ' ')(old, new; $(since $t0))")
  else
    summary+=("baseline: skipped (carry .peers and $BASE)")
  fi
fi

if has kprofile; then
  t0=$(date +%s)
  mkdir -p "$OUT/kprofile"
  rows=${KPROFILE_ROWS:-"small:16,2048 standard:8,8192 7b:8,8192"}
  for r in $rows; do
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout -k 10 "${KPROFILE_LIMIT:-200}" \
      python3 -m xlstm_jax bench --heads "${r%%:*}" --shapes "${r#*:}" --kernels ${KPROFILE_KERNELS:-chunkwise_pallas} \
      --reps 10 --no-ceilings --profile "$OUT/kprofile" --json "$OUT/kprofile/bench_${r%%:*}.json" \
      > "$OUT/kprofile/${r%%:*}.log" 2>&1
    echo "kprofile ${r}: rc=$?"
    sed -n '/^profile /,/more kernels/p' "$OUT/kprofile/${r%%:*}.log" | grep -E "^profile|^ " | head -n 40
  done
  summary+=("kprofile: $(ls "$OUT"/kprofile/*.log | wc -l) rows ($(since $t0); logs kprofile/*.log)")
fi

for name in train generate mosaic; do
  has $name && run_sub $name
done

if has decode || has infer; then  # "infer": its older name
  timeout -k 10 "${DECODE_LIMIT:-200}" python3 -m xlstm_jax bench-decode ${DECODE_ARGS:-} --json "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench_decode.log" | tail -n 30
  summary+=("decode: rc=${PIPESTATUS[0]} (bench-decode table above, JSON in bench_decode.json)")
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

echo "==================== summary ($(since $t_all)) ===================="
for line in "${summary[@]}"; do echo "$line"; done
