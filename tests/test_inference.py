"""Inference API: prefill + decode equals the chunkwise kernel over the whole sequence.

Single layers and a small stack, with the pure-JAX and the Pallas step kernels (interpret mode on CPU,
compiled on an NVIDIA GPU), against the float64 recurrent reference too.
"""

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax.inference import (
    CellOptions,
    cast_state,
    decode_loop,
    decode_sequence,
    decode_step,
    default_prefill_kernel,
    init_stack_state,
    init_state,
    prefill,
    stack_decode_step,
    stack_prefill,
)
from xlstm_jax.kernels import get_mlstm_kernel
from xlstm_jax.kernels.mlstm_recurrent.native import mlstm_recurrent_sequence
from xlstm_jax.testing import mlstm_inputs, relative_error, to_float64

F32_TOL = 1e-5
BF16_TOL = 2e-2
PREFILL = dict(kernel="chunkwise_native", kernel_options=dict(chunk_size=8))


@pytest.fixture
def x64():
    """float64 available for the references; float32 matrix products in full precision (on GPUs XLA's
    default is TF32, ~5e-4 relative, which would blur the prefill/decode comparison)."""
    old = jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_enable_x64", old[0])
    jax.config.update("jax_default_matmul_precision", old[1])


def _split(x, P):
    return x[:, :, :P], x[:, :, P:]


@pytest.mark.parametrize(
    "step_kernel,P,initial,opts",
    [
        ("recurrent_native", 13, False, CellOptions()),
        ("recurrent_pallas", 13, True, CellOptions()),
        ("recurrent_pallas", 1, False, CellOptions(norm_val=2.0, eps=1e-5)),
    ],
    ids=["native-P13", "pallas-P13-initial", "pallas-P1-normval"],
)
def test_prefill_then_decode_equals_full_chunkwise(x64, step_kernel, P, initial, opts):
    B, NH, S, DHQK, DHV = 2, 2, 20, 16, 32
    inputs = mlstm_inputs(jax.random.PRNGKey(P), B, NH, S, DHQK, DHV, initial_states=initial, m_initial_scale=8.0)
    q, k, v, i, f, c0, n0, m0 = inputs
    state0 = None if c0 is None else init_state(B, NH, DHQK, DHV)._replace(matC=c0, vecN=n0, scaM=m0)
    full = get_mlstm_kernel("chunkwise_native", chunk_size=8)
    h_full, last_full = full(q, k, v, i, f, c0, n0, m0, return_last_states=True, **opts.as_kwargs())

    first, rest = zip(*(_split(x, P) for x in (q, k, v, i, f)))
    run = jax.jit(lambda first, rest, st: _prefill_decode(first, rest, st, step_kernel, opts))
    h, last = run(first, rest, state0)
    assert h.shape == h_full.shape and h.dtype == q.dtype
    assert relative_error(h, h_full) < F32_TOL
    for a, b in zip(last, last_full):
        assert relative_error(a, b) < F32_TOL
    # and both agree with the float64 recurrent reference
    q64, k64, v64, i64, f64, c64, n64, m64 = to_float64(inputs)
    h_ref = mlstm_recurrent_sequence(q64, k64, v64, i64, f64, c64, n64, m64, **opts.as_kwargs())
    assert relative_error(h, h_ref) < F32_TOL


def _prefill_decode(first, rest, state0, step_kernel, opts):
    h1, st = prefill(*first, state0, options=opts, **PREFILL)
    h2, st = decode_sequence(st, *rest, step_kernel=step_kernel, options=opts)
    return jnp.concatenate([h1, h2], axis=2), st


def test_bf16_decode_states(x64):
    B, NH, S, P, DHQK, DHV = 1, 2, 16, 6, 32, 32
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(11), B, NH, S, DHQK, DHV)
    first, rest = zip(*(_split(x, P) for x in (q, k, v, i, f)))
    h1, st = prefill(*first, **PREFILL, state_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in st)
    h2, st = jax.jit(lambda st, xs: decode_sequence(st, *xs, step_kernel="recurrent_pallas"))(st, rest)
    assert all(x.dtype == jnp.bfloat16 for x in st) and h2.dtype == q.dtype
    h_ref = mlstm_recurrent_sequence(*to_float64((q, k, v, i, f)))
    assert relative_error(jnp.concatenate([h1, h2], axis=2), h_ref) < BF16_TOL


