"""``xlstm-jax bench-decode``: one mLSTM decode step, the fused Pallas step against the pure-JAX step.

Shapes: the head shape of ``--heads`` (default ``7b``: NH = 8, DHQK = 256, DHV = 512, the xLSTM-7B
layers), float32 states, bfloat16 q, k, v, float32 gates, B in ``--batches`` (default
1, 8, 64, 256, 1024). For each B and step kernel (``recurrent_pallas``, ``recurrent_native``):

- ``step``: the jitted step with its states donated, called back to back (host dispatch included:
  at small B this measures the dispatch, not the GPU);
- ``scan``: per-step time inside one jitted ``lax.scan`` decode loop (``inference.decode_sequence``)
  of ``--steps`` steps (default 256 at B <= 64, 32 above, to bound the inputs' memory);
- state bytes: C, n, m read and written once per step, ``2 * B * NH * (DHQK * DHV + DHQK + 1) * 4``;
  achieved bandwidth = state bytes / time, and the floor = state bytes / the best copy bandwidth
  measured in the same run (``timing.copy_bandwidths``; on a GPU only, unless ``--no-ceilings``);
- at B = 1 also the decode loop with ``lax.scan(..., unroll=8)``.

Timing: ``xlstm_jax.tools.timing.time_calls`` (median of timed repetitions after warm-up, inputs
rotated between two sets). At B = 1 and 8 with the 7b heads the states (4 and 34 MB) fit in the L2
cache (50-60 MB on H100/H200), so "bandwidth" there can exceed the HBM copy bandwidth. ``--sweep``
also times a grid of tile sizes for the Pallas step (tuning). On a CPU the Pallas step runs in
interpret mode: the figures then mean nothing (a smoke test: ``--heads 1,16,16 --batches 1 --steps 4``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any

from .options import int_at_least
from .workload import HEAD_PRESETS, Heads, heads_arg, parse_heads

BATCHES = (1, 8, 64, 256, 1024)
STATE_ITEMSIZE = 4  # float32 states
KERNELS = (("pallas", "recurrent_pallas"), ("native", "recurrent_native"))

SWEEP = [  # (block_dhqk, block_dhv, num_warps)
    (256, 16, 4), (256, 32, 8), (128, 32, 4), (64, 64, 4), (128, 64, 8),
    (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (16, 512, 8),
]


def _batches_type(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers; got {text!r}")
    return tuple(int(p) for p in parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax bench-decode``."""
    parser.add_argument("--heads", type=heads_arg, default=parse_heads("7b"), metavar="PRESET|NH,DHQK,DHV",
                        help=f"head shape: a preset ({', '.join(HEAD_PRESETS)}) or explicit sizes (default: 7b = 8,256,512)")
    parser.add_argument("--batches", type=_batches_type, default=BATCHES, metavar="B,B,...",
                        help="batch sizes (default: 1,8,64,256,1024)")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="decode-loop length (default: 256 at B <= 64, 32 above)")
    parser.add_argument("--reps", type=int_at_least(1), default=7, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed calls after compilation")
    parser.add_argument("--unroll", type=int_at_least(1), default=1, help="lax.scan unroll of the decode loop")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Pallas tile sizes")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="do not measure the copy bandwidth (it is measured on a GPU only)")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR",
                        help="write the optimized HLO of the B=1 decode loop per kernel to DIR, and count "
                             "the operations of the loop body (default: no)")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file (default: none)")


def _inputs(heads: Heads, B: int, T: int, key):
    """States (float32) and T steps of inputs: q, k, v bf16 (B, NH, T, D), gates float32 (B, NH, T)."""
    import jax
    import jax.numpy as jnp

    NH, DHQK, DHV = heads.NH, heads.DHQK, heads.DHV
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


