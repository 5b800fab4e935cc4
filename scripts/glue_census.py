"""Count the XLA equations outside the Pallas kernels of ``chunkwise_pallas`` (fw and fwbw).

Traces (``jax.make_jaxpr``, no compilation, runs on a CPU) the forward pass and ``jax.grad`` of
sum(h * dh) of ``chunkwise_pallas`` with ``interpret=False``, so that every kernel stays one
``pallas_call``, and prints per mode the number of ``pallas_call``s, the number of other equations
(nested jaxprs walked), their counts by primitive, and the largest ones by bytes in + out. bf16
inputs, exact gradients, ``recompute_states_in_bw=False`` (the shipped tuned tables' choice);
kernel options as KEY=VALUE (``true`` / ``false`` for booleans). Example (the small row):

    python scripts/glue_census.py --shape 16,8,2048,64,128 gates_impl=fused gate_grads_impl=fused

The counts are of jaxpr equations, not of GPU kernels: XLA fuses chains of them (docs/benchmarks.md,
"The XLA glue around the Pallas kernels, and four options against it").
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from xlstm_jax.kernels.mlstm_chunkwise.pallas import mlstm_chunkwise_pallas


def _option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"kernel option must be KEY=VALUE; got {text!r}")
    key, value = text.split("=", 1)
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, value


def _shape(text: str):
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 5 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be B,NH,S,DHQK,DHV (positive ints); got {text!r}")
    return vals


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _nbytes(eqn) -> int:
    total = 0
    for x in list(eqn.invars) + list(eqn.outvars):
        aval = getattr(x, "aval", None)
        if aval is not None and hasattr(aval, "shape"):
            total += int(np.prod(aval.shape)) * aval.dtype.itemsize
    return total


def census(jaxpr, rows: list) -> None:
    """Append (primitive, bytes in + out, equation) for every equation, ``pallas_call``s as
    ("pallas_call", 0, eqn); nested jaxprs (pjit, custom_jvp, ...) are walked, loops are not."""
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "pallas_call":
            rows.append((name, 0, e))
            continue
        subs = list(_subjaxprs(e))
        if subs and name not in ("while", "cond", "scan"):
            for s in subs:
                census(s, rows)
            continue
        rows.append((name, _nbytes(e), e))


def main(argv=None) -> None:
    """Print the census of fw and fwbw for one shape and set of kernel options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=_shape, default=(16, 8, 2048, 64, 128), help="B,NH,S,DHQK,DHV")
    p.add_argument("--top", type=int, default=10, help="largest equations listed per mode")
    p.add_argument("options", nargs="*", type=_option, help="kernel options KEY=VALUE")
    args = p.parse_args(argv)
    B, NH, S, DHQK, DHV = args.shape
    opts = dict(args.options)
    opts.setdefault("recompute_states_in_bw", False)
    bf = jnp.bfloat16
    qk = jax.ShapeDtypeStruct((B, NH, S, DHQK), bf)
    v = jax.ShapeDtypeStruct((B, NH, S, DHV), bf)
    g = jax.ShapeDtypeStruct((B, NH, S), bf)

    def fw(q, k, v, i, f, dh):
        return mlstm_chunkwise_pallas(q, k, v, i, f, interpret=False, **opts)

    def loss(q, k, v, i, f, dh):
        return jnp.sum(fw(q, k, v, i, f, dh).astype(jnp.float32) * dh.astype(jnp.float32))

    print(f"shape B={B} NH={NH} S={S} DHQK={DHQK} DHV={DHV} bf16, options {opts}")
    for mode, fn in (("fw", fw), ("fwbw", jax.grad(loss, argnums=(0, 1, 2, 3, 4)))):
        rows: list = []
        census(jax.make_jaxpr(fn)(qk, qk, v, g, g, v).jaxpr, rows)
        glue = [r for r in rows if r[0] != "pallas_call"]
        names = [str(r[2].params.get("name", "")) for r in rows if r[0] == "pallas_call"]
        by = collections.Counter(r[0] for r in glue)
        print(f"== {mode}: {len(rows) - len(glue)} pallas_calls ({', '.join(names)}), {len(glue)} other equations")
        print("   " + ", ".join(f"{n} {c}" for n, c in by.most_common()))
        for name, nbytes, e in sorted(glue, key=lambda r: -r[1])[: args.top]:
            outs = ",".join(f"{x.aval.dtype}{list(x.aval.shape)}" for x in e.outvars)
            print(f"   {name:22s} {nbytes / 1e6:9.2f} MB in+out -> {outs}")


if __name__ == "__main__":
    main()
