#!/usr/bin/env bash
# Training throughput on one GPU: `xlstm-jax bench-train` for the 350m preset (B16 S2048) and the 1.3b
# preset (B8 S2048), each with the old settings (remat full, separate projections, weights cast at
# every use) and the new ones (NEW below), each configuration in its own process with a timeout; a
# profile of the new settings per preset (time per op family); the per-step losses of the first
# LOSS_STEPS steps of the two 350m runs (same seed, same batches) compared; then, while time is left,
# one 350m run per single option. Prints the profile tables and a table of all runs last; JSON and
# logs go to $OUT (or /tmp/xlstm_train_bench).
# Run from the repository root (on the GPU machine through the device tool):
#     bash scripts/gpu_train.sh
# Environment (defaults in brackets):
#   NEW         the new options                     [--fused-projections --remat dots --cast-params]
#   LOSS_STEPS  steps of the loss-curve comparison (0: none; 200 add ~70 s to each 350m run)   [200]
#   BUDGET      seconds for the whole script; runs are cut to what is left, runs that would get
#               under 45 s are skipped (the single-option runs last)                          [540]
# Expected wall time: ~7 minutes (~4.5 with LOSS_STEPS=0), inside the device tool's 10-minute limit.
#   BACKEND     mLSTM backend (auto: triton_kernels on a GPU)                                 [auto]
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_train_bench}; mkdir -p "$OUT"
NEW=${NEW:---fused-projections --remat dots --cast-params}
LOSS_STEPS=${LOSS_STEPS:-200}; BUDGET=${BUDGET:-540}; BACKEND=${BACKEND:-auto}
PY=${PYTHON:-python}
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/env.txt"

# run NAME LIMIT_S ARGS...: one bench-train process, cut to the time left in BUDGET
run() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 15))
  if [ "$left" -lt 45 ]; then echo "[$name] skipped: ${left}s left of the budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout -k 5 "$limit" $PY -m xlstm_jax bench-train --backend "$BACKEND" "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - t0))s (limit ${limit}s): $(tail -1 "$OUT/$name.log")"
  [ $rc -ne 0 ] && tail -5 "$OUT/$name.log"
}

S350="--preset 350m --batch-size 16 --seq-len 2048 --steps 10 --warmup 2"
S13="--preset 1.3b --batch-size 8 --seq-len 2048 --steps 6 --warmup 2"
run 350m_old 200 $S350 --remat full --loss-steps "$LOSS_STEPS" --measure-peak
run 350m_new 200 $S350 $NEW --loss-steps "$LOSS_STEPS" --profile "$OUT/profile_350m"
run 1.3b_old 150 $S13 --remat full
run 1.3b_new 150 $S13 $NEW --profile "$OUT/profile_1.3b"
# single options at 350m (short runs), while time is left
A350="--preset 350m --batch-size 16 --seq-len 2048 --steps 6 --warmup 2"
run 350m_fused 70 $A350 --remat full --fused-projections
run 350m_dots 70 $A350 --remat dots
run 350m_cast 70 $A350 --remat full --cast-params
run 350m_noremat 70 $A350 --remat none

$PY - "$OUT" <<'EOF'
import json, os, sys
from xlstm_jax.tools.bench_train import format_result
from xlstm_jax.tools.trace_summary import format_table
out = sys.argv[1]
names = ["350m_old", "350m_new", "1.3b_old", "1.3b_new", "350m_fused", "350m_dots", "350m_cast", "350m_noremat"]
res = {}
for n in names:
    p = os.path.join(out, n + ".json")
    if os.path.exists(p):
        res[n] = json.load(open(p))
for n in ("350m_new", "1.3b_new"):
    if n in res and res[n].get("profile"):
        print(f"\n---- profile {n} ({res[n]['options']}) ----")
        print(format_table(res[n]["profile"]))
old, new = res.get("350m_old", {}).get("losses"), res.get("350m_new", {}).get("losses")
if old and new and len(old) == len(new):
    diffs = [abs(a - b) for a, b in zip(old, new)]
    tail = lambda xs: sum(xs[-20:]) / len(xs[-20:])
    print(f"\nloss curve, {len(old)} steps, old vs new options: max |diff| {max(diffs):.4f} (at step {diffs.index(max(diffs)) + 1}), "
          f"mean of the last 20: old {tail(old):.4f} new {tail(new):.4f}; step 1: {old[0]:.4f} vs {new[0]:.4f}")
m = res.get("350m_old", {}).get("measured_matmul_tflops")
if m:
    print(f"measured bf16 matmul rate: {m:.0f} TFLOP/s (MFU below uses the spec peak {res['350m_old']['peak_tflops']})")
print("\n---- bench-train (median step after warm-up; MFU of the spec peak) ----")
header = None
for n, r in res.items():
    h, row = format_result(r).split("\n")
    if header is None:
        print(h); header = h
    print(row)
json.dump(res, open(os.path.join(out, "gpu_train_summary.json"), "w"), indent=1)
EOF
