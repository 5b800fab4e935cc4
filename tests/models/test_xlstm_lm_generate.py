"""Serving the xLSTM language model: mixed-length batches, per-row EOS and sampling, streaming,
buckets, the unrolled layout and the serving options of the model call.

References: each prompt run alone (no padding) through the same model; float64 where the claim is
exactness (padding leaves the states untouched), float32 at full matmul precision for token-level
comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_lm import (
    Generator,
    init_params,
    prefill,
    preset_config,
    stack_block_params,
    unstack_block_params,
    xLSTMLMConfig,
    xLSTMLMModel,
)
from xlstm_jax.models.xlstm_lm.layers import MultiHeadNorm, RMSNorm
from xlstm_jax.testing import relative_error, to_float64

PROMPT_LENGTHS = (3, 17, 9, 30)  # four rows in a length bucket of 32; alone: buckets of 16 and 32
BACKEND_KWARGS = {"fwbw_stabilized": {"chunk_size": 16}, "triton_kernels": {"chunk_size": 16}, "recurrent": {"use_scan": True}}


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _setup(dtype="float32", backend="fwbw_stabilized", seed=0, **kw):
    cfg = preset_config(
        "tiny", dtype=dtype, param_dtype=dtype, mlstm_backend=backend,
        mlstm_backend_kwargs=BACKEND_KWARGS.get(backend, {}), **kw,
    )
    params = init_params(cfg, jax.random.key(seed))
    if dtype == "float64":
        params = to_float64(params)
    # re-draw the gate biases so that input gates are open enough to matter
    blocks = dict(params["blocks"])
    mlstm = dict(blocks["mlstm"])
    rng = np.random.default_rng(seed)
    for name, center in (("igate", 0.0), ("fgate", 2.0)):
        bias = center + rng.standard_normal(mlstm[name]["bias"].shape)
        mlstm[name] = {**mlstm[name], "bias": jnp.asarray(bias, mlstm[name]["bias"].dtype)}
    blocks["mlstm"] = mlstm
    params = {**params, "blocks": blocks}
    return xLSTMLMModel(cfg), params


@pytest.fixture(scope="module")
def served():
    """(model, params, generator) shared by the token-level tests (its compiled buckets too)."""
    with jax.default_matmul_precision("highest"):
        model, params = _setup()
        yield model, params, Generator(model, params, block_size=4)


def _prompts(seed=1, lengths=PROMPT_LENGTHS, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("backend", ["fwbw_stabilized", "recurrent"])
def test_padded_prefill_equals_each_row_alone_float64(backend, x64):
    """Right padding with pass-through gates: each row's last-position logits and every layer's
    state equal the row's own unpadded prefill (float64: only rounding may differ)."""
    model, params = _setup("float64", backend)
    prompts = _prompts()
    P = 32
    tokens = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
        tokens[b, len(p):] = 7  # padding content must not matter
    lengths = np.array([len(p) for p in prompts], np.int32)
    logits, states = jax.jit(lambda t, n: prefill(model, params, t, n))(tokens, lengths)
    assert logits.shape == (len(prompts), 256)
    alone = jax.jit(lambda t: prefill(model, params, t))
    for b, p in enumerate(prompts):
        ref_logits, ref_states = alone(jnp.asarray(p)[None])
        assert relative_error(logits[b], ref_logits[0, -1]) < 1e-12
        for got, want in zip(states, ref_states):
            assert relative_error(got[:, b], want[:, 0]) < 1e-12


