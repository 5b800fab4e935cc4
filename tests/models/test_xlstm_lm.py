"""The xLSTM language model: config checks, backends agree, prefill + decode equals the full forward.

References are the same model in float64 with the literal recurrent backend; inputs and parameters
are fresh random draws. Relative errors ||out - ref|| / ||ref||.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import available_mlstm_step_kernels
from xlstm_jax.models.xlstm_lm import (
    decode_step,
    generate,
    init_params,
    prefill,
    preset_config,
    sample_logits,
    xLSTMLMConfig,
    xLSTMLMModel,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import available_mlstm_backends
from xlstm_jax.testing import relative_error, to_float64

from ._util import assert_tree_below

# Tiny model: DHQK = 8 != DHV = 16, two heads, two blocks. S = 40 is not a multiple of the chunk size 16.
B, S = 2, 40
# Per-backend options for the test: small chunks (several chunks and a partial one), scan loops.
BACKEND_KWARGS = {
    "fwbw_stabilized": {"chunk_size": 16},
    "recurrent": {"use_scan": True},
    "recurrent_triton": {"use_scan": True},
}
# Backends with a backward pass (the others are forward-only, for inference).
TRAINABLE = {"parallel_stabilized", "fwbw_stabilized", "recurrent", "triton_kernels"}


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def test_assert_tree_below_fails_on_nan():
    with pytest.raises(AssertionError):
        assert_tree_below({"a": 0.0, "b": float("nan")}, 1.0)
    with pytest.raises(AssertionError):
        assert_tree_below({"a": float("nan"), "b": 0.0}, 1.0)
    assert_tree_below({"a": 0.0, "b": 0.5}, 1.0)


def _config(backend="fwbw_stabilized", dtype="float32", **kw):
    return preset_config(
        "tiny", mlstm_backend=backend, mlstm_backend_kwargs=BACKEND_KWARGS.get(backend, {}),
        dtype=dtype, param_dtype=dtype, **{"context_length": 64, **kw},
    )


def _tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256, dtype=jnp.int32)


def _loss_and_grads(config, params, tokens):
    model = xLSTMLMModel(config)

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, logits, grads


def test_config_checks_and_parameter_count():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        xLSTMLMConfig(embedding_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="dtype"):
        xLSTMLMConfig(dtype="int8")
    with pytest.raises(ValueError, match="unknown xLSTMLMConfig"):
        xLSTMLMConfig.from_dict({"embeding_dim": 3})
    with pytest.raises(ValueError, match="unknown xLSTMLMConfig"):
        preset_config("tiny", num_head=3)
    cfg = _config(tie_embeddings=True, use_bias=True)  # the non-default paths
    assert xLSTMLMConfig.from_dict(cfg.to_dict()) == cfg
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == cfg.num_params()
    assert preset_config("350m").num_params() >= 350e6
    with pytest.raises(ValueError, match="unknown mLSTM backend"):
        xLSTMLMModel(_config().replace(mlstm_backend="nope")).init(jax.random.key(0), _tokens(0, (1, 4)))


@functools.lru_cache(maxsize=1)
def _reference():
    """(tokens, float64 params, loss, logits, grads) of the float64 recurrent reference (host arrays);
    called under the ``x64`` fixture."""
    assert jax.config.jax_enable_x64, "call under the x64 fixture"
    tokens = _tokens(1, (B, S + 1))
    params64 = to_float64(init_params(_config(), jax.random.key(2)))
    out = _loss_and_grads(_config("recurrent", "float64"), params64, tokens)
    return jax.device_get((tokens, params64) + tuple(out))


@pytest.mark.parametrize("backend", available_mlstm_backends())
def test_backends_agree_with_float64_reference(backend, x64):
    """Switching the backend changes speed, never results: logits (all backends), loss and every
    parameter gradient (backends with a backward pass) match the float64 recurrent reference.
    The parallel backend runs with ``remat=True`` (blocks recomputed in the backward pass)."""
    tokens, params64, loss_ref, logits_ref, grads_ref = _reference()
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    cfg = _config(backend, remat=backend == "parallel_stabilized")
    if backend in TRAINABLE:
        loss, logits, grads = _loss_and_grads(cfg, params32, jnp.asarray(tokens))
        assert relative_error(loss, loss_ref) < 1e-5
        errs = jax.tree.map(relative_error, grads, grads_ref)
        assert_tree_below(errs, 5e-5)
    else:
        logits = jax.jit(xLSTMLMModel(cfg).apply)({"params": params32}, tokens[:, :-1])
    assert relative_error(logits, logits_ref) < 1e-5


@pytest.mark.parametrize("step_kernel", available_mlstm_step_kernels())
def test_prefill_then_decode_equals_full_forward(step_kernel, x64):
    """Prompt prefill with the chunkwise backend (last states), then one token at a time with the
    step kernel: the logits equal the full-sequence forward's, in float64."""
    cfg = _config(dtype="float64", mlstm_step_kernel=step_kernel)
    model = xLSTMLMModel(cfg)
    params = to_float64(init_params(cfg, jax.random.key(3)))
    tokens = _tokens(4, (B, 29))
    P = 19  # prompt: one full chunk of 16 and a partial one
    full = jax.jit(model.apply)({"params": params}, tokens)
    logits_p, states = jax.jit(lambda p, t: prefill(model, p, t))(params, tokens[:, :P])
    assert states.matC.shape == (cfg.num_blocks, B, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim)
    assert relative_error(logits_p, full[:, :P]) < 1e-12
    step = jax.jit(lambda p, t, s: decode_step(model, p, t, s))
    decoded = []
    for t in range(P, tokens.shape[1]):
        logits_t, states = step(params, tokens[:, t], states)
        decoded.append(logits_t)
    err = relative_error(jnp.stack(decoded, axis=1), full[:, P:])
    assert err < 1e-10, err


def test_generate_greedy_is_the_argmax_chain(x64):
    """Greedy generation (jitted prefill + lax.scan decode) picks, at every position, the argmax of
    the full forward over prompt + generated tokens."""
    cfg = _config(dtype="float64")
    model = xLSTMLMModel(cfg)
    params = to_float64(init_params(cfg, jax.random.key(5)))
    prompt = _tokens(6, (B, 7))
    out = generate(model, params, prompt, 9, temperature=0.0)
    assert out.shape == (B, 9) and out.dtype == jnp.int32
    seq = jnp.concatenate([prompt, out], axis=1)
    full = model.apply({"params": params}, seq[:, :-1])
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full[:, 6:], -1)), np.asarray(out))


def test_sampling_rules():
    logits = jax.random.normal(jax.random.key(7), (4, 256)) * 3
    keys = jax.random.split(jax.random.key(8), 200)
    greedy = sample_logits(logits, keys[0], 0.0, 0)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jnp.argmax(logits, -1)))
    np.testing.assert_array_equal(np.asarray(sample_logits(logits, keys[1], 1.0, 1)), np.asarray(greedy))
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    draws = np.stack([np.asarray(sample_logits(logits, k, 1.5, 3)) for k in keys])  # (200, 4)
    for b in range(4):
        assert set(draws[:, b]) <= set(top3[b]) and len(set(draws[:, b])) > 1
    with pytest.raises(ValueError):
        sample_logits(logits, keys[0], -1.0, 0)
