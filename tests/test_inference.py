"""Inference API: prefill + decode equals the chunkwise kernel over the whole sequence.

Single layers and a small stack, with the pure-JAX and the Pallas step kernels (interpret mode on CPU,
compiled on an NVIDIA GPU), against the float64 recurrent reference too; and the model-agnostic
serving helpers (pass-through gates, per-row sampling, buckets, the streaming loop).
"""

import jax
import jax.numpy as jnp
import numpy as np
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


# ------------------------------------------------------------------ serving helpers (generation.py)
from xlstm_jax.inference import (  # noqa: E402
    PASS_THROUGH_GATES,
    bucket,
    mask_gates,
    pad_prompts,
    sample_rows,
    stream_tokens,
)


@pytest.mark.parametrize("kernel", ["chunkwise_native", "recurrent_native"])
def test_masked_positions_leave_the_state_untouched(x64, kernel):
    """Gates set to PASS_THROUGH_GATES anywhere in a sequence: h at the other positions and the
    last states equal the sequence with those positions removed (float64)."""
    B, NH, S, DHQK, DHV = 2, 2, 24, 8, 16
    q, k, v, i, f, *_ = to_float64(mlstm_inputs(jax.random.PRNGKey(21), B, NH, S, DHQK, DHV))
    rng = np.random.default_rng(0)  # 14 of 24 positions per row (one reference shape), the first kept
    keep = np.zeros((B, S), bool)
    for b in range(B):
        keep[b, np.concatenate([[0], 1 + rng.permutation(S - 1)[:13]])] = True
    keep = jnp.asarray(keep)
    im, fm = mask_gates(i, f, keep)
    opts = dict(chunk_size=8) if kernel == "chunkwise_native" else {}
    fn = get_mlstm_kernel(kernel, **opts)
    h, last = fn(q, k, v, im, fm, return_last_states=True)
    for b in range(B):
        idx = np.flatnonzero(np.asarray(keep[b]))
        sub = [x[b:b + 1, :, idx] for x in (q, k, v, i, f)]
        h_ref, last_ref = fn(*sub, return_last_states=True)
        assert relative_error(h[b:b + 1, :, idx], h_ref) < 1e-12
        for a, r in zip(last, last_ref):
            assert relative_error(a[b:b + 1], r) < 1e-12
    assert PASS_THROUGH_GATES == (-1e30, 1e30)
    with pytest.raises(ValueError, match="mask must be bool"):
        mask_gates(i, f, keep.astype(jnp.int32))
    # float16 gates cannot hold 1e30: the largest finite value is used
    i16, f16 = mask_gates(i.astype(jnp.float16), f.astype(jnp.float16), keep)
    assert bool(jnp.isfinite(i16).all() and jnp.isfinite(f16).all())


def test_sample_rows_draws_per_row():
    logits = jax.random.normal(jax.random.PRNGKey(5), (4, 50)) * 2
    seeds = jnp.asarray([7, 8, 9, 10], jnp.uint32)
    full = np.asarray(sample_rows(logits, seeds, 3, 1.0, 10))
    for b in range(4):  # the row alone, or in another position of another batch: the same draw
        alone = sample_rows(logits[b:b + 1], seeds[b:b + 1], 3, 1.0, 10)
        assert int(alone[0]) == full[b]
    swapped = np.asarray(sample_rows(logits[::-1], seeds[::-1], 3, 1.0, 10))
    np.testing.assert_array_equal(swapped[::-1], full)
    top = np.asarray(jax.lax.top_k(logits, 10)[1])
    draws = np.stack([np.asarray(sample_rows(logits, seeds, t, 1.0, 10)) for t in range(60)])
    for b in range(4):
        assert set(draws[:, b]) <= set(top[b]) and len(set(draws[:, b])) > 1
    np.testing.assert_array_equal(np.asarray(sample_rows(logits, seeds, 0, 0.0, 0)), np.asarray(jnp.argmax(logits, -1)))


def test_buckets_and_padding():
    assert [bucket(n, 16) for n in (1, 16, 17, 1000)] == [16, 16, 32, 1024]
    assert [bucket(n) for n in (1, 3, 4, 5)] == [1, 4, 4, 8]
    with pytest.raises(ValueError, match="positive int"):
        bucket(0)
    tokens, lengths = pad_prompts([[5, 6, 7], [8]], length=4, batch=3, pad_token_id=1)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 1], [8, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(lengths, [3, 1, 1])
    with pytest.raises(ValueError, match="do not fit"):
        pad_prompts([[1]] * 3, length=4, batch=2)
    with pytest.raises(ValueError, match="tokens > length"):
        pad_prompts([[1] * 5], length=4, batch=1)


def test_stream_tokens_bookkeeping():
    """A fake model whose row b emits b*100 + t at step t: blocks, EOS per row, max_new_tokens."""
    calls = []

    def prefill_fn(tokens, lengths, seeds):
        calls.append(("prefill", tokens.shape))
        B = tokens.shape[0]
        return 1, jnp.arange(B, dtype=jnp.int32) * 100

    def decode_fn(t):
        calls.append(("decode", t))
        return t + 3, jnp.asarray([[b * 100 + t + j for j in range(3)] for b in range(4)], jnp.int32)

    prompts = [np.arange(n) for n in (2, 20, 5)]
    got = {}
    for row, toks in stream_tokens(prefill_fn, decode_fn, prompts, max_new_tokens=8, block_size=3, eos_token_id=204):
        got.setdefault(row, []).extend(toks.tolist())
    assert calls[0] == ("prefill", (4, 32))  # batch bucket 4, length bucket 32
    assert got[0] == list(range(8)) and got[1] == list(range(100, 108))
    assert got[2] == [200, 201, 202, 203, 204]  # stopped at EOS, included
    assert sum(1 for c in calls if c[0] == "decode") == 3  # ceil(7 / 3) blocks
    got1 = list(stream_tokens(prefill_fn, decode_fn, prompts[:1], max_new_tokens=1, block_size=3))
    assert len(got1) == 1 and got1[0][1].tolist() == [0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream_tokens(prefill_fn, decode_fn, prompts, max_new_tokens=0, block_size=3))
