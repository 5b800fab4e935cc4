"""Helpers shared by the tests, ``xlstm-jax check`` and the benchmark: inputs and error measures.

NaN never passes: ``relative_error`` returns +inf when either side has a NaN (or an infinity the
other side does not have at the same place), so ``err < tol``, ``max(errors) < tol`` and
``not err > tol`` all fail; ``assert_close`` / ``assert_trees_close`` compare every leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 on the host (abs error if ref is 0).

    +inf if either has a NaN, or an infinity that the other does not have (same place, same sign):
    a non-finite result can never pass a comparison with a tolerance. Equal infinities are excluded
    from the norms.
    """
    out = np.asarray(jax.device_get(out), dtype=np.float64)
    ref = np.asarray(jax.device_get(ref), dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {out.shape} vs ref {ref.shape}")
    if np.isnan(out).any() or np.isnan(ref).any():
        return float("inf")
    inf_out, inf_ref = np.isinf(out), np.isinf(ref)
    if (inf_out != inf_ref).any() or (out[inf_out] != ref[inf_ref]).any():
        return float("inf")
    finite = ~inf_ref
    den = np.linalg.norm(ref[finite])
    num = np.linalg.norm(out[finite] - ref[finite])
    return float(num / den) if den > 0 else float(num)


def assert_close(out, ref, tol: float, what: str = "value") -> float:
    """Assert ``relative_error(out, ref) < tol`` (NaN fails); return the error."""
    err = relative_error(out, ref)
    if not err < tol:
        raise AssertionError(f"{what}: relative error {err:.3e} (tolerance {tol:g})")
    return err


def assert_trees_close(outs, refs, tol: float, what: str = "tree") -> dict:
    """``assert_close`` on every leaf of two pytrees of the same structure (None leaves must match).

    Fails listing every leaf above ``tol`` (a NaN in any leaf fails); returns {path: error}.
    """
    flat_out, tree_out = jax.tree_util.tree_flatten_with_path(outs, is_leaf=lambda x: x is None)
    flat_ref, tree_ref = jax.tree_util.tree_flatten_with_path(refs, is_leaf=lambda x: x is None)
    if tree_out != tree_ref:
        raise AssertionError(f"{what}: tree structures differ: {tree_out} vs {tree_ref}")
    errors, bad = {}, {}
    for (path, a), (_, b) in zip(flat_out, flat_ref):
        name = jax.tree_util.keystr(path)
        if a is None or b is None:
            if (a is None) != (b is None):
                bad[name] = "None vs array"
            continue
        errors[name] = relative_error(a, b)
        if not errors[name] < tol:
            bad[name] = errors[name]
    if bad:
        raise AssertionError(f"{what}: relative errors above {tol:g}: {bad}")
    return errors


def mlstm_inputs(
    key,
    B: int,
    NH: int,
    S: int,
    DHQK: int,
    DHV: int,
    *,
    dtype=jnp.float32,
    i_offset: float = 0.0,
    f_offset: float = 3.0,
    gate_scale: float = 1.0,
    initial_states: bool = False,
    m_initial_scale: float = 1.0,
):
    """Random mLSTM inputs ``(q, k, v, i, f, c0, n0, m0)`` (states None unless ``initial_states``).

    Gates: ``i = i_offset + gate_scale * N(0,1)``, ``f = f_offset + gate_scale * N(0,1)``; states in
    float32 (float64 if ``dtype`` is float64), m0 scaled by ``m_initial_scale``.
    """
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], (B, NH, S, DHQK), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, NH, S, DHQK), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, NH, S, DHV), jnp.float32).astype(dtype)
    i = (i_offset + gate_scale * jax.random.normal(ks[3], (B, NH, S), jnp.float32)).astype(dtype)
    f = (f_offset + gate_scale * jax.random.normal(ks[4], (B, NH, S), jnp.float32)).astype(dtype)
    if not initial_states:
        return q, k, v, i, f, None, None, None
    sdt = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
    c0 = jax.random.normal(ks[5], (B, NH, DHQK, DHV), sdt)
    n0 = jax.random.normal(ks[6], (B, NH, DHQK), sdt)
    m0 = m_initial_scale * jax.random.normal(ks[7], (B, NH), sdt)
    return q, k, v, i, f, c0, n0, m0


def to_float64(tree):
    """Cast every floating array of a pytree to float64 (needs ``jax_enable_x64``)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


GRAD_NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")


def random_cotangents(key, h_shape, states, dtype=jnp.float32):
    """Random cotangents for h and the last states (C, n, m), for ``outputs_and_grads``."""
    ks = jax.random.split(key, 4)
    dh = jax.random.normal(ks[0], h_shape, jnp.float32).astype(dtype)
    dC, dn, dm = (
        jax.random.normal(kk, s.shape, jnp.float32).astype(dtype) for kk, s in zip(ks[1:], states)
    )
    return dh, dC, dn, dm


def outputs_and_grads(kernel, inputs, cotangents, **call_options):
    """Run ``kernel`` (registry signature) with last states; return outputs and all gradients.

    ``inputs`` = (q, k, v, i, f, c0, n0, m0) (states may be None: then no state gradients);
    ``cotangents`` = (dh, dC, dn, dm). The loss is ``sum(h*dh) + sum(C*dC) + sum(n*dn) + sum(m*dm)``
    in float32 (float64 for float64 inputs). Returns ``(outs, grads)``: outs = {"h", "C", "n", "m"},
    grads = {name: gradient} for q, k, v, i, f and (if given) c0, n0, m0.
    """
    q, k, v, i, f, c0, n0, m0 = inputs
    args = (q, k, v, i, f) + ((c0, n0, m0) if c0 is not None else ())
    return outputs_and_grads_of(
        lambda *a: kernel(*a, return_last_states=True, **call_options), args, cotangents
    )


def outputs_and_grads_of(fn, args, cotangents):
    """``outputs_and_grads`` for any ``fn(*args) -> (h, (C, n, m))`` (a reference written for a
    test, a kernel with its options bound): the same loss, gradients of every argument, named
    q, k, v, i, f, c0, n0, m0 in order."""
    dh, dC, dn, dm = cotangents

    def loss(*a):
        h, (C, N, M) = fn(*a)
        acc = jnp.promote_types(h.dtype, jnp.float32)
        total = (
            jnp.sum(h.astype(acc) * dh.astype(acc))
            + jnp.sum(C.astype(acc) * dC.astype(acc))
            + jnp.sum(N.astype(acc) * dn.astype(acc))
            + jnp.sum(M.astype(acc) * dm.astype(acc))
        )
        return total, {"h": h, "C": C, "n": N, "m": M}

    grad_fn = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)
    grads, outs = grad_fn(*args)
    return outs, dict(zip(GRAD_NAMES, grads))
