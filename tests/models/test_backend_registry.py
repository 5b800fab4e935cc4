"""Every registered backend accepts the seed call signature and gives the same numbers."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax.kernels import CellOptions
from xlstm_jax.kernels.mlstm_parallel.native import mlstm_parallel
from xlstm_jax.models.xlstm_lm.layers import step_kernel_options
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
    available_mlstm_backends,
    create_mlstm_backend,
    create_mlstm_backend_config,
)
from xlstm_jax.testing import assert_trees_close, mlstm_inputs, relative_error, to_float64

CPU_BACKENDS = ["fwbw_stabilized", "parallel_stabilized", "recurrent"]


def test_foundation_backends_are_registered():
    assert set(CPU_BACKENDS) <= set(available_mlstm_backends())


@pytest.mark.parametrize("gates", ["BNS", "BNS1"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_chunkwise(name, gates):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(0), 2, 2, 21, 8, 16, initial_states=True,
                                             m_initial_scale=3.0)
    if gates == "BNS1":
        i, f = i[..., None], f[..., None]
    ref = create_mlstm_backend("fwbw_stabilized", chunk_size=8)
    backend = create_mlstm_backend(name)
    # float32 products in full precision: on a GPU the default is TF32 (relative errors ~6e-4
    # between these float32 formulations, seen on an H200), which is not what this compares
    with jax.default_matmul_precision("highest"):
        h_ref, st_ref = ref.apply({}, q, k, v, i, f, c0, n0, m0, return_last_states=True)
        h, st = backend.apply({}, q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert relative_error(h, h_ref) < 1e-5
    for a, b in zip(st, st_ref):
        assert relative_error(a, b) < 1e-5
    h_only = backend.apply({}, q, k, v, i, f)
    assert h_only.shape == h.shape


@pytest.mark.parametrize("name", sorted(set(available_mlstm_backends())))
def test_backend_configs_gather_their_cell_options(name):
    """Every backend config's cell options are its flat fields named like CellOptions fields."""
    config = create_mlstm_backend_config(name)
    fields = {f.name for f in dataclasses.fields(config)}
    opts = config.cell_options
    assert isinstance(opts, CellOptions)
    for field in dataclasses.fields(CellOptions):
        want = getattr(config, field.name) if field.name in fields else field.default
        assert getattr(opts, field.name) == want, field.name
    if "eps" in fields:
        assert create_mlstm_backend_config(name, eps=1e-3).cell_options.eps == 1e-3


def test_step_kernel_options_follow_the_backend_cell_options():
    """The model decodes with the cell options of its backend (no attribute probing)."""
    model_config = types.SimpleNamespace(
        mlstm_backend="triton_kernels",
        backend_kwargs={"eps": 1e-4, "norm_val": 2.0, "stabilize_correctly": False, "grad_mode": "tfla"},
    )
    assert step_kernel_options(model_config) == dict(
        qk_scale=None, eps=1e-4, norm_val=2.0, stabilize_correctly=False, grad_mode="tfla", input_gate="exp"
    )
    model_config.mlstm_backend, model_config.backend_kwargs = "recurrent", {"eps": 1e-5}
    assert step_kernel_options(model_config) == CellOptions(eps=1e-5).as_kwargs()


def test_seed002_backend_grad_mode():
    """Seed 002's config gains grad_mode: "tfla" gives the TFLA gradients (denominator and m held
    constant) of the float64 reference, "exact" (the default) the exact ones."""
    inputs = mlstm_inputs(jax.random.PRNGKey(3), 1, 1, 16, 16, 16)[:5]
    dh = jax.random.normal(jax.random.PRNGKey(4), (1, 1, 16, 16))
    names = ("q", "k", "v", "i", "f")

    def grads(fn, args):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * dh.astype(a[0].dtype)), argnums=tuple(range(5)))(*args)

    with jax.enable_x64(True):
        refs = {mode: grads(lambda *a, _m=mode: mlstm_parallel(*a, grad_mode=_m), to_float64(inputs))
                for mode in ("exact", "tfla")}
    backend = create_mlstm_backend("triton_kernels", chunk_size=16, grad_mode="tfla")
    got = jax.jit(lambda *a: grads(lambda *x: backend.apply({}, *x), a))(*inputs)
    assert_trees_close(dict(zip(names, got)), dict(zip(names, refs["tfla"])), 2e-4, "tfla gradients")
    for name in ("q", "k", "i", "f"):  # the two conventions differ
        assert relative_error(got[names.index(name)], refs["exact"][names.index(name)]) > 1e-3, name


def test_triton_backend_kernel_family():
    """``triton_kernels`` with ``chunk_size=None`` runs ``chunkwise_auto`` (the tuned table's family)
    unless ``kernel_family="triton"``; an explicit chunk always runs ``chunkwise_pallas``; a bad
    family is a ``ValueError`` naming the field. Both kernels give the same function here (on CPU the
    auto kernel falls back to the Triton family)."""
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.triton_kernels import mLSTMBackendTritonConfig

    auto = create_mlstm_backend("triton_kernels", chunk_size=None)
    triton = create_mlstm_backend("triton_kernels", chunk_size=None, kernel_family="triton")
    assert auto.kernel_call(128)[0] == "chunkwise_auto"
    assert triton.kernel_call(128)[0] == "chunkwise_pallas"
    assert create_mlstm_backend("triton_kernels", chunk_size=32).kernel_call(128)[0] == "chunkwise_pallas"
    with pytest.raises(ValueError, match="kernel_family must be one of"):
        mLSTMBackendTritonConfig(kernel_family="mosaic_gpu")
    inputs = mlstm_inputs(jax.random.PRNGKey(5), 1, 2, 64, 16, 32)[:5]
    h_auto, h_triton = auto.apply({}, *inputs), triton.apply({}, *inputs)
    assert h_auto.shape == (1, 2, 64, 32) and bool(jnp.all(jnp.isfinite(h_auto)))
    assert relative_error(h_auto, h_triton) == 0.0
