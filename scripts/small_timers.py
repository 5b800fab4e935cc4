"""Three timers on one row, for ours (``chunkwise_auto``) or the peer (mlstm_kernels' limit_chunk).

The benchmark's timer (``xlstm-jax bench``, ``.peers/peer_shapes.py``) synchronises after every call,
so each timed call starts from an idle device and its host launches are on the critical path. This
script times the same functions three ways, to tell launch latency from device work:

    sync-rotated   one call per timing, two input sets alternating (the benchmark's timer)
    sync-same      one call per timing, always the same inputs (XLA command buffers need no update)
    pipelined      BATCH calls back to back (inputs alternating), one synchronisation, divided by
                   BATCH: the steady state of a program that calls the kernel inside a larger step

Usage (GPU machine, repository root): python3 scripts/small_timers.py ours|peer|floor [HEADS] [B,S]
(floor: ``v * 2``, one elementwise kernel on v, for the per-call cost of any jitted function)
(HEADS: small | standard | 7b; the peer needs the wheels of ``.whl`` on PYTHONPATH and
``.peers/peer_shapes.py``). Prints one ``RESULT {json}`` line per mode.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

HEADS = {"small": (8, 64, 128), "standard": (16, 128, 256), "7b": (8, 256, 512)}
DT = jnp.bfloat16
BATCH = 20


def inputs(seed, B, NH, S, DQK, DV):
    """The benchmark's inputs (random, forget gates around sigmoid(3))."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, NH, S, DQK), DT)
    k = jax.random.normal(ks[1], (B, NH, S, DQK), DT)
    v = jax.random.normal(ks[2], (B, NH, S, DV), DT)
    i = jax.random.normal(ks[3], (B, NH, S), DT)
    f = (3.0 + jax.random.normal(ks[4], (B, NH, S))).astype(DT)
    dh = jax.random.normal(ks[5], (B, NH, S, DV), DT)
    return (q, k, v, i, f), dh


def make(impl: str):
    if impl == "ours":
        from xlstm_jax.kernels import get_mlstm_kernel

        kern = get_mlstm_kernel("chunkwise_auto")
        return lambda q, k, v, i, f: kern(q, k, v, i, f)
    if impl == "floor":  # one elementwise XLA kernel on h-sized data: the per-call cost of any jitted call
        return lambda q, k, v, i, f: v * 2
    if impl == "peer":
        sys.path.insert(0, os.path.join(os.getcwd(), ".peers"))
        import peer_shapes  # noqa: PLC0415  (the peer runner, a measurement reference)

        return peer_shapes.make("limit64")
    raise SystemExit(f"small_timers.py: IMPL must be ours or peer; got {impl!r}")


def time_sync(fn, sets, reps=30):
    ts = []
    for j in range(reps):
        a = sets[j % len(sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_pipelined(fn, sets, batches=10):
    ts = []
    for _ in range(batches):
        jax.block_until_ready(fn(*sets[0]))
        t0 = time.perf_counter()
        out = None
        for j in range(BATCH):
            out = fn(*sets[j % len(sets)])
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) * 1e3 / BATCH)
    return statistics.median(ts)


def main(argv):
    if not argv:
        raise SystemExit(__doc__)
    impl = argv[0]
    heads = argv[1] if len(argv) > 1 else "small"
    B, S = (int(x) for x in (argv[2] if len(argv) > 2 else "16,2048").split(","))
    NH, DQK, DV = HEADS[heads]
    fn = make(impl)
    fw = jax.jit(fn)

    def loss(q, k, v, i, f, dh):
        return jnp.sum(fn(q, k, v, i, f).astype(jnp.float32) * dh.astype(jnp.float32))

    fwbw = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    s0, d0 = inputs(0, B, NH, S, DQK, DV)
    s1, d1 = inputs(1, B, NH, S, DQK, DV)
    for mode, f_, sets in (("fw", fw, [s0, s1]), ("fwbw", fwbw, [s0 + (d0,), s1 + (d1,)])):
        for j in range(4):
            jax.block_until_ready(f_(*sets[j % 2]))
        row = dict(impl=impl, heads=heads, B=B, S=S, mode=mode, xla_flags=os.environ.get("XLA_FLAGS", ""),
                   sync_rotated=round(time_sync(f_, sets), 4), sync_same=round(time_sync(f_, sets[:1]), 4),
                   pipelined=round(time_pipelined(f_, sets), 4))
        print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
