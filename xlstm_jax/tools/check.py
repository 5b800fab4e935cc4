"""``xlstm-jax check``: every registered kernel against the float64 reference, as a table.

For each kernel of the registry: random inputs with initial states at a small default shape, h, the
last states (C, n, m) and the gradients of q, k, v, i, f, c0, n0, m0 compared with the float64
parallel reference (``parallel_native`` under ``jax_enable_x64``); relative errors
||out - ref|| / ||ref|| and the median time of a jitted forward+backward. Exit code 1 if any error
exceeds the tolerance (float32 1e-3, bf16 2e-2) or is NaN.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 2e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", nargs="*", default=None, help="kernel names (default: all registered)")
    p.add_argument("--shape", default="2,2,100,16,32", help="B,NH,S,DHQK,DHV (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE), help="input dtype")
    p.add_argument("--grad-mode", default="exact", choices=["exact", "tfla"], help="gradient convention")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per kernel")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise SystemExit(f"--shape must be five positive ints B,NH,S,DHQK,DHV; got {text!r}")
    return shape


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from xlstm_jax.kernels import available_mlstm_kernels, get_mlstm_kernel
    from xlstm_jax.testing import outputs_and_grads, random_cotangents, relative_error, to_float64

    B, NH, S, DHQK, DHV = _parse_shape(args.shape)
    names = args.kernels or available_mlstm_kernels()
    unknown = sorted(set(names) - set(available_mlstm_kernels()))
    if unknown:
        raise SystemExit(f"unknown kernel(s) {unknown}; available: {available_mlstm_kernels()}")
    dtype = jnp.dtype(args.dtype)
    tol = TOLERANCE[args.dtype]
    print(f"xlstm-jax check: B={B} NH={NH} S={S} DHQK={DHQK} DHV={DHV} dtype={args.dtype} "
          f"grad_mode={args.grad_mode} on {jax.default_backend()} (jax {jax.__version__})")

    from xlstm_jax.testing import mlstm_inputs

    key = jax.random.PRNGKey(args.seed)
    inputs = mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=dtype, initial_states=True, m_initial_scale=3.0)
    states = inputs[5:]
    cots = random_cotangents(jax.random.fold_in(key, 1), (B, NH, S, DHV), states)

    with jax.enable_x64(True):
        ref = get_mlstm_kernel("parallel_native")
        ref_outs, ref_grads = outputs_and_grads(
            ref, to_float64(inputs), to_float64(cots), grad_mode=args.grad_mode
        )

    rows = []
    for name in tqdm(names, desc="kernels", unit="kernel"):
        kernel = get_mlstm_kernel(name)
        fn = jax.jit(lambda inp, cot, _k=kernel: outputs_and_grads(_k, inp, cot, grad_mode=args.grad_mode))
        row = {"kernel": name}
        try:
            outs, grads = jax.block_until_ready(fn(inputs, cots))
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(inputs, cots))
                times.append(time.perf_counter() - t0)
            row["ms"] = 1e3 * statistics.median(times)
            for key_, val in outs.items():
                row[key_] = relative_error(val, ref_outs[key_])
            for key_, val in grads.items():
                row["d" + key_] = relative_error(val, ref_grads[key_])
        except Exception as e:  # report and keep checking the other kernels
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)

    cols = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dc0", "dn0", "dm0"]
    print(f"\n{'kernel':<22}" + "".join(f"{c:>9}" for c in cols) + f"{'ms':>10}")
    failed = False
    for row in rows:
        if "error" in row:
            failed = True
            print(f"{row['kernel']:<22} ERROR {row['error']}")
            continue
        errs = [row[c] for c in cols]
        bad = any(math.isnan(e) or e > tol for e in errs)
        failed |= bad
        print(f"{row['kernel']:<22}" + "".join(f"{e:9.1e}" for e in errs) + f"{row['ms']:10.2f}"
              + ("  FAIL" if bad else ""))
    print(f"\nrelative errors vs the float64 parallel reference; tolerance {tol:g} "
          f"({'FAILED' if failed else 'all within'}); ms = jitted fw+bw median")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": [B, NH, S, DHQK, DHV], "dtype": args.dtype, "rows": rows}, fh, indent=1)
    return 1 if failed else 0
