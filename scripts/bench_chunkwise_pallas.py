"""Time the Pallas chunkwise (TFLA) kernels at PERF.md's standard workload; check them against XLA.

Standard workload: bf16, NH=16, DHQK=128, DHV=256, B*S = 65536 tokens, S in 2048/8192/32768.
Reports fw and fwbw (gradients of sum(h * dh) w.r.t. q, k, v, i, f) medians in ms over many timed
runs after compile and warm-up, with inputs rotated between two sets, in both gradient modes;
TFLOP/s by PERF.md's count (fw: 2 * (L*DHQK + L*DHV + 2*DHQK*DHV) per token and head with L the
intra chunk; fwbw: 3x fw), the compiled executables' memory (``memory_analysis``) and the device's
peak (``memory_stats``). ``--check`` compares h and every gradient with ``chunkwise_native`` run in
float32 (full-precision products, not TF32) on the same (bf16-valued) inputs.

Usage: python scripts/bench_chunkwise_pallas.py [--shapes 32x2048,8x8192,2x32768] [--modes exact,tfla]
       [--reps 30] [--check] [--options '{"chunk_size_intra": 128}'] [--json out.json] [--label text]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from xlstm_jax.kernels import get_mlstm_kernel
from xlstm_jax.kernels.mlstm_chunkwise.pallas import chunkwise_kernel_params
from xlstm_jax.testing import relative_error

NH, DHQK, DHV = 16, 128, 256
DT = jnp.bfloat16


def make_inputs(seed, B, S):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, NH, S, DHQK), DT)
    k = jax.random.normal(ks[1], (B, NH, S, DHQK), DT)
    v = jax.random.normal(ks[2], (B, NH, S, DHV), DT)
    i = jax.random.normal(ks[3], (B, NH, S), DT)
    f = (3.0 + jax.random.normal(ks[4], (B, NH, S))).astype(DT)
    dh = jax.random.normal(ks[5], (B, NH, S, DHV), DT)
    return (q, k, v, i, f), dh


def timeit(fn, arg_sets, reps, warm):
    for j in range(warm):
        jax.block_until_ready(fn(*arg_sets[j % len(arg_sets)]))
    ts = []
    for j in range(reps):
        args = arg_sets[j % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def mem_of(jitted, *args):
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
        return {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")}
    except Exception as e:  # noqa: BLE001 - memory analysis is informational
        return {"error": repr(e)[:200]}


def peak_bytes():
    try:
        return int(jax.devices()[0].memory_stats().get("peak_bytes_in_use", -1))
    except Exception:  # noqa: BLE001
        return -1


def fw_fwbw(kernel, grad_mode):
    fw = jax.jit(lambda q, k, v, i, f: kernel(q, k, v, i, f, grad_mode=grad_mode))

    def loss(q, k, v, i, f, dh):
        return jnp.sum(kernel(q, k, v, i, f, grad_mode=grad_mode).astype(jnp.float32) * dh.astype(jnp.float32))

    fwbw = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return fw, fwbw


def run_options(args, options, native):
    """Time (and check) one set of kernel options at every shape; returns the records."""
    results = []
    kernel = get_mlstm_kernel("chunkwise_pallas", **options)
    for shape in args.shapes.split(","):
        B, S = (int(x) for x in shape.split("x"))
        tile_opts = {k: v for k, v in options.items() if k not in ("autocast_kernel_dtype", "output_dtype", "recompute_states_in_bw", "interpret", "chunk_size")}
        p = chunkwise_kernel_params(S=S, DHQK=DHQK, DHV=DHV, dtype=DT, chunk_size=options.get("chunk_size"), **tile_opts)
        L = p.chunk_size_intra
        flop_fw = 2.0 * (L * DHQK + L * DHV + 2 * DHQK * DHV) * B * S * NH
        sets = [make_inputs(s, B, S) for s in (0, 1)]
        fw_sets = [a for a, _ in sets]
        bw_sets = [a + (dh,) for a, dh in sets]
        for mode in args.modes.split(","):
            rec = dict(label=args.label, B=B, S=S, NH=NH, DHQK=DHQK, DHV=DHV, dtype="bfloat16",
                       grad_mode=mode, params=p.__dict__, options=options)
            try:
                fw, fwbw = fw_fwbw(kernel, mode)
                t0 = time.perf_counter()
                h = jax.block_until_ready(fw(*fw_sets[0]))
                rec["fw_compile_s"] = time.perf_counter() - t0
                rec["fw_nan"] = bool(jnp.isnan(h.astype(jnp.float32)).any())
                rec["fw_ms"], rec["fw_min_ms"] = timeit(fw, fw_sets, args.reps, args.warmup)
                rec["fw_tflops"] = flop_fw / rec["fw_ms"] * 1e-9
                rec["fw_mem"] = mem_of(fw, *fw_sets[0])
                if not args.no_fwbw:
                    t0 = time.perf_counter()
                    g = jax.block_until_ready(fwbw(*bw_sets[0]))
                    rec["fwbw_compile_s"] = time.perf_counter() - t0
                    rec["fwbw_nan"] = any(bool(jnp.isnan(x.astype(jnp.float32)).any()) for x in g)
                    rec["fwbw_ms"], rec["fwbw_min_ms"] = timeit(fwbw, bw_sets, args.reps, args.warmup)
                    rec["fwbw_tflops"] = 3 * flop_fw / rec["fwbw_ms"] * 1e-9
                    rec["fwbw_mem"] = mem_of(fwbw, *bw_sets[0])
                rec["peak_bytes_in_use"] = peak_bytes()
                if args.check and mode in args.check_modes.split(","):
                    a32 = [x.astype(jnp.float32) for x in fw_sets[0]]
                    dh = bw_sets[0][-1]
                    nfw, nfwbw = fw_fwbw(native, mode)
                    # full float32 products in the reference (XLA:GPU uses TF32 by default)
                    with jax.default_matmul_precision(args.ref_precision):
                        rec["err_h"] = relative_error(h, nfw(*a32))
                        if not args.no_fwbw:
                            gref = nfwbw(*a32, dh.astype(jnp.float32))
                            rec["err_grads"] = {n: relative_error(a, b) for n, a, b in zip("qkvif", g, gref)}
                    rec["ref_precision"] = args.ref_precision
                    del a32
            except Exception as e:  # noqa: BLE001 - a failing configuration is recorded, the rest runs
                rec["error"] = repr(e)[:2000]
                traceback.print_exc()
            print("RESULT " + json.dumps(rec), flush=True)
            results.append(rec)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32x2048,8x8192,2x32768")
    ap.add_argument("--modes", default="exact,tfla")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-modes", default="exact", help="grad modes checked with --check")
    ap.add_argument("--ref-precision", default="highest", help="matmul precision of the XLA reference")
    ap.add_argument("--options", default="{}", help="JSON dict (or list of dicts) of chunkwise_pallas kernel options")
    ap.add_argument("--no-fwbw", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    option_sets = json.loads(args.options)
    if isinstance(option_sets, dict):
        option_sets = [option_sets]
    native = get_mlstm_kernel("chunkwise_native", chunk_size=64)
    results = []
    print("jax", jax.__version__, jax.devices(), flush=True)
    for options in option_sets:
        results += run_options(args, options, native)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
