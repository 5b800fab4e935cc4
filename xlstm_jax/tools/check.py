"""``xlstm-jax check``: every registered kernel against a float64 reference, as two tables.

Sequence kernels (``available_mlstm_kernels``): random inputs with initial states at a small shape
(``--shape``); h, the last states (C, n, m) and the gradients of q, k, v, i, f, c0, n0, m0 (of
sum(h*dh) + sum(C*dC) + sum(n*dn) + sum(m*dm) with random cotangents) compared with the parallel
reference ``parallel_native`` run in float64; the median time of the jitted forward+backward.

Step kernels (``available_mlstm_step_kernels``, forward only): from random initial states, one
step and a sequence of ``--steps`` steps (a jitted ``lax.scan``); h of every step and the last states
compared with ``parallel_native`` in float64 over the same one or ``--steps`` tokens from the same
initial states; the median time per step of the scan.

Errors are relative, ||out - ref|| / ||ref||. Exit status 1 if any error exceeds the tolerance
(float32 1e-3, bfloat16 / float16 2e-2) or is NaN, or a kernel raised.
"""

from __future__ import annotations

import argparse
import json
import math

from .errors import UsageError
from .options import int_at_least

TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 2e-2}
SEQUENCE_COLUMNS = ["h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dc0", "dn0", "dm0"]
STEP_COLUMNS = ["h@1", "C@1", "n@1", "m@1", "h", "C", "n", "m"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax check``."""
    p.add_argument("--kernels", nargs="*", default=None, metavar="NAME",
                   help="sequence kernels (default: all registered; the option with no names checks none)")
    p.add_argument("--step-kernels", nargs="*", default=None, metavar="NAME",
                   help="step kernels (default: all registered; the option with no names checks none)")
    p.add_argument("--shape", default="2,2,100,16,32", help="B,NH,S,DHQK,DHV of the sequence check")
    p.add_argument("--steps", type=int_at_least(1), default=8,
                   help="length of the step kernels' sequence check (B, NH, DHQK, DHV from --shape)")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE), help="input dtype")
    p.add_argument("--grad-mode", default="exact", choices=["exact", "tfla"], help="gradient convention")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed")
    p.add_argument("--reps", type=int_at_least(1), default=5, help="timed repetitions per kernel")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """``"B,NH,S,DHQK,DHV"`` -> five positive ints; ``UsageError`` otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 5 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UsageError(f"--shape must be five positive integers B,NH,S,DHQK,DHV; got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _names(given: list[str] | None, available: list[str], option: str) -> list[str]:
    if given is None:
        return list(available)
    unknown = [n for n in given if n not in available]
    if unknown:
        raise UsageError(f"{option}: unknown kernel(s) {unknown}; available: {', '.join(available)}")
    return list(given)


def _bad(err: float, tol: float) -> bool:
    return math.isnan(err) or err > tol


def check_sequence_kernels(names, shape, dtype, grad_mode, seed, reps) -> list[dict]:
    """One row per sequence kernel: relative errors of outputs, states and gradients, and ms."""
    import jax

    from xlstm_jax.kernels import get_mlstm_kernel
    from xlstm_jax.testing import mlstm_inputs, outputs_and_grads, random_cotangents, relative_error, to_float64

    from .timing import time_calls

    B, NH, S, DHQK, DHV = shape
    key = jax.random.PRNGKey(seed)
    sets = []
    for s in (0, 1):  # two input sets: the timing alternates between them; errors use the first
        k = jax.random.fold_in(key, 10 + s)
        inputs = mlstm_inputs(k, B, NH, S, DHQK, DHV, dtype=dtype, initial_states=True, m_initial_scale=3.0)
        sets.append((inputs, random_cotangents(jax.random.fold_in(k, 1), (B, NH, S, DHV), inputs[5:])))
    inputs, cots = sets[0]
    with jax.enable_x64(True):
        ref_outs, ref_grads = outputs_and_grads(
            get_mlstm_kernel("parallel_native"), to_float64(inputs), to_float64(cots), grad_mode=grad_mode
        )
        ref_outs, ref_grads = jax.device_get((ref_outs, ref_grads))

    rows = []
    for name in names:
        kernel = get_mlstm_kernel(name)
        fn = jax.jit(lambda inp, cot, _k=kernel: outputs_and_grads(_k, inp, cot, grad_mode=grad_mode))
        row: dict = {"kernel": name}
        try:
            outs, grads = jax.block_until_ready(fn(inputs, cots))
            for k_, val in outs.items():
                row[k_] = relative_error(val, ref_outs[k_])
            for k_, val in grads.items():
                row["d" + k_] = relative_error(val, ref_grads[k_])
            row["ms"] = time_calls(fn, sets, reps=reps, warmup=0).median_ms
        except Exception as e:  # report and keep checking the other kernels
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


def check_step_kernels(names, shape, steps, dtype, seed, reps) -> list[dict]:
    """One row per step kernel: relative errors after one step and after ``steps`` steps (h of
    every step, last states) against the float64 parallel reference, and microseconds per step."""
    import jax
    import jax.numpy as jnp

    from xlstm_jax.kernels import get_mlstm_kernel, get_mlstm_step_kernel
    from xlstm_jax.testing import mlstm_inputs, relative_error, to_float64

    from .timing import time_calls

    B, NH, _, DHQK, DHV = shape
    T = steps
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    sets = [
        mlstm_inputs(jax.random.fold_in(key, s), B, NH, T, DHQK, DHV, dtype=dtype, initial_states=True,
                     m_initial_scale=3.0)
        for s in (0, 1)
    ]
    q, k, v, i, f, c0, n0, m0 = sets[0]
    parallel = get_mlstm_kernel("parallel_native")
    with jax.enable_x64(True):
        x64 = to_float64((q, k, v, i, f, c0, n0, m0))
        ref_1 = parallel(*(x[:, :, :1] for x in x64[:5]), *x64[5:], return_last_states=True)
        ref_T = parallel(*x64, return_last_states=True)
        ref_1, ref_T = jax.device_get((ref_1, ref_T))

    def errors(h, state, ref, suffix):
        ref_h, ref_state = ref
        out = {"h" + suffix: relative_error(h, ref_h)}
        out.update({n + suffix: relative_error(a, b) for n, a, b in zip("Cnm", state, ref_state)})
        return out

    rows = []
    for name in names:
        step = get_mlstm_step_kernel(name)

        @jax.jit
        def one(inputs, _step=step):
            q, k, v, i, f, c0, n0, m0 = inputs
            return _step(c0, n0, m0, q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0])

        @jax.jit
        def sequence(inputs, _step=step):
            q, k, v, i, f, c0, n0, m0 = inputs

            def body(state, x):
                h, new = _step(*state, *x)
                return tuple(new), h

            last, hs = jax.lax.scan(body, (c0, n0, m0), tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f)))
            return jnp.moveaxis(hs, 0, 2), last

        row: dict = {"kernel": name}
        try:
            h1, s1 = jax.block_until_ready(one(sets[0]))
            row.update(errors(h1[:, :, None], s1, ref_1, "@1"))
            hT, sT = jax.block_until_ready(sequence(sets[0]))
            row.update(errors(hT, sT, ref_T, ""))
            row["us_per_step"] = 1e6 * time_calls(sequence, [(s,) for s in sets], reps=reps, warmup=0).median_s / T
        except Exception as e:  # report and keep checking the other kernels
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows


