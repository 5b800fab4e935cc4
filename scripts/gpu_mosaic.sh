#!/usr/bin/env bash
# Mosaic GPU family (issue 14): tests, then forward timings vs the Triton family, on one H200.
# Usage: OUT=$OUT bash scripts/gpu_mosaic.sh      (writes $OUT/mosaic_tests.log, $OUT/mosaic_bench.json)
# Every failure prints its full error (the log is what the next session debugs from).
# MOSAIC_BENCH_TINY=1 replaces the timed shapes by a tiny one (a dry run of the script on CPU).
set -u
OUT=${OUT:-/tmp/mosaic_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export JAX_TRACEBACK_FILTERING=off  # full tracebacks: compile errors are debugged from this log
echo "== versions"; $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

echo "== (a) tests/kernels/test_chunkwise_mosaic.py (not slow)"
timeout 300 $PY -m pytest -q -o addopts= -rA --tb=long -m "not slow" tests/kernels/test_chunkwise_mosaic.py 2>&1 | tee "$OUT/mosaic_tests.log"
echo "tests exit status: ${PIPESTATUS[0]}"

echo "== (b) forward timings (median of 20 calls)"
timeout 120 $PY - "$OUT/mosaic_bench.json" <<'PYEOF' 2>&1
import json, statistics, sys, time, traceback
import jax, jax.numpy as jnp
from xlstm_jax.kernels import get_mlstm_kernel

out_path = sys.argv[1]
import os
CONFIGS = [("standard", 8, 16, 8192, 128, 256), ("7B", 8, 8, 8192, 256, 512)]
if os.environ.get("MOSAIC_BENCH_TINY"):  # dry run of this script on CPU (errors expected there)
    CONFIGS = [("tiny", 1, 1, 64, 64, 64)]
KERNELS = [("chunkwise_mosaic", dict(chunk_size=128)), ("chunkwise_pallas", dict(chunk_size=128))]
rows = []
for cname, B, NH, S, DQ, DV in CONFIGS:
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (B, NH, S, DQ), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, NH, S, DQ), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, NH, S, DV), jnp.bfloat16)
    i = jax.random.normal(ks[3], (B, NH, S), jnp.float32)
    f = 3.0 + jax.random.normal(ks[4], (B, NH, S), jnp.float32)
    ref = None
    for kname, opts in KERNELS:
        row = dict(config=cname, B=B, NH=NH, S=S, DHQK=DQ, DHV=DV, kernel=kname, options=opts,
                   dtype="bfloat16", ms=None, error=None)
        try:
            fn = jax.jit(get_mlstm_kernel(kname, **opts))
            t0 = time.perf_counter()
            h = fn(q, k, v, i, f).block_until_ready()
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                fn(q, k, v, i, f).block_until_ready()
                ts.append((time.perf_counter() - t0) * 1e3)
            row["ms"] = round(statistics.median(ts), 3)
            if kname == "chunkwise_mosaic":
                ref = h
            elif ref is not None:
                d = jnp.linalg.norm((h - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32))
                row["rel_diff_vs_first"] = float(d)
        except Exception as e:  # print the whole error: it is what the next session debugs from
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:4000]
        rows.append(row)
        print(row, flush=True)
meta = dict(jax=jax.__version__, device=str(jax.devices()[0]), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            what="forward only (no grad), jitted, median of 20 calls after one compile call")
with open(out_path, "w") as fh:
    json.dump(dict(meta=meta, rows=rows), fh, indent=1)
print("\n| config | B,NH,S,DHQK,DHV | kernel | ms (median of 20) | note |")
print("|---|---|---|---|---|")
for r in rows:
    if r["error"]:
        note = "ERROR " + r["error"].splitlines()[0][:80]
    elif "rel_diff_vs_first" in r:
        note = f"h rel diff vs chunkwise_mosaic {r['rel_diff_vs_first']:.1e}"
    else:
        note = ""
    ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
    print(f"| {r['config']} | {r['B']},{r['NH']},{r['S']},{r['DHQK']},{r['DHV']} | {r['kernel']} | {ms} | {note} |")
PYEOF
echo "bench exit status: $?"
