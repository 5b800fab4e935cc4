"""Packed documents in the model (``segment_ids``) and the sigmoid input gate in the model config.

A packed row's logits equal those of each of its documents run on its own (issue 11), in float64:
the packed row through the chunkwise backend, each document alone through the parallel backend
(which starts from the empty state, as a document in a packed row does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_lm.config import preset_config
from xlstm_jax.models.xlstm_lm.model import xLSTMLMModel
from xlstm_jax.testing import assert_close

LENGTHS = (7, 16, 1, 8)  # documents of one row: borders off and on the chunk edge (16), one of one token


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _config(backend, input_gate, **kw):
    return preset_config("tiny", mlstm_backend=backend, dtype="float64", param_dtype="float64",
                         context_length=64, input_gate=input_gate, igate_bias_init=0.0, **kw)


# the sigmoid case is slow-marked: the backend test below covers packing with the sigmoid gate
@pytest.mark.parametrize("input_gate", ["exp", pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_packed_row_equals_documents_alone(input_gate):
    S = sum(LENGTHS)
    tokens = jax.random.randint(jax.random.key(5), (2, S), 0, 256, dtype=jnp.int32)
    ids = np.repeat(np.array([3, 8, 1, 4]), LENGTHS)[None].repeat(2, 0)
    ids[1] = 0  # row 1: one document
    packed_cfg = _config("fwbw_stabilized", input_gate, mlstm_backend_kwargs={"chunk_size": 16})
    alone_cfg = _config("parallel_stabilized", input_gate)
    params = xLSTMLMModel(packed_cfg).init(jax.random.key(0), tokens)["params"]
    # random gate biases so that the gates matter (the tiny preset's input gates start closed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 * jax.random.normal(jax.random.key(len(str(p))), x.shape, x.dtype)
        if "igate" in str(p) and "bias" in str(p) else x, params)
    got = xLSTMLMModel(packed_cfg).apply({"params": params}, tokens, segment_ids=jnp.asarray(ids))
    alone = xLSTMLMModel(alone_cfg)
    cuts = np.cumsum((0,) + LENGTHS)
    want0 = jnp.concatenate(
        [alone.apply({"params": params}, tokens[:1, a:b]) for a, b in zip(cuts[:-1], cuts[1:])], axis=1
    )
    want1 = alone.apply({"params": params}, tokens[1:])
    assert_close(got, jnp.concatenate([want0, want1], axis=0), 1e-8, f"packed logits ({input_gate})")
    unpacked = xLSTMLMModel(packed_cfg).apply({"params": params}, tokens)
    assert not np.allclose(np.asarray(unpacked[0, 7:]), np.asarray(got[0, 7:]), rtol=1e-3)


def test_model_config_input_gate():
    cfg = preset_config("tiny", input_gate="sigmoid")
    assert cfg.backend_kwargs["input_gate"] == "sigmoid"
    with pytest.raises(ValueError, match="input_gate must be one of"):
        preset_config("tiny", input_gate="tanh")
    with pytest.raises(ValueError, match="differs from input_gate"):
        preset_config("tiny", input_gate="exp", mlstm_backend_kwargs={"input_gate": "sigmoid"})


def test_segment_ids_checked():
    cfg = preset_config("tiny", context_length=16)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = xLSTMLMModel(cfg).init(jax.random.key(0), tokens)["params"]
    with pytest.raises(ValueError, match="segment_ids must be an int array of shape"):
        xLSTMLMModel(cfg).apply({"params": params}, tokens, segment_ids=jnp.zeros((1, 7), jnp.int32))


@pytest.mark.parametrize("name", ["parallel_stabilized", "fwbw_stabilized", "recurrent"])
def test_backends_take_segment_ids_and_the_sigmoid_gate(name):
    """Every XLA backend with ``segment_ids`` and ``input_gate="sigmoid"`` equals the kernel
    ``chunkwise_native`` with the same (float64; initial states given, so every form starts alike)."""
    from xlstm_jax.kernels import get_mlstm_kernel
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend
    from xlstm_jax.testing import mlstm_inputs

    B, NH, S = 2, 2, 20
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.key(9), B, NH, S, 16, 16, dtype=jnp.float64,
                                             initial_states=True, gate_scale=2.0)
    ids = jnp.asarray(np.repeat(np.array([[0, 4, 2], [1, 1, 1]]), [5, 1, 14], axis=1))
    for gate in ("exp", "sigmoid"):
        want = get_mlstm_kernel("chunkwise_native", chunk_size=8)(
            q, k, v, i, f, c0, n0, m0, return_last_states=True, segment_ids=ids, input_gate=gate)
        backend = create_mlstm_backend(name, input_gate=gate).clone(parent=None)
        got = backend.apply({}, q, k, v, i, f, c0, n0, m0, return_last_states=True, segment_ids=ids)
        assert_close(got[0], want[0], 1e-10, f"{name} {gate} h")
        for a, b, what in zip(got[1], want[1], "Cnm"):
            assert_close(a, b, 1e-10, f"{name} {gate} {what}")


def test_sigmoid_model_decodes_like_its_full_forward():
    """Prefill then token-by-token decoding of a sigmoid-gate model equals the full forward (float64):
    the step kernel gets the backend's input_gate."""
    cfg = _config("fwbw_stabilized", "sigmoid", mlstm_backend_kwargs={"chunk_size": 8})
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 256, dtype=jnp.int32)
    model = xLSTMLMModel(cfg)
    params = model.init(jax.random.key(1), tokens)["params"]
    full = model.apply({"params": params}, tokens)
    logits, states = model.apply({"params": params}, tokens[:, :8], return_last_states=True)
    steps = [logits]
    for t in range(8, 12):
        out, states = model.apply({"params": params}, tokens[:, t:t + 1], states, mode="step")
        steps.append(out)
    assert_close(jnp.concatenate(steps, axis=1), full, 1e-8, "prefill + decode")
    assert float(jnp.max(jnp.abs(states.scaM))) == 0.0  # the sigmoid cell has no max state
