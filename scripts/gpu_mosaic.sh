#!/usr/bin/env bash
# Mosaic GPU family (issue 14) on one H200: the compiled tests, then fw and fwbw timings of
# chunkwise_mosaic vs chunkwise_pallas at the seven benchmark rows (xlstm-jax bench), then a table.
#
# Usage: OUT=$OUT bash scripts/gpu_mosaic.sh [PART ...]
#   PART: tests | bench-small | bench-standard | bench-7b | table | tune | all (default: all but
#   tune). Timeouts: tests 300 s (three processes; TEST_LIMIT; gpu_mosaic_bw.sh and
#   gpu_mosaic_default.sh run this part too), bench-small 300 s, bench-standard and bench-7b 480 s each, tune
#   420 s; for 10-minute commands run "tests bench-small", then "bench-standard", then "bench-7b"
#   (each bench part prints the table of every JSON under $OUT so far; `table` only prints it).
#   tune: xlstm-jax tune --families triton mosaic at the standard heads, 8x8192 (the family
#   choice; writes $OUT/mosaic_tune.json, not the user cache).
# Writes $OUT/mosaic_tests.log, $OUT/mosaic_bench_small.json (small 8,64,128 at 16x2048),
# $OUT/mosaic_bench_standard.json (standard 16,128,256 at 32x2048, 8x8192, 2x32768),
# $OUT/mosaic_bench_7b.json (7b 8,256,512 at the same three), $OUT/mosaic_table.md. Every failure
# prints its full error (the log is what the next session debugs from).
# MOSAIC_BENCH_TINY=1 replaces the timed rows by one tiny row with interpret=True (a dry run of
# the script on CPU).
set -u
OUT=${OUT:-/tmp/mosaic_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAX_TRACEBACK_FILTERING=off  # full tracebacks: compile errors are debugged from this log
PARTS=${*:-all}
want() { [[ ( " $PARTS " == *" all "* && $1 != tune ) || " $PARTS " == *" $1 "* ]]; }

echo "== versions"; $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

if want tests; then
  # the compiled tests (gpu mark) and the fast CPU-side checks; the interpret-mode tests are CPU
  # tests of CI and are left out here
  # three processes side by side (the compiles are CPU-bound; one process needs > 330 s), each
  # without preallocating the GPU's memory (else the later ones find no device)
  echo "== (a) tests/kernels/test_chunkwise_mosaic.py (compiled; not slow, not interpret; 3 processes)"
  n=0
  for sel in "test_gpu_against" "test_gpu_gradients_against" \
      "not test_gpu_against and not test_gpu_gradients_against and not test_interpret"; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_LIMIT:-300}" $PY -m pytest -v -p no:xdist -o addopts= -rA --tb=long \
      -m "not slow" -k "$sel" tests/kernels/test_chunkwise_mosaic.py > "$OUT/mosaic_tests_$n.log" 2>&1 &
    n=$((n + 1))
  done
  wait
  cat "$OUT"/mosaic_tests_*.log > "$OUT/mosaic_tests.log"
  grep -hE "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT"/mosaic_tests_*.log
fi

KERNELS=(chunkwise_mosaic chunkwise_mosaic:bw_kernels=mosaic chunkwise_pallas)
BENCH=(--modes fw fwbw --reps 10 --warmup 2 --no-ceilings)
if [[ -n "${MOSAIC_BENCH_TINY:-}" ]]; then
  KERNELS=(chunkwise_mosaic:interpret=true chunkwise_mosaic:interpret=true,bw_kernels=mosaic chunkwise_pallas)
  BENCH=(--modes fw fwbw --reps 2 --warmup 0 --no-ceilings --shapes 1,64)
fi
bench() {  # $1: name of the JSON, $2: timeout (s), the rest: --heads ...
  local name=$1 limit=$2; shift 2
  echo "== (b) bench $name: ${KERNELS[*]} $* (fw, fwbw; median of 10 calls)"
  local heads=("$@")
  if [[ -n "${MOSAIC_BENCH_TINY:-}" ]]; then heads=(--heads 1,64,64); fi
  timeout "$limit" $PY -m xlstm_jax bench --kernels "${KERNELS[@]}" "${heads[@]}" "${BENCH[@]}" \
    --label "gpu_mosaic $name" --json "$OUT/mosaic_bench_$name.json" 2>&1
  echo "bench $name exit status: $? (124: the $limit s timeout, no JSON; 1: a case failed, see ERROR rows)"
}
want bench-small && bench small 300 --heads small
want bench-standard && bench standard 480 --heads standard
want bench-7b && bench 7b 480 --heads 7b

if want tune; then
  echo "== (d) xlstm-jax tune --families triton mosaic (standard heads, 8x8192, exact, fwbw, 60 s budget)"
  timeout 420 $PY -m xlstm_jax tune --families triton mosaic --heads standard --shapes 8,8192 \
    --budget-s 60 --no-cache --json "$OUT/mosaic_tune.json" 2>&1
  echo "tune exit status: $? (124: the 420 s timeout)"
fi

if want table || want bench-small || want bench-standard || want bench-7b; then
  echo "== (c) chunkwise_mosaic vs chunkwise_pallas (ms, median)"
  $PY - "$OUT" <<'PYEOF' 2>&1 | tee "$OUT/mosaic_table.md"
import glob, json, os, sys
rows, meta = {}, set()
for path in sorted(glob.glob(os.path.join(sys.argv[1], "mosaic_bench_*.json"))):
    with open(path) as fh:
        data = json.load(fh)
    meta.add(f"{data['device']}, jax {data['jax']}, {data['dtype']}, {data['date']}")
    for r in data["results"]:
        key = (r["heads"], r["NH"], r["DHQK"], r["DHV"], r["B"], r["S"], r["grad_mode"], r["mode"])
        opts = {k: v for k, v in (r.get("options") or {}).items() if k != "interpret"}
        label = "mosaic_bw" if r["kernel"] == "chunkwise_mosaic" and opts.get("bw_kernels") == "mosaic" else r["kernel"]
        rows.setdefault(key, {})[label] = r
if not rows:
    sys.exit("no mosaic_bench_*.json under " + sys.argv[1])
print("device:", "; ".join(sorted(meta)))
print("\n| heads (NH,DHQK,DHV) | BxS | grad | mode | chunkwise_mosaic ms | mosaic, bw_kernels=mosaic ms "
      "| chunkwise_pallas ms | mosaic/pallas | mosaic bw/pallas |")
print("|---|---|---|---|---|---|---|---|---|")
for key in sorted(rows, key=lambda k: (k[0], k[4] * k[5], k[5], k[6], k[7])):
    heads, NH, DQ, DV, B, S, gm, mode = key
    cell = {}
    for kern in ("chunkwise_mosaic", "mosaic_bw", "chunkwise_pallas"):
        r = rows[key].get(kern)
        if r is None:
            cell[kern] = None
        elif "error" in r:
            cell[kern] = "ERROR " + r["error"].splitlines()[0][:60]
        else:
            cell[kern] = r["ms"]
    fmt = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.3f}")  # noqa: E731
    a, c, b = cell["chunkwise_mosaic"], cell["mosaic_bw"], cell["chunkwise_pallas"]
    ratio = lambda x: f"{x / b:.2f}" if isinstance(x, float) and isinstance(b, float) else "-"  # noqa: E731
    print(f"| {heads} ({NH},{DQ},{DV}) | {B}x{S} | {gm} | {mode} | {fmt(a)} | {fmt(c)} | {fmt(b)} | {ratio(a)} | {ratio(c)} |")
PYEOF
fi