def test_padded_prefill_pallas_backend():
    """The same with the Pallas chunkwise kernels (interpret mode on CPU, compiled on a GPU), float32."""
    model, params = _setup("float32", "triton_kernels")
    prompts = _prompts(lengths=(5, 19))
    tokens = np.zeros((2, 32), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    logits, states = prefill(model, params, jnp.asarray(tokens), jnp.asarray([5, 19]))
    # row 0: 5 tokens, then padding to the end of its chunk and one whole chunk of padding.
    # Interpret mode (CPU) is exact float32; compiled on a GPU each run is within the kernels'
    # float32 tolerance (2e-4, tests/kernels/test_chunkwise_pallas.py) of the truth, so 4e-4 apart.
    tol = 4e-4 if jax.default_backend() == "gpu" else 1e-5
    ref_logits, ref_states = prefill(model, params, jnp.asarray(prompts[0])[None])
    assert relative_error(logits[0], ref_logits[0, -1]) < tol
    for got, want in zip(states, ref_states):
        assert relative_error(got[:, 0], want[:, 0]) < tol


def test_mixed_length_batch_equals_each_row_alone(served):
    """One call for prompts of four lengths: every row's greedy tokens equal the row run alone."""
    model, params, gen = served
    prompts = _prompts()
    batch = gen.generate(prompts, 11)
    assert [len(t) for t in batch] == [11] * len(prompts)
    for p, toks in zip(prompts, batch):
        (alone,) = gen.generate([p], 11)
        np.testing.assert_array_equal(toks, alone)
    # and the tokens are the argmax chain of the full forward over prompt + generated tokens
    p, toks = prompts[2], batch[2]
    seq = np.concatenate([p, toks])
    full = jax.jit(model.apply)({"params": params}, jnp.asarray(seq[:-1])[None])[0]
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full[len(p) - 1:], -1)), toks)


def test_sampling_rows_are_independent(served):
    """With sampling, a row's tokens depend on its seed only, not on its batch mates or position."""
    model, params, gen = served
    prompts = _prompts()
    kw = dict(temperature=0.9, top_k=20)
    batch = gen.generate(prompts, 9, seeds=[40, 41, 42, 43], **kw)
    (alone,) = gen.generate([prompts[2]], 9, seeds=[42], **kw)
    np.testing.assert_array_equal(batch[2], alone)
    reordered = gen.generate([prompts[2], prompts[0]], 9, seeds=[42, 40], **kw)
    np.testing.assert_array_equal(reordered[0], batch[2])
    np.testing.assert_array_equal(reordered[1], batch[0])
    other = gen.generate([prompts[2]], 9, seeds=[7], **kw)[0]
    assert not np.array_equal(other, alone)  # the seed matters (9 draws over 20 tokens)


def test_eos_stops_each_row_and_tokens_stream(served):
    model, params, gen = served
    prompts = _prompts()
    free = gen.generate(prompts, 13, eos_token_id=None)
    eos = int(free[0][5])  # a token row 0 produces: it must stop there
    chunks = []
    stopped = gen.generate(prompts, 13, eos_token_id=eos, on_tokens=lambda row, t: chunks.append((row, t.copy())))
    for row, (f, s) in enumerate(zip(free, stopped)):
        hit = np.flatnonzero(f == eos)
        want = f[: hit[0] + 1] if hit.size else f
        np.testing.assert_array_equal(s, want)
    assert len(stopped[0]) <= 6
    # streamed pieces: the first token alone (prefill), then blocks of at most 4; they add up
    for row in range(len(prompts)):
        pieces = [t for r, t in chunks if r == row]
        assert len(pieces[0]) == 1 and all(len(t) <= 4 for t in pieces[1:])
        np.testing.assert_array_equal(np.concatenate(pieces), stopped[row])
    # the generator form yields lazily, in arrival order
    stream = gen.stream(prompts, 5, eos_token_id=None)
    first = next(stream)
    assert first[0] == 0 and len(first[1]) == 1


def test_one_compile_per_bucket():
    model, params = _setup()
    gen = Generator(model, params, block_size=4)
    gen.generate(_prompts(2, (5, 9)), 6)
    gen.generate(_prompts(3, (12, 3)), 9)  # same batch bucket (2), same length bucket (16)
    assert gen._prefill._cache_size() == 1 and gen._decode._cache_size() == 1
    gen.generate(_prompts(4, (20, 3)), 6)  # length bucket 32: one more prefill, same decode block
    assert gen._prefill._cache_size() == 2 and gen._decode._cache_size() == 1