def _toy_stack(key, num_layers, D, NH, DHQK, DHV):
    """Layers (in_fn, out_fn) with random projections; x has shape (B, S, D)."""
    layers = []
    for key_l in jax.random.split(key, num_layers):
        kq, kk, kv, kg, ko = jax.random.split(key_l, 5)
        Wq = jax.random.normal(kq, (D, NH, DHQK)) / D**0.5
        Wk = jax.random.normal(kk, (D, NH, DHQK)) / D**0.5
        Wv = jax.random.normal(kv, (D, NH, DHV)) / D**0.5
        Wg = jax.random.normal(kg, (D, 2, NH)) / D**0.5
        Wo = jax.random.normal(ko, (NH, DHV, D)) / (NH * DHV) ** 0.5

        def in_fn(x, Wq=Wq, Wk=Wk, Wv=Wv, Wg=Wg):
            q, k, v = (jnp.einsum("bsd,dhe->bhse", x, W) for W in (Wq, Wk, Wv))
            g = jnp.einsum("bsd,dgh->gbhs", x, Wg)
            return q, k, v, g[0], g[1] + 2.0

        def out_fn(x, h, Wo=Wo):
            return x + jnp.tanh(jnp.einsum("bhse,hed->bsd", h, Wo))

        layers.append((in_fn, out_fn))
    return layers


def test_stack_prefill_then_decode_equals_full_prefill(x64):
    B, S, P, D, NH, DHQK, DHV = 2, 12, 5, 24, 2, 16, 32
    layers = _toy_stack(jax.random.PRNGKey(0), 2, D, NH, DHQK, DHV)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, S, D))
    y_full, states_full = stack_prefill(layers, x, **PREFILL)

    @jax.jit
    def run(x):
        y1, states = stack_prefill(layers, x[:, :P], **PREFILL)

        def body(states, x_t):
            y_t, states = stack_decode_step(layers, x_t[:, None], states, step_kernel="recurrent_pallas")
            return states, y_t[:, 0]

        states, ys = jax.lax.scan(body, states, jnp.moveaxis(x[:, P:], 1, 0))
        return jnp.concatenate([y1, jnp.moveaxis(ys, 0, 1)], axis=1), states

    y, states = run(x)
    assert relative_error(y, y_full) < F32_TOL
    for st, st_full in zip(states, states_full):
        for a, b in zip(st, st_full):
            assert relative_error(a, b) < F32_TOL


def test_autoregressive_decode_loop_matches_prefill_of_generated_sequence(x64):
    """Feed each output back as the next input; prefilling the resulting sequence gives the same outputs."""
    B, P, T, D, NH, DHQK, DHV = 1, 4, 6, 16, 2, 16, 16
    layers = _toy_stack(jax.random.PRNGKey(2), 2, D, NH, DHQK, DHV)
    prompt = jax.random.normal(jax.random.PRNGKey(3), (B, P, D))

    @jax.jit
    def generate(prompt):
        y, states = stack_prefill(layers, prompt, **PREFILL)

        def step(carry):
            states, x_t = carry
            y_t, states = stack_decode_step(layers, x_t, states, step_kernel="recurrent_native")
            return (states, y_t), y_t[:, 0]

        _, ys = decode_loop(step, (states, y[:, -1:]), T)
        return y[:, -1], jnp.moveaxis(ys, 0, 1)  # the first fed-back input, and T outputs

    y_last, ys = generate(prompt)
    seq = jnp.concatenate([prompt, y_last[:, None], ys[:, :-1]], axis=1)  # the inputs the loop saw
    y_seq, _ = stack_prefill(layers, seq, **PREFILL)
    assert relative_error(ys, y_seq[:, P:]) < F32_TOL


def test_helpers_and_errors():
    assert default_prefill_kernel() in ("chunkwise_native", "chunkwise_pallas")
    if jax.default_backend() != "gpu":
        assert default_prefill_kernel() == "chunkwise_native"
    states = init_stack_state(3, 2, 2, 8, 16, dtype=jnp.bfloat16)
    assert len(states) == 3 and states[0].matC.shape == (2, 2, 8, 16) and states[0].scaM.dtype == jnp.bfloat16
    assert cast_state(states[0], jnp.float32).vecN.dtype == jnp.float32
    st = init_state(1, 1, 8, 8)
    q = jnp.ones((1, 1, 8))
    g = jnp.ones((1, 1))
    with pytest.raises(ValueError, match="shape"):
        decode_step(st, q[None], q, q, g, g)
    with pytest.raises(ValueError, match="gate i"):
        decode_step(st, q, q, q, jnp.ones((1, 2)), g)
    with pytest.raises(ValueError, match="unknown mLSTM step kernel"):
        decode_step(st, q, q, q, g, g, step_kernel="nope")
    with pytest.raises(ValueError, match="num_steps"):
        decode_loop(lambda c: (c, c), 0, -1)
    with pytest.raises(ValueError, match="num_layers"):
        init_stack_state(0, 1, 1, 8, 8)
    layers = _toy_stack(jax.random.PRNGKey(0), 2, 8, 1, 8, 8)
    with pytest.raises(ValueError, match="2 layers but 1 states"):
        stack_decode_step(layers, jnp.ones((1, 1, 8)), (st,))
    with pytest.raises(ValueError, match=r"\(B, NH, 1, DHQK\)"):
        stack_decode_step(layers, jnp.ones((1, 2, 8)), (st, st))