def _print_table(title: str, rows: list[dict], cols: list[str], time_key: str, time_label: str, tol: float) -> bool:
    """Print one table; True if any row failed."""
    print(f"\n{title}")
    print(f"{'kernel':<22}" + "".join(f"{c:>9}" for c in cols) + f"{time_label:>10}")
    failed = False
    for row in rows:
        if "error" in row:
            failed = True
            print(f"{row['kernel']:<22} ERROR {row['error']}")
            continue
        errs = [row[c] for c in cols]
        bad = any(_bad(e, tol) for e in errs)
        failed |= bad
        print(f"{row['kernel']:<22}" + "".join(f"{e:9.1e}" for e in errs) + f"{row[time_key]:10.2f}"
              + ("  FAIL" if bad else ""))
    return failed


def run(args) -> int:
    """Check; print the tables; write JSON if asked. Returns 1 if anything failed."""
    shape = parse_shape(args.shape)

    import jax
    import jax.numpy as jnp

    from xlstm_jax.kernels import available_mlstm_kernels, available_mlstm_step_kernels

    from xlstm_jax.kernels.registry import default_tool_kernels

    names = _names(args.kernels, available_mlstm_kernels(), "--kernels")
    if args.kernels is None:  # fw+bw checks: kernels with a backward that run here
        names = default_tool_kernels()
    step_names = _names(args.step_kernels, available_mlstm_step_kernels(), "--step-kernels")
    dtype = jnp.dtype(args.dtype)
    tol = TOLERANCE[args.dtype]
    B, NH, S, DHQK, DHV = shape
    print(f"xlstm-jax check: B={B} NH={NH} S={S} DHQK={DHQK} DHV={DHV} dtype={args.dtype} "
          f"grad_mode={args.grad_mode}, step kernels over {args.steps} steps, on {jax.default_backend()} "
          f"(jax {jax.__version__})")
    rows = check_sequence_kernels(names, shape, dtype, args.grad_mode, args.seed, args.reps) if names else []
    step_rows = check_step_kernels(step_names, shape, args.steps, dtype, args.seed, args.reps) if step_names else []

    failed = False
    if rows:
        failed |= _print_table(
            "sequence kernels: outputs, last states and gradients (inputs, initial states)",
            rows, SEQUENCE_COLUMNS, "ms", "ms", tol,
        )
    if step_rows:
        failed |= _print_table(
            f"step kernels: after 1 step (@1) and after {args.steps} steps (h of every step, last states)",
            step_rows, STEP_COLUMNS, "us_per_step", "us/step", tol,
        )
    print(f"\nrelative errors vs the float64 parallel reference; tolerance {tol:g} "
          f"({'FAILED' if failed else 'all within'}); ms = jitted fw+bw median, us/step = jitted scan median")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": list(shape), "steps": args.steps, "dtype": args.dtype, "grad_mode": args.grad_mode,
                       "rows": rows, "step_rows": step_rows}, fh, indent=1)
    return 1 if failed else 0
