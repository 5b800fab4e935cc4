#!/usr/bin/env bash
# The closing device call of a session (issue 9), ~9 minutes on an H200, in priority order, each step
# under its own timeout and all of them under LIMIT seconds:
#   (tests)    (unless SKIP_TESTS=1) the compiled tests of what changed: tests/kernels/test_chunkwise_mosaic.py's forward
#              cases against float64 (two processes) and its gradient cases of the single-buffered
#              kernels (pipeline_slots) and the split dQ / dK kernels (one process each), side by side,
#              none preallocating the GPU's memory;
#   (peer)     mlstm_kernels' triton_limit_chunk (chunk 64) at the seven rows (.peers/peer_shapes.py,
#              wheels from .whl: carry .whl and .peers), each head preset in its own process;
#   (ours)     `xlstm-jax bench --kernels chunkwise_auto` (the tuned table's family and options: what
#              the model runs) at the seven rows, exact gradients fw and fwbw, then tfla fwbw at
#              8 x 8192 (standard, 7B heads) and the small row;
#   (table)    the seven-row table with the ratios and the goal (scripts/gpu_speed.sh ONLY_TABLE=1);
#   (check)    (unless SKIP_CHECK=1) the errors of chunkwise_auto at the standard row 8 x 8192 against chunkwise_native in
#              float32 at highest matmul precision (`bench --check`): h (fw) and the gradients (fwbw);
#   (profile)  per-kernel profiles (command buffers off) of the rows in PROFILE_ROWS while time is left,
#              after the first of them the forward of the two long-sequence rows with smaller
#              recurrent tiles and with chunk 256 (variants, for the next tuning; SKIP_VARIANTS=1: not).
# Usage (repository root): OUT=$OUT bash scripts/gpu_final.sh. Everything lands in $OUT/final.tgz
# (rewritten after each step, so a cut call keeps what it finished) and $OUT/summary.txt.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_final}; mkdir -p "$OUT"
W=$(mktemp -d); PY=${PYTHON:-python3}
LIMIT=${LIMIT:-570}; T0=$(date +%s)
REPS=${REPS:-10}
PROFILE_ROWS=${PROFILE_ROWS-"7b:2,32768 small:16,2048 standard:32,2048 standard:2,32768"}
GROUPS_=("standard std 32,2048;8,8192;2,32768" "7b 7b 32,2048;8,8192;2,32768" "small 350m 16,2048")
steps=()
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
# a step's timeout: its own or what is left, at least 1 s (a timeout of 0 would mean none)
cap() { local l; l=$(left); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
pack() { (cd "$W" && tar czf "$OUT/final.tgz" .) 2>/dev/null; }
step() { steps+=("$1: rc=$2 ($(( $(date +%s) - $3 )) s)"); pack; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$W/env.txt" 2>&1
$PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" >> "$W/env.txt" 2>&1
# the device copy's git metadata can lag behind its (current) working tree: a hint only
git log -1 --format="git HEAD of the device copy (may be stale): %H %s" >> "$W/env.txt" 2>/dev/null

# (tests) -----------------------------------------------------------------------------------------
# SKIP_TESTS=1: the caller ran them (scripts/gpu_choose.sh runs them beside its own)
t0=$(date +%s); TL=$(cap "${TEST_LIMIT:-130}"); n=0
[ "${SKIP_TESTS:-0}" = 1 ] || {
# seven processes of one or two cases each (a case compiles for ~30 s, mostly on the CPU)
for sel in "test_gpu_against and 128-256-bfloat16" "test_gpu_against and 256-512" \
    "test_gpu_against and (64-128-bfloat16 or 128-256-float16)" \
    "test_gpu_gradients_against and pipeline_slots" "test_gpu_gradients_match or test_gpu_matches" \
    "test_gpu_gradients_against and mosaic_split and 256-512" \
    "test_gpu_gradients_against and mosaic_split and not 256-512"; do
  timeout -k 10 "$TL" $PY -m pytest -v -p no:xdist -p no:cacheprovider -o addopts= -rA --tb=long -m "not slow" \
    -k "$sel" tests/kernels/test_chunkwise_mosaic.py > "$W/tests_$n.log" 2>&1 &
  n=$((n + 1))
done
wait
step tests 0 "$t0"
}

# (peer) ------------------------------------------------------------------------------------------
t0=$(date +%s)
rc=0
for g in "${GROUPS_[@]}"; do
  read -r heads peer shapes <<<"$g"
  OUT="$W" PY=$PY bash scripts/peer_rows.sh limit64 "$peer" "$shapes" "$heads" "$(cap 150)" || rc=$?
done
step peer "$rc" "$t0"

# (ours) ------------------------------------------------------------------------------------------
# tfla (fwbw only: the forward is the same) at one row per head preset, after exact at all seven
TFLA_GROUPS=("standard - 8,8192" "7b - 8,8192" "small - 16,2048")
for gm in exact tfla; do
  modes="fw fwbw"; [ "$gm" = tfla ] && modes=fwbw
  if [ "$gm" = tfla ]; then groups=("${TFLA_GROUPS[@]}"); else groups=("${GROUPS_[@]}"); fi
  for g in "${groups[@]}"; do
    read -r heads peer shapes <<<"$g"
    t0=$(date +%s)
    [ "$(left)" -gt 15 ] || { steps+=("ours $gm $heads: skipped (time)"); continue; }
    timeout -k 10 "$(cap 150)" $PY -m xlstm_jax bench --kernels chunkwise_auto --heads "$heads" --shapes "$shapes" \
      --grad-mode "$gm" --modes $modes --no-ceilings --reps "$REPS" --warmup 2 --label final \
      --json "$W/bench_${heads}_$gm.json" > "$W/bench_${heads}_$gm.log" 2>&1
    step "ours $gm $heads" $? "$t0"
  done
done

# (table) -----------------------------------------------------------------------------------------
OUT="$W" ONLY_TABLE=1 PY=$PY bash scripts/gpu_speed.sh > "$W/table.txt" 2>&1
pack

# (check) -----------------------------------------------------------------------------------------
t0=$(date +%s)
[ "${SKIP_CHECK:-0}" != 1 ] && [ "$(left)" -gt 15 ] && timeout -k 10 "$(cap 90)" $PY -m xlstm_jax bench --kernels chunkwise_auto --heads standard --shapes 8,8192 \
  --grad-mode exact --modes fw fwbw --check --check-precision highest --reps 3 --warmup 1 --no-ceilings \
  --json "$W/check.json" > "$W/check.log" 2>&1
step check $? "$t0"

# (profile, variants) -----------------------------------------------------------------------------
mkdir -p "$W/prof"
variants() {  # fw of the long-sequence rows with smaller recurrent tiles (more programs) or chunk 256
  [ "${SKIP_VARIANTS:-0}" = 1 ] && return
  for r in 7b:2,32768 standard:2,32768; do
    [ "$(left)" -gt 30 ] || { steps+=("variants $r: skipped (time)"); continue; }
    t0=$(date +%s)
    timeout -k 5 "$(cap 60)" $PY -m xlstm_jax bench --heads "${r%%:*}" --shapes "${r#*:}" --modes fw --reps 10 \
      --warmup 2 --no-ceilings --kernels chunkwise_auto chunkwise_mosaic:siz_b_DHQK_inter=64,siz_b_DHV_inter=64 \
      chunkwise_mosaic:chunk_size=256 --json "$W/variants_${r%%:*}.json" > "$W/variants_${r%%:*}.log" 2>&1
    step "variants $r" $? "$t0"
  done
}
first=1
for r in $PROFILE_ROWS; do
  [ "$(left)" -gt 40 ] || { steps+=("profile $r: skipped (time)"); continue; }
  t0=$(date +%s); name="${r%%:*}_${r#*:}"; name=${name/,/x}
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout -k 5 "$(cap 60)" \
    $PY -m xlstm_jax bench --heads "${r%%:*}" --shapes "${r#*:}" --kernels chunkwise_auto --modes fw fwbw \
    --reps 10 --no-ceilings --profile "$W/prof/$name" --json "$W/prof/$name.json" > "$W/prof/$name.log" 2>&1
  step "profile $r" $? "$t0"
  [ "$first" = 1 ] && variants; first=0
done

# summary -----------------------------------------------------------------------------------------
{
  cat "$W/env.txt"
  for f in "$W"/tests_*.log; do
    echo "tests $(basename "$f"): $(grep -E '[0-9]+ (passed|failed|error|skipped)' "$f" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$f" | head -n 10
  done
  sed -n '/^ours = /,$p' "$W/table.txt"
  grep -E "max rel|FAIL|NaN|chunkwise_auto +standard|tolerance" "$W/check.log" | cut -c1-220
  for f in "$W"/variants_*.log; do
    [ -f "$f" ] && grep -E "^chunkwise" "$f" | cut -c1-150
  done
  for f in "$W"/prof/*.log; do
    [ -f "$f" ] && sed -n '/^profile /,/more kernels/p' "$f" | grep -E "^profile|^ " | cut -c1-140 | head -n 16
  done
  for line in "${steps[@]}"; do echo "$line"; done
  echo "total $(( $(date +%s) - T0 )) s"
} > "$W/summary.txt" 2>&1
pack
cp "$W/summary.txt" "$OUT/summary.txt"
cat "$OUT/summary.txt"
