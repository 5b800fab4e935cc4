"""Sharded training: one step on a (data, fsdp, tensor) mesh of the 8 simulated CPU devices equals
the one-device step (loss and updated parameters), in float64 so that only rounding can differ."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xlstm_jax.models.xlstm_lm import preset_config
from xlstm_jax.models.xlstm_lm.sharding import make_mesh, validate_mesh
from xlstm_jax.testing import relative_error
from xlstm_jax.train.trainer import TrainConfig, Trainer

from ._util import assert_tree_below

BATCH, SEQ = 8, 40  # S = 40 with chunk 16: two full chunks and a partial one


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def _configs(mesh):
    model = preset_config(
        "tiny", dtype="float64", param_dtype="float64", context_length=SEQ,
        mlstm_backend="fwbw_stabilized", mlstm_backend_kwargs={"chunk_size": 16},
    )
    return model, TrainConfig(mesh=mesh, batch_size=BATCH, seq_len=SEQ, warmup_steps=0, steps=10, learning_rate=1e-2)


def _one_step(mesh):
    trainer = Trainer(*_configs(mesh))
    state = trainer.init_state(seed=11)
    before = jax.device_get(state.params)
    # a packed batch (the trainer's default layout): tokens and segment ids, (B, 2, S + 1), each row
    # two documents split at a row-dependent position (borders on and off the chunk edges)
    rng = np.random.default_rng(12)
    tokens = rng.integers(0, 256, (BATCH, SEQ + 1))
    cuts = rng.integers(1, SEQ, (BATCH, 1))
    segments = (np.arange(SEQ + 1)[None, :] >= cuts).astype(np.int64) + 3 * np.arange(BATCH)[:, None]
    batch = np.stack([tokens, segments], axis=1).astype(np.int32)
    assert trainer.batch_shape == batch.shape
    state, metrics = trainer.train_step(state, batch)
    return trainer, state, float(metrics["loss"]), before, jax.device_get(state.params)


@functools.lru_cache(maxsize=1)
def _single_device():
    assert jax.config.jax_enable_x64
    _, _, loss, before, after = _one_step(None)
    return loss, before, after


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=lambda m: "mesh%dx%dx%d" % m)
def test_sharded_train_step_equals_single_device(mesh, x64):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    loss_ref, before_ref, after_ref = _single_device()
    trainer, state, loss, before, after = _one_step(mesh)
    # the state really is sharded as the rules say: FSDP over rows, heads over tensor
    q_sharding = state.params["blocks"]["mlstm"]["q"]["kernel"].sharding
    assert q_sharding.spec == P(None, "fsdp", "tensor")
    mu = state.opt_state[1][0].mu["blocks"]["mlstm"]["out_proj"]["kernel"]  # Adam's first moment
    assert mu.sharding.spec == P(None, "tensor", "fsdp")
    assert state.params["embedding"]["embedding"].sharding.spec == P(None, "fsdp")
    assert len(state.params["blocks"]["ffn"]["up"]["kernel"].addressable_shards) == 8
    # same initial parameters, same loss, same update of every parameter
    jax.tree.map(np.testing.assert_array_equal, before, before_ref)
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref)
    update = jax.tree.map(lambda a, b: a - b, after, before)
    update_ref = jax.tree.map(lambda a, b: a - b, after_ref, before_ref)
    errs = jax.tree.map(relative_error, update, update_ref)
    assert_tree_below(errs, 1e-9)


def test_mesh_must_split_heads_and_batch():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    with pytest.raises(ValueError, match="num_heads 2 is not divisible by the mesh's tensor axis 4"):
        validate_mesh(make_mesh((2, 1, 4)), num_heads=2)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by data x fsdp = 4"):
        validate_mesh(make_mesh((2, 2, 2)), num_heads=2, batch_size=6)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 2, 2))
