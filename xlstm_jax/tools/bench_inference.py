"""Inference benchmark: one mLSTM decode step, the fused Pallas step against the pure-JAX step.

Run as ``python -m xlstm_jax.tools.bench_inference [--json PATH]`` (``scripts/gpu_suite.sh``'s
``infer`` section). Shapes: NH = 8, DHQK = 256, DHV = 512 (the xLSTM-7B head shape), float32 states,
bfloat16 q, k, v, float32 gates, B in {1, 8, 64, 256, 1024}. For each B and step kernel:

- ``step``: the jitted step with its states donated, called back to back (host dispatch included:
  at small B this measures the dispatch, not the GPU);
- ``scan``: per-step time inside one jitted ``lax.scan`` decode loop (``inference.decode_sequence``)
  of ``--steps`` steps (256 at B <= 64, 32 above, to bound the inputs' memory);
- state bytes: C, n, m read and written once per step, ``2 * B * NH * (DHQK * DHV + DHQK + 1) * 4``;
  achieved bandwidth = state bytes / time, and the floor = state bytes / the copy bandwidth measured
  in the same run (the best of a device-to-device copy, ``x + 1`` out of place and ``x + 1`` in
  place, over 2 GiB of float32, bytes read + written);
- at B = 1 also the decode loop with ``lax.scan(..., unroll=8)``.

Medians of several timed repetitions after warm-up. At B = 1 and 8 the states (4 and 34 MB) fit in
the L2 cache (50-60 MB on H100/H200), so "bandwidth" there can exceed the HBM copy bandwidth.
``--sweep`` also times a grid of tile sizes for the Pallas step (tuning). On CPU the Pallas step runs
in interpret mode: the figures then mean nothing; use ``--batches 1 --steps 4`` as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

NH, DHQK, DHV = 8, 256, 512
BATCHES = (1, 8, 64, 256, 1024)
STATE_ITEMSIZE = 4  # float32 states

SWEEP = [  # (block_dhqk, block_dhv, num_warps)
    (256, 16, 4), (256, 32, 8), (128, 32, 4), (64, 64, 4), (128, 64, 8),
    (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (16, 512, 8),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the benchmark (also usable as a CLI subcommand)."""
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=None, help="decode-loop length (default 256 / 32)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Pallas tile sizes")
    parser.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of the decode loop")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR",
                        help="write the optimized HLO of the B=1 decode loop per kernel to DIR, and count "
                             "the operations of the loop body (what each decode step launches)")


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` (which must block on its results) over ``reps`` calls."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidths(reps: int, nbytes: int = 1 << 31, calls: int = 10) -> dict[str, float]:
    """Bytes per second (read + write counted) of three ways to stream ``nbytes`` of float32.

    ``copy``: ``jnp.copy`` into a new buffer (a device-to-device copy); ``add_out``: ``x + 1`` into a
    new buffer; ``add_inplace``: ``x + 1`` with x donated (read and write the same buffer, the access
    pattern of an in-place state update). Each: ``calls`` back-to-back calls per timed repetition.
    """
    x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 4,), jnp.float32)
    out = {}
    for name, fn, donate in (
        ("copy", lambda x: jnp.copy(x), False),
        ("add_out", lambda x: x + 1.0, False),
        ("add_inplace", lambda x: x + 1.0, True),
    ):
        jf = jax.jit(fn, donate_argnums=0) if donate else jax.jit(fn)
        box = [x + 0.0 if donate else x]
        jax.block_until_ready(jf(box[0]) if not donate else box[0])

        def batch(jf=jf, donate=donate):
            for _ in range(calls):
                y = jf(box[0])
                if donate:
                    box[0] = y
            jax.block_until_ready(y)

        batch()  # warm-up
        out[name] = 2 * nbytes / (_median_time(batch, reps) / calls)
        del box
    return out


def _inputs(B: int, T: int, key):
    """States (float32) and T steps of inputs: q, k, v bf16 (B, NH, T, D), gates float32 (B, NH, T)."""
    ks = jax.random.split(key, 8)
    C = 0.1 * jax.random.normal(ks[0], (B, NH, DHQK, DHV), jnp.float32)
    n = 0.1 * jax.random.normal(ks[1], (B, NH, DHQK), jnp.float32)
    m = jax.random.normal(ks[2], (B, NH), jnp.float32)
    q = jax.random.normal(ks[3], (B, NH, T, DHQK), jnp.bfloat16)
    k = jax.random.normal(ks[4], (B, NH, T, DHQK), jnp.bfloat16)
    v = jax.random.normal(ks[5], (B, NH, T, DHV), jnp.bfloat16)
    i = jax.random.normal(ks[6], (B, NH, T), jnp.float32)
    f = 3.0 + jax.random.normal(ks[7], (B, NH, T), jnp.float32)
    return (C, n, m), (q, k, v, i, f)


def time_step(step_kernel: str, B: int, reps: int, step_options: dict | None = None, calls: int = 20) -> float:
    """Seconds per step of the jitted, state-donating step called ``calls`` times back to back."""
    from xlstm_jax.inference import MLSTMState, decode_step

    state, xs = _inputs(B, 1, jax.random.PRNGKey(B))
    x1 = tuple(x[:, :, 0] for x in xs)
    def one(st, x):
        h, new = decode_step(MLSTMState(*st), *x, step_kernel=step_kernel, step_options=step_options)
        return h, tuple(new)  # a plain tuple, like the input: no retrace on the next call

    step = jax.jit(one, donate_argnums=0)
    box = [tuple(state)]
    for _ in range(3):
        _, box[0] = step(box[0], x1)
    jax.block_until_ready(box[0])

    def batch():
        for _ in range(calls):
            _, box[0] = step(box[0], x1)
        jax.block_until_ready(box[0])

    return _median_time(batch, reps) / calls


def time_scan(
    step_kernel: str, B: int, T: int, reps: int, step_options: dict | None = None, unroll: int = 1
) -> float:
    """Seconds per step inside one jitted ``decode_sequence`` (lax.scan) of T steps, states donated."""
    from xlstm_jax.inference import MLSTMState, decode_sequence

    state, xs = _inputs(B, T, jax.random.PRNGKey(B + 1))
    def many(st, xs):
        h, new = decode_sequence(
            MLSTMState(*st), *xs, step_kernel=step_kernel, step_options=step_options, unroll=unroll
        )
        return h, tuple(new)

    loop = jax.jit(many, donate_argnums=0)
    box = [tuple(state)]
    _, box[0] = loop(box[0], xs)
    jax.block_until_ready(box[0])

    def once():
        h, box[0] = loop(box[0], xs)
        jax.block_until_ready((h, box[0]))

    return _median_time(once, reps) / T


def loop_body_ops(hlo_text: str) -> dict[str, int]:
    """Opcode counts of the body computation(s) of the while loop(s) in optimized HLO text."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    counts: dict[str, int] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^%?([\w.\-]+) \(.*\{\s*$", line)
        if head:
            current = head.group(1) if head.group(1) in bodies else None
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is None:
            continue
        op = re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*?\s([a-z][\w\-]*)\(", line)
        if op and op.group(1) not in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
            counts[op.group(1)] = counts.get(op.group(1), 0) + 1
    return counts


def dump_decode_loop_hlo(directory: str, T: int = 256) -> dict[str, dict[str, int]]:
    """Optimized HLO of the B=1 decode loop for each step kernel, written to ``directory``."""
    from xlstm_jax.inference import MLSTMState, decode_sequence

    os.makedirs(directory, exist_ok=True)
    state, xs = _inputs(1, T, jax.random.PRNGKey(0))
    out = {}
    for kernel in ("recurrent_pallas", "recurrent_native"):
        def many(st, xs, kernel=kernel):
            h, new = decode_sequence(MLSTMState(*st), *xs, step_kernel=kernel)
            return h, tuple(new)

        text = jax.jit(many, donate_argnums=0).lower(tuple(state), xs).compile().as_text()
        with open(os.path.join(directory, f"decode_loop_B1_{kernel}.hlo.txt"), "w") as fh:
            fh.write(text)
        out[kernel] = loop_body_ops(text)
        print(f"# B=1 decode-loop body ops, {kernel}: {out[kernel]}", flush=True)
    return out


def state_bytes(B: int) -> int:
    """Bytes of C, n, m read and written once by one step."""
    return 2 * B * NH * (DHQK * DHV + DHQK + 1) * STATE_ITEMSIZE


def _versions() -> dict[str, str]:
    import jaxlib

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table; write JSON if asked. Returns 0."""
    batches = [int(b) for b in str(args.batches).split(",") if b]
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be positive; got {args.batches!r}")
    info = _versions()
    print(f"# mLSTM decode step, NH={NH} DHQK={DHQK} DHV={DHV}, float32 states, bf16 q/k/v; {info}", flush=True)
    loop_ops = dump_decode_loop_hlo(args.dump_hlo) if args.dump_hlo else None
    bws = copy_bandwidths(args.reps)
    bw = max(bws.values())
    print("# copy bandwidth over 2 GiB, read+write counted (TB/s): "
          + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in bws.items()) + f"; the floor uses the best, {bw / 1e12:.3f}",
          flush=True)
    rows = []
    for B in batches:
        T = args.steps or (256 if B <= 64 else 32)
        nbytes = state_bytes(B)
        row: dict[str, Any] = {"B": B, "scan_steps": T, "state_bytes": nbytes, "floor_us": nbytes / bw * 1e6}
        for name, kernel in (("pallas", "recurrent_pallas"), ("native", "recurrent_native")):
            t_step = time_step(kernel, B, args.reps)
            t_scan = time_scan(kernel, B, T, args.reps, unroll=args.unroll)
            row[f"{name}_step_us"] = t_step * 1e6
            row[f"{name}_scan_us"] = t_scan * 1e6
            row[f"{name}_scan_GBps"] = nbytes / t_scan / 1e9
            row[f"{name}_scan_frac_copy"] = nbytes / t_scan / bw
            if B == 1 and args.unroll == 1:
                row[f"{name}_scan_unroll8_us"] = time_scan(kernel, B, T, args.reps, unroll=8) * 1e6
        if args.sweep:
            sweep = []
            for bk, bv, nw in SWEEP:
                opts = dict(block_dhqk=bk, block_dhv=bv, num_warps=nw)
                try:
                    t = time_step("recurrent_pallas", B, args.reps, opts)
                    ts = time_scan("recurrent_pallas", B, min(T, 64), max(3, args.reps // 2), opts) if B <= 8 else t
                except Exception as err:  # a config Triton cannot compile: record it, keep going
                    sweep.append({**opts, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                    continue
                sweep.append({**opts, "step_us": t * 1e6, "scan_us": ts * 1e6, "scan_frac_copy": nbytes / ts / bw})
                print(f"  sweep B={B} {opts}: step {t * 1e6:9.1f} us, scan {ts * 1e6:9.1f} us/step "
                      f"({nbytes / ts / bw:.0%} of copy)", flush=True)
            row["sweep"] = sweep
        rows.append(row)
        print(f"  B={B}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)

    print()
    print("| B | state MB | floor us | Pallas scan us/step | GB/s | % of copy | pure-JAX scan us/step | % of copy "
          "| Pallas step us (dispatch) | pure-JAX step us (dispatch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['state_bytes'] / 2e6:.1f} | {r['floor_us']:.1f} | {r['pallas_scan_us']:.1f} | "
              f"{r['pallas_scan_GBps']:.0f} | {r['pallas_scan_frac_copy']:.0%} | {r['native_scan_us']:.1f} | "
              f"{r['native_scan_frac_copy']:.0%} | {r['pallas_step_us']:.1f} | {r['native_step_us']:.1f} |")
    b1 = [r for r in rows if r["B"] == 1]
    if b1:
        r = b1[0]
        print(f"# B=1 decode loop ({r['scan_steps']} steps, unroll {args.unroll}): Pallas {r['pallas_scan_us']:.1f} "
              f"us/step, pure JAX {r['native_scan_us']:.1f} us/step (target < 25 us)")
        if "pallas_scan_unroll8_us" in r:
            print(f"# B=1 decode loop, lax.scan unroll=8: Pallas {r['pallas_scan_unroll8_us']:.1f} us/step, "
                  f"pure JAX {r['native_scan_unroll8_us']:.1f} us/step")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "shape": {"NH": NH, "DHQK": DHQK, "DHV": DHV}, "copy_Bps": bw, "copy_Bps_all": bws,
                       "rows": rows, "loop_body_ops": loop_ops,
                       "date": time.strftime("%Y-%m-%d")}, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m xlstm_jax.tools.bench_inference``."""
    parser = argparse.ArgumentParser(prog="python -m xlstm_jax.tools.bench_inference", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
