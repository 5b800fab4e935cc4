"""The Pallas chunkwise (TFLA) kernel family against the float64 references (issue 3).

On CPU the kernels run in interpret mode (``interpret=None``); on the GPU machine the same tests
compile them through Pallas' Triton lowering (``scripts/gpu_suite.sh``). Every case checks h, the
last states and the gradients of q, k, v, i, f and the initial states (random cotangents on h and
on every last state), each case covering a different hard case of docs/design.md (testing).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import available_mlstm_kernels, get_mlstm_kernel
from xlstm_jax.kernels.mlstm_chunkwise.native import mlstm_chunkwise
from xlstm_jax.kernels.mlstm_chunkwise.pallas import chunkwise_kernel_params, mlstm_chunkwise_pallas
from xlstm_jax.kernels.mlstm_chunkwise.pallas import gates
from xlstm_jax.kernels.mlstm_parallel.native import mlstm_parallel
from xlstm_jax.kernels.mlstm_recurrent.native import mlstm_recurrent_sequence
from xlstm_jax.testing import mlstm_inputs, relative_error, to_float64

TOL = {"float32": 2e-4, "bfloat16": 2e-2}
GRAD_NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    B: int
    NH: int
    S: int
    DHQK: int
    DHV: int
    dtype: str = "float32"
    grad_mode: str = "exact"
    initial_states: bool = True
    gates: str = "normal"  # "normal" or "hard" (f = -20 / i = +20 mixed in, |m0| ~ 30)
    options: tuple = ()


CASES = [
    Case("fp32-exact-S40-Lintra32-inter16-DHQK16-DHV32", 1, 2, 40, 16, 32,
         options=(("chunk_size_intra", 32), ("chunk_size_inter", 16), ("siz_b_L_parallel", 16),
                  ("siz_b_L_loop", 16))),
    Case("fp32-tfla-keepstates-S64-L16-DHQK32-DHV16", 2, 1, 64, 32, 16, grad_mode="tfla",
         initial_states=False, options=(("chunk_size", 16), ("recompute_states_in_bw", False))),
    Case("bf16-exact-S160-Lintra128-inter64-DHQK64-DHV128", 1, 2, 160, 64, 128, dtype="bfloat16",
         options=(("chunk_size_intra", 128), ("chunk_size_inter", 64))),
    Case("fp32-exact-hardgates-S48-L16-DHQK16-DHV16", 1, 2, 48, 16, 16, gates="hard",
         options=(("chunk_size", 16),)),
    Case("fp32-exact-S1-DHQK16-DHV16", 2, 1, 1, 16, 16),
    Case("fp32-exact-multitile-S64-L32-DHQK48-DHV96", 1, 1, 64, 48, 96,
         options=(("chunk_size", 32), ("siz_b_L_parallel", 32), ("siz_b_L_loop", 16),
                  ("siz_b_DH_parallel", 32), ("siz_b_DH_loop", 16), ("siz_b_DHQK_inter", 16),
                  ("siz_b_DHV_inter", 32))),
]


def _inputs(case: Case, seed: int = 0):
    key = jax.random.PRNGKey(seed)
    dt = jnp.dtype(case.dtype)
    inp = list(mlstm_inputs(key, case.B, case.NH, case.S, case.DHQK, case.DHV, dtype=dt,
                            initial_states=case.initial_states, m_initial_scale=1.0))
    if case.gates == "hard":
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 1), 3)
        shape = (case.B, case.NH, case.S)
        inp[3] = jnp.where(jax.random.uniform(k1, shape) < 0.3, 20.0, inp[3]).astype(dt)
        inp[4] = jnp.where(jax.random.uniform(k2, shape) < 0.3, -20.0, inp[4]).astype(dt)
        inp[7] = 30.0 * jnp.sign(jax.random.normal(k3, (case.B, case.NH)))
    return tuple(inp)


def _cotangents(case: Case, seed: int = 1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        jax.random.normal(ks[0], (case.B, case.NH, case.S, case.DHV)),
        jax.random.normal(ks[1], (case.B, case.NH, case.DHQK, case.DHV)),
        jax.random.normal(ks[2], (case.B, case.NH, case.DHQK)),
        jax.random.normal(ks[3], (case.B, case.NH)),
    )


def _value_and_grads(fn, inputs, cts):
    """(h, last states, grads of every input) of sum(h*dh) + <C, dC> + <n, dn> + <m, dm>."""
    has_init = inputs[5] is not None
    n_args = 8 if has_init else 5

    def loss(*args):
        h, (c, n, m) = fn(*args)
        dh, dc, dn, dm = cts
        val = jnp.sum(h.astype(dh.dtype) * dh) + jnp.sum(c * dc) + jnp.sum(n * dn) + jnp.sum(m * dm)
        return val, (h, (c, n, m))

    g = jax.jit(jax.grad(loss, argnums=tuple(range(n_args)), has_aux=True))
    grads, (h, states) = g(*inputs[:n_args])
    return h, states, grads


def _check(out, ref, tol, what):
    err = relative_error(out, ref)
    assert np.isfinite(err) and err < tol, f"{what}: relative error {err:.3e} (tolerance {tol})"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_against_float64_reference(case, x64):
    inputs = _inputs(case)
    cts = _cotangents(case)
    opts = dict(case.options)
    kernel = lambda *a: mlstm_chunkwise_pallas(  # noqa: E731
        *a, return_last_states=True, grad_mode=case.grad_mode, **opts)
    reference = lambda *a: mlstm_parallel(  # noqa: E731
        *a, return_last_states=True, grad_mode=case.grad_mode)
    h, st, grads = _value_and_grads(kernel, inputs, cts)
    h_ref, st_ref, grads_ref = _value_and_grads(reference, to_float64(inputs), to_float64(cts))
    tol = TOL[case.dtype]
    assert h.dtype == jnp.dtype(case.dtype) and h.shape == h_ref.shape
    _check(h, h_ref, tol, "h")
    for name, a, b in zip(("C", "n", "m"), st, st_ref):
        assert a.dtype == jnp.float32
        _check(a, b, tol, f"last state {name}")
    for name, a, b in zip(GRAD_NAMES, grads, grads_ref):
        assert a.dtype == inputs[GRAD_NAMES.index(name)].dtype, name
        if name == "m0" and case.dtype == "bfloat16":
            _check_dm0_bf16(a, b, grads_ref, to_float64(inputs), tol)
        else:
            _check(a, b, tol, f"grad {name}")


def _check_dm0_bf16(dm0, dm0_ref, grads_ref, inputs64, tol):
    """dm0 = <dC0, C0> + <dn0, n0> + (pull-back through m) is a difference of terms of the size of
    the initial state (here ~8x larger than dm0): with bf16 matrix products its error is measured
    against the size of those terms, the condition of the quantity (float32 cases: against dm0)."""
    c0, n0 = inputs64[5], inputs64[6]
    scale = jnp.abs(jnp.sum(grads_ref[5] * c0, axis=(2, 3))) + jnp.abs(jnp.sum(grads_ref[6] * n0, axis=2))
    err = relative_error(dm0, dm0_ref) * float(jnp.linalg.norm(dm0_ref)) / float(jnp.linalg.norm(scale))
    assert np.isfinite(err) and err < tol, f"grad m0: error {err:.3e} relative to its parts (tolerance {tol})"


def test_state_passing(x64):
    """A sequence processed whole equals its two halves with the states carried over."""
    case = Case("sp", 1, 2, 48, 16, 32)
    q, k, v, i, f, c0, n0, m0 = _inputs(case)
    fn = jax.jit(lambda *a: mlstm_chunkwise_pallas(*a, return_last_states=True, chunk_size=16))
    h, st = fn(q, k, v, i, f, c0, n0, m0)
    cut = 24
    first = lambda x: x[:, :, :cut]  # noqa: E731
    second = lambda x: x[:, :, cut:]  # noqa: E731
    h1, st1 = fn(*map(first, (q, k, v, i, f)), c0, n0, m0)
    h2, st2 = fn(*map(second, (q, k, v, i, f)), *st1)
    _check(jnp.concatenate([h1, h2], axis=2), h, 1e-5, "h split vs whole")
    for a, b in zip(st2, st):
        _check(a, b, 1e-5, "last states split vs whole")
    ref_h, ref_st = mlstm_recurrent_sequence(*to_float64((q, k, v, i, f, c0, n0, m0)), return_last_states=True)
    _check(h, ref_h, TOL["float32"], "h vs recurrent reference")
    for a, b in zip(st, ref_st):
        _check(a, b, TOL["float32"], "last states vs recurrent reference")


def test_max_state_scan_matches_recurrence(x64):
    key = jax.random.PRNGKey(3)
    i = 5.0 * jax.random.normal(key, (3, 20), jnp.float64)
    logf = jax.nn.log_sigmoid(3.0 * jax.random.normal(jax.random.fold_in(key, 1), (3, 20), jnp.float64))
    m0 = jnp.array([0.0, -40.0, 25.0])
    m, ms = m0, []
    for t in range(20):
        m = jnp.maximum(logf[:, t] + m, i[:, t])
        ms.append(m)
    np.testing.assert_allclose(gates.max_state_scan(i, logf, m0), jnp.stack(ms, axis=1), rtol=1e-12)
    borders = gates.border_max_states(jnp.stack(ms, axis=1), m0, 5)
    per_step = gates.chunk_max_states(i.reshape(3, 4, 5), logf.reshape(3, 4, 5), borders).reshape(3, 20)
    np.testing.assert_allclose(per_step, jnp.stack(ms, axis=1), rtol=1e-10, atol=1e-10)


def test_registry_and_options():
    assert "chunkwise_pallas" in available_mlstm_kernels()
    kern = get_mlstm_kernel("chunkwise_pallas", chunk_size=16)
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(0), 1, 1, 20, 16, 16)
    h = jax.jit(kern)(q, k, v, i, f)
    with jax.default_matmul_precision("highest"):  # float32 products (not TF32) in the reference
        h_ref = mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    _check(h, h_ref, 1e-4, "registry kernel vs chunkwise_native")
    with pytest.raises(ValueError, match="no option"):
        get_mlstm_kernel("chunkwise_pallas", chunk_sise=16)


def test_heuristics_defaults_and_overrides():
    p = chunkwise_kernel_params(S=8192, DHQK=128, DHV=256, dtype=jnp.bfloat16)
    assert (p.chunk_size_intra, p.chunk_size_inter) == (128, 128)
    assert p.chunk_size_intra % p.siz_b_L_parallel == 0 and p.chunk_size_intra % p.siz_b_L_loop == 0
    assert chunkwise_kernel_params(S=8192, DHQK=128, DHV=256, dtype=jnp.float32).chunk_size_intra == 64
    assert chunkwise_kernel_params(S=5, DHQK=16, DHV=16, dtype=jnp.bfloat16).chunk_size_intra == 16
    big = chunkwise_kernel_params(S=8192, DHQK=256, DHV=512, dtype=jnp.bfloat16)
    assert (big.siz_b_L_parallel, big.num_stages_intra) == (128, 1)  # 7B heads: measured 2026-12-01
    p = chunkwise_kernel_params(S=4096, DHQK=64, DHV=64, dtype=jnp.bfloat16, chunk_size=256,
                                siz_b_L_loop=32, num_warps_intra=2)
    assert (p.chunk_size_intra, p.siz_b_L_loop, p.num_warps_intra) == (256, 32, 2)
    assert p.tile("siz_b_DH_parallel", 64) == 64
    for bad in (dict(chunk_size_intra=48), dict(siz_b_L_loop=24), dict(chunk_size_inter=8),
                dict(num_warps_intra=3), dict(siz_b_DH_loop=0), dict(no_such_param=16)):
        with pytest.raises(ValueError):
            chunkwise_kernel_params(S=256, DHQK=64, DHV=64, dtype=jnp.bfloat16, **bad)


def test_input_validation():
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(0), 1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        mlstm_chunkwise_pallas(q, k[:, :1], v, i, f)
    with pytest.raises(ValueError, match="autocast_kernel_dtype"):
        mlstm_chunkwise_pallas(q, k, v, i, f, autocast_kernel_dtype=jnp.int32)
    with pytest.raises(ValueError, match="grad_mode"):
        mlstm_chunkwise_pallas(q, k, v, i, f, grad_mode="approx")
    with pytest.raises(ValueError, match="chunk"):
        mlstm_chunkwise_pallas(q, k, v, i, f, chunk_size=24)


# ----------------------------------------------------------------------------- compiled (GPU) only
GPU_CASES = [
    ("bf16-exact-B1-NH2-S1024-DHQK128-DHV256", 1, 2, 1024, 128, 256, "exact"),
    ("bf16-tfla-B1-NH2-S1024-DHQK128-DHV256", 1, 2, 1024, 128, 256, "tfla"),
    ("bf16-exact-B1-NH1-S300-DHQK256-DHV512", 1, 1, 300, 256, 512, "exact"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,B,NH,S,DHQK,DHV,grad_mode", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_compiled_against_chunkwise_native(name, B, NH, S, DHQK, DHV, grad_mode):
    """Compiled kernels (default parameters) vs the XLA chunkwise reference in float32."""
    inputs = mlstm_inputs(jax.random.PRNGKey(7), B, NH, S, DHQK, DHV, dtype=jnp.bfloat16)[:5]
    dh = jax.random.normal(jax.random.PRNGKey(8), (B, NH, S, DHV), jnp.float32)

    def fwbw(fn, args):
        h, vjp = jax.vjp(fn, *args)
        return h, vjp(dh.astype(h.dtype))

    kern = jax.jit(lambda *a: fwbw(lambda *x: mlstm_chunkwise_pallas(*x, grad_mode=grad_mode), a))
    ref = jax.jit(lambda *a: fwbw(lambda *x: mlstm_chunkwise(*x, grad_mode=grad_mode), a))
    h, grads = kern(*inputs)
    with jax.default_matmul_precision("highest"):  # the reference in float32, not TF32
        h_ref, grads_ref = ref(*(x.astype(jnp.float32) for x in inputs))
    _check(h, h_ref, TOL["bfloat16"], "h")
    for gname, a, b in zip(GRAD_NAMES, grads, grads_ref):
        _check(a, b, TOL["bfloat16"], f"grad {gname}")


IN_KERNEL_GATES_CASES = [
    ("bf16-exact-B2-NH2-S1024-DHQK64-DHV128", 2, 2, 1024, 64, 128, "exact"),
    ("bf16-tfla-B1-NH2-S1024-DHQK128-DHV256", 1, 2, 1024, 128, 256, "tfla"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,B,NH,S,DHQK,DHV,grad_mode", IN_KERNEL_GATES_CASES,
                         ids=[c[0] for c in IN_KERNEL_GATES_CASES])
def test_compiled_in_kernel_gates_against_chunkwise_native(name, B, NH, S, DHQK, DHV, grad_mode):
    """``gates_impl="kernel"`` and ``gate_grads_impl="kernel"`` compiled (the gate scans as ``tt.scan``
    inside the recurrent kernel and the gate-gradient kernel),
    states kept, against the XLA chunkwise reference in float32, with a forget gate of 0 inside a
    chunk and at a chunk border (resets the scans must find)."""
    q, k, v, i, f = mlstm_inputs(jax.random.PRNGKey(9), B, NH, S, DHQK, DHV, dtype=jnp.bfloat16)[:5]
    f = f.at[:, :, 200].set(-jnp.inf).at[:, :, 512].set(-jnp.inf)
    dh = jax.random.normal(jax.random.PRNGKey(10), (B, NH, S, DHV), jnp.float32)

    def fwbw(fn, args):
        h, vjp = jax.vjp(fn, *args)
        return h, vjp(dh.astype(h.dtype))

    kern = jax.jit(lambda *a: fwbw(lambda *x: mlstm_chunkwise_pallas(
        *x, grad_mode=grad_mode, gates_impl="kernel", gate_grads_impl="kernel", recompute_states_in_bw=False), a))
    ref = jax.jit(lambda *a: fwbw(lambda *x: mlstm_chunkwise(*x, grad_mode=grad_mode), a))
    h, grads = kern(q, k, v, i, f)
    with jax.default_matmul_precision("highest"):
        h_ref, grads_ref = ref(*(x.astype(jnp.float32) for x in (q, k, v, i, f)))
    _check(h, h_ref, TOL["bfloat16"], "h")
    for gname, a, b in zip(GRAD_NAMES, grads, grads_ref):
        _check(a, b, TOL["bfloat16"], f"grad {gname}")