def time_step(
    step_kernel: str, heads: Heads, B: int, reps: int, warmup: int = 3, step_options: dict | None = None,
    calls: int = 20,
) -> float:
    """Seconds per step of the jitted, state-donating step called ``calls`` times back to back, the
    step inputs alternating between two sets."""
    import jax

    from xlstm_jax.inference import MLSTMState, decode_step

    from .timing import time_calls

    state, _ = _inputs(heads, B, 1, jax.random.PRNGKey(B))
    x_sets = [tuple(x[:, :, 0] for x in _inputs(heads, B, 1, jax.random.PRNGKey(B + s))[1]) for s in (0, 1)]

    def one(st, x):
        h, new = decode_step(MLSTMState(*st), *x, step_kernel=step_kernel, step_options=step_options)
        return h, tuple(new)  # a plain tuple, like the input: no retrace on the next call

    step = jax.jit(one, donate_argnums=0)
    box = [tuple(state)]

    def call(x):
        _, box[0] = step(box[0], x)
        return box[0]

    return time_calls(call, [(x,) for x in x_sets], reps=reps, warmup=warmup, calls_per_rep=calls).median_s


def time_scan(
    step_kernel: str, heads: Heads, B: int, T: int, reps: int, warmup: int = 3,
    step_options: dict | None = None, unroll: int = 1,
) -> float:
    """Seconds per step inside one jitted ``decode_sequence`` (lax.scan) of T steps, states donated,
    the inputs alternating between two sets."""
    import jax

    from xlstm_jax.inference import MLSTMState, decode_sequence

    from .timing import time_calls

    state, xs0 = _inputs(heads, B, T, jax.random.PRNGKey(B + 1))
    xs1 = _inputs(heads, B, T, jax.random.PRNGKey(B + 2))[1]

    def many(st, xs):
        h, new = decode_sequence(
            MLSTMState(*st), *xs, step_kernel=step_kernel, step_options=step_options, unroll=unroll
        )
        return h, tuple(new)

    loop = jax.jit(many, donate_argnums=0)
    box = [tuple(state)]

    def call(xs):
        h, box[0] = loop(box[0], xs)
        return h, box[0]

    return time_calls(call, [(xs0,), (xs1,)], reps=reps, warmup=warmup).median_s / T


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


def dump_decode_loop_hlo(directory: str, heads: Heads, T: int = 256) -> dict[str, dict[str, int]]:
    """Optimized HLO of the B=1 decode loop for each step kernel, written to ``directory``."""
    import jax

    from xlstm_jax.inference import MLSTMState, decode_sequence

    os.makedirs(directory, exist_ok=True)
    state, xs = _inputs(heads, 1, T, jax.random.PRNGKey(0))
    out = {}
    for _, kernel in KERNELS:
        def many(st, xs, kernel=kernel):
            h, new = decode_sequence(MLSTMState(*st), *xs, step_kernel=kernel)
            return h, tuple(new)

        text = jax.jit(many, donate_argnums=0).lower(tuple(state), xs).compile().as_text()
        with open(os.path.join(directory, f"decode_loop_B1_{kernel}.hlo.txt"), "w") as fh:
            fh.write(text)
        out[kernel] = loop_body_ops(text)
        print(f"# B=1 decode-loop body ops, {kernel}: {out[kernel]}", flush=True)
    return out


def state_bytes(heads: Heads, B: int) -> int:
    """Bytes of C, n, m read and written once by one step."""
    return 2 * B * heads.NH * (heads.DHQK * heads.DHV + heads.DHQK + 1) * STATE_ITEMSIZE


