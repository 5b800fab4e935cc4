"""Seeds 000-003: every name at its path, with the documented signature and defaults, computing what
its documentation says (thin over the Pallas chunkwise kernels; interpret mode on CPU, compiled on
the GPU machine). Also the seed-002 backend with every ``backend_name``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize import (
    _chunkwise_gates,
    _combined_bw,
    _combined_fw,
    _parallel_bw_dK,
    _parallel_bw_dQ,
    _parallel_bw_dV,
    _parallel_fw,
    _recurrent_bw,
    _recurrent_fw,
    triton_fwbw,
)
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef import triton_fwbw as stablef
from xlstm_jax.kernels.mlstm_parallel.native import mlstm_parallel
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
    available_mlstm_backends,
    create_mlstm_backend,
    get_mlstm_backend_class,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.config import mLSTMBackend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.triton_kernels import (
    BackendNameType,
    mLSTMBackendTriton,
    mLSTMBackendTritonConfig,
)
from xlstm_jax.testing import mlstm_inputs, relative_error, to_float64

TOL = 2e-4  # float32 inputs


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _check(out, ref, what, tol=TOL):
    err = relative_error(out, ref)
    assert np.isfinite(err) and err < tol, f"{what}: relative error {err:.3e}"


# ----------------------------------------------------------------------------- signatures
_EMPTY = inspect.Parameter.empty
SIGNATURES = {
    "stablef._mlstm_chunkwise_fwbw_generator": (stablef._mlstm_chunkwise_fwbw_generator, [
        ("autocast_kernel_dtype", jnp.bfloat16), ("return_last_states", False),
        ("recompute_states_in_bw", True), ("chunk_size", 64), ("eps", 1e-6),
        ("stabilize_correctly", True), ("norm_val", 1.0)]),
    "stablef._get_chunkwise_fwbw_kernel": (stablef._get_chunkwise_fwbw_kernel, [
        ("autocast_kernel_dtype", _EMPTY), ("kwargs", _EMPTY)]),
    "stablef.mlstm_chunkwise_triton_stablef": (stablef.mlstm_chunkwise_triton_stablef, [
        ("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY), ("i", _EMPTY), ("f", _EMPTY),
        ("c_initial", None), ("n_initial", None), ("m_initial", None), ("return_last_states", False),
        ("eps", 1e-6), ("chunk_size", 64), ("autocast_kernel_dtype", jnp.float32),
        ("stabilize_correctly", True), ("norm_val", 1.0)]),
    "_combined_fw.mlstm_chunkwise_fw": (_combined_fw.mlstm_chunkwise_fw, [
        ("matQ", _EMPTY), ("matK", _EMPTY), ("matV", _EMPTY), ("vecI", _EMPTY), ("vecF", _EMPTY),
        ("matC_initial", None), ("vecN_initial", None), ("scaM_initial", None), ("qk_scale", None),
        ("return_last_states", False), ("return_all_states", False), ("chunk_size_inter", None),
        ("chunk_size_intra", None), ("siz_b_L_parallel", None), ("siz_b_L_loop", None),
        ("siz_b_DH_parallel", None), ("siz_b_DH_loop", None), ("num_warps_intra", None),
        ("num_warps_inter", None), ("num_stages_intra", None), ("num_stages_inter", None),
        ("output_dtype", jnp.float32), ("eps", 0.0)]),
    "_parallel_bw_dV.mlstm_chunkwise__parallel_bw_dV": (_parallel_bw_dV.mlstm_chunkwise__parallel_bw_dV, [
        ("matQ", _EMPTY), ("matK", _EMPTY), ("matV", _EMPTY), ("vecI", _EMPTY), ("vecA", _EMPTY),
        ("vecB", _EMPTY), ("matC_all", _EMPTY), ("vecN_all", _EMPTY), ("scaM_all", _EMPTY),
        ("vecN_out", _EMPTY), ("vecM_out", _EMPTY), ("matDeltaH", _EMPTY), ("matDeltaC_states", _EMPTY),
        ("qk_scale", None), ("chunk_size", 64), ("siz_b_LQ", 32), ("siz_b_LKV", 32),
        ("siz_b_DHQK", None), ("siz_b_DHHV", None), ("num_warps", None), ("num_stages", None),
        ("eps", 0.0), ("output_dtype", jnp.float32)]),
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_seed_signatures(name):
    fn, expected = SIGNATURES[name]
    assert _params(fn) == expected
    assert fn.__doc__


def test_sibling_names_exist():
    for mod, names in [
        (_combined_bw, ["mlstm_chunkwise_bw"]),
        (_parallel_fw, ["mlstm_chunkwise__parallel_fw_Hintra"]),
        (_recurrent_fw, ["mlstm_chunkwise__recurrent_fw_C"]),
        (_recurrent_bw, ["mlstm_chunkwise__recurrent_bw_dC"]),
        (_parallel_bw_dQ, ["mlstm_chunkwise__parallel_bw_dQ"]),
        (_parallel_bw_dK, ["mlstm_chunkwise__parallel_bw_dK"]),
        (_chunkwise_gates, ["compute_chunkwise_log_gates_vecB_vecA", "compute_gate_grads_vecDeltaI_vecDeltaF"]),
        (triton_fwbw, ["_mlstm_chunkwise_fwbw_generator", "_get_chunkwise_fwbw_kernel", "mlstm_chunkwise_max_triton"]),
    ]:
        for n in names:
            assert callable(getattr(mod, n)) and getattr(mod, n).__doc__, f"{mod.__name__}.{n}"


# ----------------------------------------------------------------------------- seed 000
def test_stablef_fwbw_matches_reference(x64):
    """Seed 000: h, last states and exact gradients of every input (initial states, S % chunk != 0)."""
    inputs = mlstm_inputs(jax.random.PRNGKey(0), 1, 2, 40, 16, 32, initial_states=True)
    dh = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 40, 32))

    def loss(fn, *a):
        h, (c, n, m) = fn(*a)
        return jnp.sum(h * dh) + 0.3 * jnp.sum(c) + 0.7 * jnp.sum(n), (h, c, n, m)

    kern = lambda *a: stablef.mlstm_chunkwise_triton_stablef(*a, return_last_states=True, chunk_size=16)  # noqa: E731
    ref = lambda *a: mlstm_parallel(*a, return_last_states=True)  # noqa: E731
    g, out = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums=tuple(range(8)), has_aux=True))(*inputs)
    g_ref, out_ref = jax.grad(lambda *a: loss(ref, *a), argnums=tuple(range(8)), has_aux=True)(*to_float64(inputs))
    for name, a, b in zip(("h", "c", "n", "m"), out, out_ref):
        _check(a, b, name)
    for name, a, b in zip(("q", "k", "v", "i", "f", "c0", "n0", "m0"), g, g_ref):
        _check(a, b, f"grad {name}")


def test_stablef_generator_contract():
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(2), 1, 1, 16, 16, 16)
    fwd = stablef._get_chunkwise_fwbw_kernel("float32", chunk_size=16)
    h, c, n, m = fwd(q, k, v, i, f)
    assert h.shape == v.shape and c is None and n is None and m is None
    with pytest.raises(ValueError, match="dtype"):
        stablef._get_chunkwise_fwbw_kernel(jnp.int8)
    with pytest.raises(ValueError, match="unknown"):
        stablef._get_chunkwise_fwbw_kernel(jnp.float32, chunk_sise=16)


# ----------------------------------------------------------------------------- seeds 001 and 003
def test_combined_fw_outputs(x64):
    """Seed 001: h, the normalizer, m, last and all states against the float64 references."""
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(3), 1, 2, 48, 16, 32, initial_states=True)
    fw = jax.jit(lambda *a: _combined_fw.mlstm_chunkwise_fw(
        *a, return_last_states=True, return_all_states=True, chunk_size_intra=32, chunk_size_inter=16))
    h, vecN, vecM, last, (matC_all, vecN_all, scaM_all) = fw(q, k, v, i, f, c0, n0, m0)
    h_ref, (nrm_ref, m_ref), st_ref = mlstm_parallel(
        *to_float64((q, k, v, i, f, c0, n0, m0)), return_last_states=True, return_normalizer=True, eps=0.0)
    assert h.dtype == jnp.float32  # the default output_dtype
    _check(h, h_ref, "h")
    _check(vecN, nrm_ref, "vecN_out")
    _check(vecM, m_ref, "vecM_out")
    for name, a, b in zip("cnm", last, st_ref):
        _check(a, b, f"last {name}")
    NC = 2  # ceil(48 / 32)
    assert matC_all.shape == (1, 2, (NC + 1) * 16, 32) and vecN_all.shape == (1, 2, (NC + 1) * 16)
    assert scaM_all.shape == (1, 2, NC + 1)
    np.testing.assert_array_equal(matC_all[:, :, :16], c0)
    np.testing.assert_array_equal(scaM_all[:, :, 0], m0)
    np.testing.assert_array_equal(matC_all[:, :, -16:], last[0])


def test_stage_functions_and_dV(x64):
    """Seeds 003 + siblings: recurrent fw -> parallel fw -> recurrent bw -> dQ, dK, dV stages.

    dV (seed 003) equals the exact dV of the reference; dQ, dK and the gate gradients equal the
    reference's TFLA-convention gradients (the stages' default convention)."""
    B, NH, S, L = 1, 2, 64, 32
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(4), B, NH, S, 16, 32, initial_states=True)
    dh = jax.random.normal(jax.random.PRNGKey(5), (B, NH, S, 32))

    @jax.jit
    def stages(q, k, v, i, f, c0, n0, m0, dh):
        vecB, vecA = _chunkwise_gates.compute_chunkwise_log_gates_vecB_vecA(i, f, L)
        Cs, Ns, Ms = _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(
            k, v, f, i, c0, n0, m0, chunk_size=16, save_states_every_nth_chunk=2)
        h, vecN, vecM = _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(
            q, k, v, i, f, Cs, Ns, Ms, chunk_size=L, eps=0.0)
        dCs = _recurrent_bw.mlstm_chunkwise__recurrent_bw_dC(
            q, f, Ms, vecM, dh, vecN, None, chunk_size=16, save_states_every_nth_chunk=2)
        ic = i.reshape(B, NH, S // L, L)
        common = (q, k, v, ic, vecA, vecB, Cs, Ns, Ms, vecN, vecM, dh, dCs)
        dQ = _parallel_bw_dQ.mlstm_chunkwise__parallel_bw_dQ(*common, chunk_size=L)
        dK = _parallel_bw_dK.mlstm_chunkwise__parallel_bw_dK(*common, chunk_size=L)
        dV = _parallel_bw_dV.mlstm_chunkwise__parallel_bw_dV(*common, chunk_size=L, siz_b_LQ=16, siz_b_LKV=32)
        dI, dF = _chunkwise_gates.compute_gate_grads_vecDeltaI_vecDeltaF(q, k, dQ, dK, f)
        return h, dQ, dK, dV, dI, dF

    h, dQ, dK, dV, dI, dF = stages(q, k, v, i, f, c0, n0, m0, dh)
    args64 = to_float64((q, k, v, i, f, c0, n0, m0))
    for mode, wanted in (("exact", {"v": dV}), ("tfla", {"q": dQ, "k": dK, "i": dI, "f": dF})):
        def loss(*a):
            return jnp.sum(mlstm_parallel(*a, eps=0.0, grad_mode=mode) * dh)
        g = dict(zip("qkvif", jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args64)))
        for name, val in wanted.items():
            _check(val, g[name], f"{mode} d{name}")
    _check(h, mlstm_parallel(*args64, eps=0.0), "h")


def test_combined_bw_and_v5_fwbw(x64):
    """``_combined_bw`` (exact, initial states) and the v5 ``mlstm_chunkwise_max_triton`` gradients."""
    inputs = mlstm_inputs(jax.random.PRNGKey(6), 1, 2, 48, 16, 16, initial_states=True)
    dh = jax.random.normal(jax.random.PRNGKey(7), (1, 2, 48, 16))

    def loss(*a):
        return jnp.sum(mlstm_parallel(*a) * dh)

    g_ref = jax.grad(loss, argnums=tuple(range(8)))(*to_float64(inputs))
    g_bw = jax.jit(lambda *a: _combined_bw.mlstm_chunkwise_bw(*a, matDeltaH=dh, chunk_size=16, eps=1e-6))(*inputs)
    kern = lambda *a: triton_fwbw.mlstm_chunkwise_max_triton(*a, chunk_size=16)  # noqa: E731
    g_v5 = jax.jit(jax.grad(lambda *a: jnp.sum(kern(*a) * dh), argnums=tuple(range(8))))(*inputs)
    for name, a, b, c in zip(("q", "k", "v", "i", "f", "c0", "n0", "m0"), g_bw, g_v5, g_ref):
        _check(a, c, f"_combined_bw d{name}")
        _check(b, c, f"mlstm_chunkwise_max_triton d{name}")


# ----------------------------------------------------------------------------- seed 002
def test_backend_config_fields_and_registry():
    fields = [(fl.name, fl.default) for fl in dataclasses.fields(mLSTMBackendTritonConfig)]
    # the seed's fields, in order, with the seed's defaults; then the additions (grad_mode: issue 8,
    # input_gate: issue 11, kernel_family: issue 14)
    assert fields == [
        ("autocast_dtype", None), ("chunk_size", 64), ("reduce_slicing", True),
        ("backend_name", "max_triton_noslice"), ("eps", 1e-6), ("norm_val", 1.0),
        ("stabilize_correctly", True), ("grad_mode", "exact"), ("input_gate", "exp"),
        ("kernel_family", "auto"),
    ]
    assert set(get_args(BackendNameType)) == {"max_triton_xlchunksize", "max_triton_noslice", "max_triton", "triton_stablef"}
    assert issubclass(mLSTMBackendTriton, mLSTMBackend)
    assert mLSTMBackendTriton.config_class is mLSTMBackendTritonConfig
    assert "triton_kernels" in available_mlstm_backends()
    assert get_mlstm_backend_class("triton_kernels") is mLSTMBackendTriton
    backend = create_mlstm_backend("triton_kernels")
    assert backend.can_vmap_over_heads is False
    backend.config.assign_model_config_params(object())
    with pytest.raises(ValueError, match="backend_name"):
        mLSTMBackendTritonConfig(backend_name="max_triton_v9")
    with pytest.raises(ValueError, match="chunk_size"):
        mLSTMBackendTritonConfig(chunk_size=48)


def test_backend_reduce_slicing():
    def call(**kw):
        return create_mlstm_backend("triton_kernels", **kw).kernel_call(96)[1]

    assert call(chunk_size=64)["chunk_size_intra"] == 32  # 96 = 3 * 32: no padding needed
    assert call(chunk_size=64, reduce_slicing=False)["chunk_size_intra"] == 64
    xl = call(chunk_size=64, backend_name="max_triton_xlchunksize", reduce_slicing=False)
    assert (xl["chunk_size_intra"], xl["chunk_size_inter"]) == (128, 64)


@pytest.mark.parametrize("backend_name", list(get_args(BackendNameType)))
def test_backend_names_compute_the_cell(backend_name, x64):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(8), 1, 2, 40, 16, 16, initial_states=True)
    backend = create_mlstm_backend(
        "triton_kernels", backend_name=backend_name, chunk_size=16, eps=1e-5, norm_val=0.5,
        stabilize_correctly=backend_name != "max_triton")
    run = jax.jit(lambda *a: backend.apply({}, *a, return_last_states=True))
    h, (c, n, m) = run(q, k, v, i[..., None], f[..., None], c0, n0, m0)
    h_ref, st_ref = mlstm_parallel(
        *to_float64((q, k, v, i, f, c0, n0, m0)), return_last_states=True, eps=1e-5, norm_val=0.5,
        stabilize_correctly=backend_name != "max_triton")
    _check(h, h_ref, "h")
    for name, a, b in zip("cnm", (c, n, m), st_ref):
        _check(a, b, f"last {name}")
