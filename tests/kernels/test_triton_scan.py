"""``pallas._triton.associative_scan`` (``tt.scan`` inside a Pallas Triton kernel) against
``jax.lax.associative_scan``: interpret mode on CPU, compiled on the GPU machine, and the CUDA
lowering (Triton IR) built on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from xlstm_jax.kernels.pallas import _triton

N, R = 128, 4


def _maxplus(earlier, later):  # not commutative: the order of the operands matters
    (a1, b1), (a2, b2) = earlier, later
    return a1 + a2, jnp.maximum(b1 + a2, b2)


def _restart(earlier, later):  # (value, flag): a sum restarting at flagged steps
    (v1, f1), (v2, f2) = earlier, later
    return jnp.where(f2 != 0, v2, v1 + v2), jnp.maximum(f1, f2)


def _affine_reverse(right, left):  # reverse order of jax.lax.associative_scan: the later part first
    (a_r, x_r), (a_l, x_l) = right, left
    return a_l * a_r, x_l + a_l * x_r


def _kernel(a_ref, b_ref, f_ref, oa_ref, ob_ref, ov_ref, orev_ref, omax_ref, oaff_ref):
    a, b, flags = a_ref[...], b_ref[...], f_ref[...]
    oa_ref[...], ob_ref[...] = _triton.associative_scan(_maxplus, (a, b))
    ov_ref[...] = _triton.associative_scan(_restart, (a, flags))[0]
    orev_ref[...] = _triton.associative_scan(lambda x, y: (x[0] + y[0],), (a,), reverse=True)[0]
    omax_ref[...] = _triton.associative_scan(lambda x, y: (jnp.maximum(x[0], y[0]),), (flags * 3 - 1,))[0]
    # a reverse scan that is not commutative: y_t = b_t + a'_t y_{t+1} with a' = exp(a) in (0, 1]
    oaff_ref[...] = _triton.associative_scan(_affine_reverse, (jnp.exp(a), b), reverse=True)[1]


def _call(a, b, flags, interpret):
    spec = pl.BlockSpec((None, N), lambda r: (r, 0))
    f32 = jax.ShapeDtypeStruct((R, N), jnp.float32)
    i32 = jax.ShapeDtypeStruct((R, N), jnp.int32)
    return pl.pallas_call(
        _kernel, grid=(R,), in_specs=[spec] * 3, out_specs=[spec] * 6, out_shape=[f32, f32, f32, f32, i32, f32],
        compiler_params=_triton.compiler_params(num_warps=4, num_stages=1), interpret=interpret,
    )(a, b, flags)


def _inputs():
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    a = -jnp.abs(jax.random.normal(ks[0], (R, N), jnp.float32))
    b = 3.0 * jax.random.normal(ks[1], (R, N), jnp.float32)
    flags = (jax.random.uniform(ks[2], (R, N)) < 0.1).astype(jnp.int32)
    return a.at[1, 7].set(-jnp.inf), b.at[2, 9].set(-jnp.inf), flags


def _want(a, b, flags):
    A, B = jax.lax.associative_scan(_maxplus, (a, b), axis=1)
    V = jax.lax.associative_scan(_restart, (a, flags), axis=1)[0]
    rev = jnp.cumsum(a[:, ::-1], axis=1)[:, ::-1]
    mx = jax.lax.cummax(flags * 3 - 1, axis=1)
    ea = np.exp(np.asarray(a, np.float64))
    bb = np.asarray(b, np.float64)
    aff = np.zeros_like(bb)
    for t in range(N - 1, -1, -1):  # the recurrence itself, step by step
        nxt = aff[:, t + 1] if t + 1 < N else 0.0
        aff[:, t] = bb[:, t] + ea[:, t] * nxt
    return A, B, V, rev, mx, aff


def test_scans_match_lax_associative_scan():
    """Compiled on a GPU, interpreted elsewhere: the (max, +) pair scan, the restarting sum, a
    reverse sum and a cumulative max, against the XLA scans."""
    a, b, flags = _inputs()
    got = jax.jit(lambda *x: _call(*x, interpret=_triton.default_interpret(None)))(a, b, flags)
    for g, w, name in zip(got, _want(a, b, flags), ("A", "B", "restart", "reverse", "cummax", "affine-reverse")):
        g, w = np.asarray(g), np.asarray(w)
        np.testing.assert_array_equal(np.isinf(g), np.isinf(w), err_msg=name)
        fin = np.isfinite(w)
        np.testing.assert_allclose(g[fin], w[fin], rtol=1e-5, atol=1e-5, err_msg=name)


def test_scan_lowers_to_triton_ir_on_cpu():
    """The CUDA lowering of the kernel (the Triton IR of the scans) is built without a GPU."""
    a, b, flags = _inputs()
    lowered = jax.jit(lambda *x: _call(*x, interpret=False)).trace(a, b, flags).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_scan_input_errors():
    with pytest.raises(ValueError, match="at least one"):
        _triton.associative_scan(_maxplus, ())
    with pytest.raises(ValueError, match="one non-scalar shape"):
        _triton.associative_scan(_maxplus, (jnp.zeros(4), jnp.zeros(5)))


def test_in_kernel_gates_lower_to_triton_ir_on_cpu():
    """The recurrent kernel with the gates inside (``gates_impl="kernel"``) and the scanned gate
    gradients (``gate_grads_impl="kernel"``), forward and gradients at
    the small heads, lowers for CUDA without a GPU (every scan, the guarded stores of the gate
    vectors, the scalar extractions)."""
    from xlstm_jax.kernels.mlstm_chunkwise.pallas import mlstm_chunkwise_pallas
    from xlstm_jax.testing import mlstm_inputs

    q, k, v, i, f = mlstm_inputs(jax.random.PRNGKey(0), 1, 2, 512, 64, 128, dtype=jnp.bfloat16)[:5]

    def fn(*a):
        return mlstm_chunkwise_pallas(*a, gates_impl="kernel", gate_grads_impl="kernel", recompute_states_in_bw=False,
                                      interpret=False)

    grad = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4))
    text = jax.jit(grad).trace(q, k, v, i, f).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 7
    assert "mlstm_chunkwise_recurrent_fw_gated" in text and "mlstm_chunkwise_gate_gradients_scanned" in text