def _versions() -> dict[str, str]:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table; write JSON if asked. Returns 0."""
    import jax

    from .timing import copy_bandwidths

    heads: Heads = args.heads
    info = _versions()
    print(f"# mLSTM decode step, heads {heads.name}: NH={heads.NH} DHQK={heads.DHQK} DHV={heads.DHV}, "
          f"float32 states, bf16 q/k/v; {info}", flush=True)
    loop_ops = dump_decode_loop_hlo(args.dump_hlo, heads) if args.dump_hlo else None
    bws, bw = None, None
    if jax.default_backend() == "gpu" and not args.no_ceilings:
        bws = copy_bandwidths(args.reps)
        bw = max(bws.values())
        print("# copy bandwidth over 2 x 1 GiB, read+write counted (TB/s): "
              + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in bws.items()) + f"; the floor uses the best, {bw / 1e12:.3f}",
              flush=True)
    rows = []
    for B in args.batches:
        T = args.steps or (256 if B <= 64 else 32)
        nbytes = state_bytes(heads, B)
        row: dict[str, Any] = {"B": B, "scan_steps": T, "state_bytes": nbytes,
                               "floor_us": nbytes / bw * 1e6 if bw else None}
        for name, kernel in KERNELS:
            t_step = time_step(kernel, heads, B, args.reps, args.warmup)
            t_scan = time_scan(kernel, heads, B, T, args.reps, args.warmup, unroll=args.unroll)
            row[f"{name}_step_us"] = t_step * 1e6
            row[f"{name}_scan_us"] = t_scan * 1e6
            row[f"{name}_scan_GBps"] = nbytes / t_scan / 1e9
            row[f"{name}_scan_frac_copy"] = nbytes / t_scan / bw if bw else None
            if B == 1 and args.unroll == 1:
                row[f"{name}_scan_unroll8_us"] = time_scan(kernel, heads, B, T, args.reps, args.warmup, unroll=8) * 1e6
        if args.sweep:
            sweep = []
            for bk, bv, nw in SWEEP:
                opts = dict(block_dhqk=bk, block_dhv=bv, num_warps=nw)
                try:
                    t = time_step("recurrent_pallas", heads, B, args.reps, args.warmup, opts)
                    ts = (time_scan("recurrent_pallas", heads, B, min(T, 64), max(3, args.reps // 2), args.warmup, opts)
                          if B <= 8 else t)
                except Exception as err:  # a config Triton cannot compile: record it, keep going
                    sweep.append({**opts, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                    continue
                frac = nbytes / ts / bw if bw else None
                sweep.append({**opts, "step_us": t * 1e6, "scan_us": ts * 1e6, "scan_frac_copy": frac})
                print(f"  sweep B={B} {opts}: step {t * 1e6:9.1f} us, scan {ts * 1e6:9.1f} us/step "
                      f"({_fmt(frac, '.0%')} of copy)", flush=True)
            row["sweep"] = sweep
        rows.append(row)
        print(f"  B={B}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)

    print()
    print("| B | state MB | floor us | Pallas scan us/step | GB/s | % of copy | pure-JAX scan us/step | % of copy "
          "| Pallas step us (dispatch) | pure-JAX step us (dispatch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['state_bytes'] / 2e6:.1f} | {_fmt(r['floor_us'], '.1f')} | {r['pallas_scan_us']:.1f} | "
              f"{r['pallas_scan_GBps']:.0f} | {_fmt(r['pallas_scan_frac_copy'], '.0%')} | {r['native_scan_us']:.1f} | "
              f"{_fmt(r['native_scan_frac_copy'], '.0%')} | {r['pallas_step_us']:.1f} | {r['native_step_us']:.1f} |")
    b1 = [r for r in rows if r["B"] == 1]
    if b1:
        r = b1[0]
        print(f"# B=1 decode loop ({r['scan_steps']} steps, unroll {args.unroll}): Pallas {r['pallas_scan_us']:.1f} "
              f"us/step, pure JAX {r['native_scan_us']:.1f} us/step")
        if "pallas_scan_unroll8_us" in r:
            print(f"# B=1 decode loop, lax.scan unroll=8: Pallas {r['pallas_scan_unroll8_us']:.1f} us/step, "
                  f"pure JAX {r['native_scan_unroll8_us']:.1f} us/step")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "heads": heads.name,
                       "shape": {"NH": heads.NH, "DHQK": heads.DHQK, "DHV": heads.DHV},
                       "copy_Bps": bw, "copy_Bps_all": bws, "rows": rows, "loop_body_ops": loop_ops,
                       "date": time.strftime("%Y-%m-%d")}, fh, indent=1)
    return 0
