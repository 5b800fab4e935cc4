#!/usr/bin/env bash
# The GPU check of the Mosaic backward kernels as the default (chunkwise_mosaic bw_kernels="mosaic";
# issue 14, docs/benchmarks.md "Mosaic GPU backward kernels"), one device call of ~8 minutes on an H200:
#   (tests)    tests/kernels/test_chunkwise_mosaic.py compiled (not slow, not interpret) in three
#              pytest processes side by side, and tests/models/test_backend_registry.py, each under
#              TEST_LIMIT seconds, none preallocating the GPU's memory;
#   (kprofile) per-kernel profiles of chunkwise_mosaic (its defaults: each Mosaic kernel under its
#              own name) at 8 x 8192 (standard, 7B heads) and the small row, command buffers off;
#   (train)    `xlstm-jax bench-train` at the 1.3b preset (B8 S2048, xLSTM-7B's head dims, NH 4)
#              with the triton_kernels backend's kernel_family auto (the tuned table's family: Mosaic
#              here) and triton, the same seed and data: losses, step and compile times side by side,
#              for TRAIN_CASES (blocks scanned or unrolled: the compile time per kernel instance).
# Usage (repository root): OUT=$OUT bash scripts/gpu_mosaic_default.sh [PART ...], PART in tests
# kprofile train (default: all three). Logs and JSON also go to $OUT/mosaic_default.tgz; the
# summary is printed last.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_mosaic_default}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=${*:-tests kprofile train}
TRAIN=${TRAIN:---preset 1.3b --batch-size 8 --seq-len 2048 --steps 6 --warmup 2 --loss-steps 12 --remat dots}
# family,blocks,layout (scan: the blocks in one lax.scan; unroll: --unroll-blocks, one kernel instance per block)
TRAIN_CASES=${TRAIN_CASES:-auto,12,scan triton,12,scan auto,4,unroll triton,4,unroll}
want() { [[ " $PARTS " == *" $1 "* ]]; }
W=$(mktemp -d)
t_all=$(date +%s)

if want tests; then  # the Mosaic test file in gpu_mosaic.sh's three processes (logs mosaic_tests_*.log)
  OUT="$W" PYTHON=$PY TEST_LIMIT="${TEST_LIMIT:-300}" bash scripts/gpu_mosaic.sh tests > "$W/tests_mosaic.log" 2>&1 &
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${TEST_LIMIT:-300}" $PY -m pytest -q -p no:cacheprovider \
    -o addopts= -m "not slow" tests/models/test_backend_registry.py > "$W/tests_backend.log" 2>&1 &
  wait
fi

if want kprofile; then
  OUT="$W/kp" SECTIONS=kprofile KPROFILE_ROWS="standard:8,8192 7b:8,8192 small:16,2048" KPROFILE_LIMIT=120 \
    KPROFILE_KERNELS="chunkwise_mosaic" bash scripts/gpu_suite.sh > "$W/kprofile.log" 2>&1
fi

if want train; then
  for case in $TRAIN_CASES; do
    IFS=, read -r fam blocks layout <<< "$case"
    unroll=--no-unroll-blocks; [ "$layout" = unroll ] && unroll=--unroll-blocks
    name="${fam}_${blocks}_${layout}"
    timeout -k 10 "${TRAIN_LIMIT:-170}" $PY -m xlstm_jax bench-train $TRAIN --num-blocks "$blocks" $unroll \
      --backend-option kernel_family="$fam" --json "$W/train_$name.json" > "$W/train_$name.log" 2>&1
    echo "train $name: rc=$?" >> "$W/train_$name.log"
  done
fi

(cd "$W" && find . \( -name "*.log" -o -name "*.json" -o -name "*.jsonl" \) -print0 | tar czf "$OUT/mosaic_default.tgz" --null -T -)
for f in "$W"/mosaic_tests_*.log "$W"/tests_backend.log; do
  [ -f "$f" ] && echo "tests $(basename "$f"): $(grep -E '[0-9]+ (passed|failed|error)' "$f" | tail -n 1)" \
    && grep -E "^(FAILED|ERROR)" "$f" | head -n 10
done
[ -f "$W/kprofile.log" ] && for f in "$W"/kp/kprofile/*.log; do
  sed -n '/^profile /,/more kernels/p' "$f" | grep -E "^profile|^ " | cut -c1-150 | head -n 40
done
for case in $TRAIN_CASES; do
  IFS=, read -r fam blocks layout <<< "$case"
  name="${fam}_${blocks}_${layout}"
  [ -f "$W/train_$name.json" ] && $PY - "$W/train_$name.json" "$name" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
loss = r.get("losses") or []
mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.3f}"
print(f"train {sys.argv[2]}: step {r['step_ms_median']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, MFU {mfu}, "
      f"compile {r['compile_s']:.0f} s, losses {[round(float(x), 4) for x in loss]}")
EOF
  [ -f "$W/train_$name.log" ] && tail -n 2 "$W/train_$name.log" | cut -c1-200
done
echo "total $(( $(date +%s) - t_all )) s; files: $OUT/mosaic_default.tgz"