def test_generator_input_errors(served):
    model, params, gen = served
    for prompts, match in [([], "at least one"), ([[]], "non-empty"), ([[1, 300]], "vocabulary"),
                           ([[1.5, 2.0]], "integer")]:
        with pytest.raises(ValueError, match=match):
            gen.generate(prompts, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate([[1, 2]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        gen.generate([[1, 2]], 3, top_k=-2)
    with pytest.raises(ValueError, match="seeds"):
        gen.generate([[1, 2]], 3, seeds=[1, 2])
    with pytest.raises(ValueError, match="block_size"):
        Generator(model, params, block_size=0)


def test_unrolled_layout_and_serving_options(x64):
    model, params = _setup("float64")
    unrolled = xLSTMLMModel(model.config, unrolled=True)
    pu = unstack_block_params(params)
    assert "blocks" not in pu and "blocks_1" in pu
    jax.tree.map(np.testing.assert_array_equal, stack_block_params(pu), params)
    tokens = jnp.asarray(np.stack(_prompts(5, (12, 12))))
    at = jnp.asarray([3, 11])

    @jax.jit
    def run(params, pu, tokens):
        full = model.apply({"params": params}, tokens)
        full_u = unrolled.apply({"params": pu}, tokens)
        _, states = model.apply({"params": params}, tokens[:, :7], return_last_states=True)
        _, states_u = unrolled.apply({"params": pu}, tokens[:, :7], return_last_states=True)
        step = model.apply({"params": params}, tokens[:, 7:8], states, mode="step")
        step_u = unrolled.apply({"params": pu}, tokens[:, 7:8], states_u, mode="step")
        one = model.apply({"params": params}, tokens, logits_at=at)
        return full, full_u, step, step_u, one, states

    full, full_u, step, step_u, one, states = run(params, pu, tokens)
    assert relative_error(full_u, full) < 1e-13
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(step_u)):
        assert relative_error(a, b) < 1e-13
    # logits at one position per row
    assert one.shape == (2, 1, model.config.vocab_size)
    assert relative_error(one[:, 0], full[jnp.arange(2), at]) < 1e-13
    with pytest.raises(ValueError, match="mask must be a bool array"):
        model.apply({"params": params}, tokens, mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="logits_at"):
        model.apply({"params": params}, tokens, logits_at=jnp.asarray([1.0, 2.0]))
    with pytest.raises(ValueError, match="mask applies"):
        model.apply({"params": params}, tokens[:, :1], states, mode="step", mask=jnp.ones((2, 1), bool))


def test_norms_follow_transformers_rules():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 64)) * 3 + 1
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = x.astype(dtype)
        rms = RMSNorm(dtype=dtype)
        v = rms.init(jax.random.key(1), xd)
        scale = 1 + jax.random.normal(jax.random.key(2), (64,))
        v = {"params": {"scale": scale}}
        xf = xd.astype(jnp.float32)
        want = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(dtype) * scale.astype(dtype)
        np.testing.assert_array_equal(np.asarray(rms.apply(v, xd), np.float32), np.asarray(want, np.float32))
        low = RMSNorm(dtype=dtype, force_float32=False).apply(v, xd)
        want_low = (xd * jax.lax.rsqrt(jnp.mean(xd * xd, -1, keepdims=True) + 1e-6)) * scale.astype(dtype)
        np.testing.assert_array_equal(np.asarray(low, np.float32), np.asarray(want_low, np.float32))
    # per-head layer norm: zero mean and unit variance per head before the scale
    ln = MultiHeadNorm(kind="layernorm")
    y = ln.apply({"params": {"scale": jnp.ones((4 * 64,))}}, x)
    y = np.asarray(y).reshape(2, 3, 4, 64)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)


def test_config_fields_and_legacy_dicts():
    cfg = preset_config("tiny")
    assert cfg.multihead_norm == "layernorm"
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "multihead_norm"}
    assert xLSTMLMConfig.from_dict(legacy).multihead_norm == "rms"  # written before the field existed
    assert xLSTMLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="multihead_norm"):
        cfg.replace(multihead_norm="batchnorm")
    with pytest.raises(ValueError, match="eos_token_id"):
        cfg.replace(eos_token_id=256)
    with pytest.raises(ValueError, match="use_bias must be a bool"):
        cfg.replace(use_bias=1)
    seven = preset_config("7b")
    assert 6.8e9 < seven.num_params() < 7.0e9
    assert (seven.qk_head_dim, seven.v_head_dim, seven.ffn_dim) == (256, 512, 10944)
