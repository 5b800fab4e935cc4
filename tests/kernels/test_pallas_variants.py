"""The variant paths of the Pallas chunkwise kernels (issue 9, "a backward that does less").

Options of ``ChunkwiseKernelParams`` (``heuristics.VARIANT_CHOICES``): ``m_scan="linear"``,
``gates_impl="pallas"``, ``gate_grads_impl="pallas"``, ``states_bf16=True``. Each non-default value
runs against the float64 parallel reference (h, last states, the gradients of q, k, v, i, f and of
the initial states) in both gradient conventions, with initial states and extreme gates
(f = -inf, f = -1e30, i = -inf, at chunk edges and inside chunks); the pieces are also checked one
by one against their XLA versions (gate vectors, gate gradients, the m scan and its pull-back, the
decay inner products of the recurrent backward kernel). Interpret mode on CPU, tiny shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import get_mlstm_kernel
from xlstm_jax.kernels.mlstm_chunkwise.pallas import chunkwise_kernel_params, gate_kernels, gates
from xlstm_jax.kernels.mlstm_chunkwise.pallas.bw_parallel_dk import parallel_bw_dk
from xlstm_jax.kernels.mlstm_chunkwise.pallas.bw_parallel_dkdv import parallel_bw_dkdv
from xlstm_jax.kernels.mlstm_chunkwise.pallas.bw_parallel_dv import parallel_bw_dv
from xlstm_jax.kernels.mlstm_chunkwise.pallas.bw_recurrent import recurrent_bw_states
from xlstm_jax.kernels.mlstm_chunkwise.pallas.fw_recurrent import recurrent_fw_states
from xlstm_jax.kernels.mlstm_parallel.native import mlstm_parallel
from xlstm_jax.testing import assert_trees_close, mlstm_inputs, outputs_and_grads_of, to_float64

B, NH, S, DHQK, DHV, L = 1, 2, 40, 16, 32, 16
TOL = {"float32": 2e-4, "bfloat16": 2e-2}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _inputs(dtype, seed=0):
    """Inputs with every kind of extreme gate (f = -inf at a chunk start and inside, f = -1e30 at a
    chunk end, i = -inf) and random cotangents of h and the last states."""
    key = jax.random.PRNGKey(seed)
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=jnp.dtype(dtype),
                                             gate_scale=2.0, initial_states=True, m_initial_scale=3.0)
    f = f.at[:, :, 16].set(-jnp.inf).at[:, :, 9].set(-jnp.inf).at[:, :, 31].set(-1e30)
    f = f.at[:, 1, 3].set(-1e30)
    i = i.at[:, :, 5].set(-jnp.inf).at[:, :, 38].set(-jnp.inf)
    ks = jax.random.split(jax.random.fold_in(key, 1), 4)
    cots = (
        jax.random.normal(ks[0], (B, NH, S, DHV)), jax.random.normal(ks[1], (B, NH, DHQK, DHV)),
        jax.random.normal(ks[2], (B, NH, DHQK)), jax.random.normal(ks[3], (B, NH)),
    )
    return (q, k, v, i, f, c0, n0, m0), cots


@functools.lru_cache(maxsize=None)
def _reference(dtype, grad_mode):
    inputs, cots = _inputs(dtype)
    fn = lambda *a: mlstm_parallel(*a, return_last_states=True, grad_mode=grad_mode)  # noqa: E731
    return jax.jit(lambda i, c: outputs_and_grads_of(fn, i, c))(to_float64(inputs), to_float64(cots))


VARIANTS = [
    ("m_scan-linear", "float32", (("m_scan", "linear"),)),
    ("gates-pallas", "float32", (("gates_impl", "pallas"),)),
    ("gate_grads-pallas", "float32", (("gate_grads_impl", "pallas"),)),
    ("gates-kernel", "float32", (("gates_impl", "kernel"),)),
    ("gate_grads-kernel", "float32", (("gate_grads_impl", "kernel"),)),
    ("gates-kernel-keepstates-bf16", "bfloat16",
     (("gates_impl", "kernel"), ("gate_grads_impl", "kernel"), ("states_bf16", True),
      ("recompute_states_in_bw", False))),
    # slow: "all-keepstates-bf16" runs states_bf16 with the same inputs and tolerance (among others)
    pytest.param("states_bf16", "bfloat16", (("states_bf16", True),), marks=pytest.mark.slow),
    ("all-keepstates-bf16", "bfloat16",
     (("m_scan", "linear"), ("gates_impl", "pallas"), ("gate_grads_impl", "pallas"),
      ("states_bf16", True), ("recompute_states_in_bw", False))),
]
# the fused row kernels and the kept gate vectors: exact mode only (in the TFLA mode the fused
# gradient kernel is not used, and the forward is the one tested here)
FUSED = ("fused-savegates-dkdv", "float32",
         (("gates_impl", "fused"), ("gate_grads_impl", "fused"), ("save_gates", True), ("fuse_dkdv", True)))


@pytest.mark.parametrize("grad_mode", ["exact", "tfla"])
@pytest.mark.parametrize("name,dtype,options", VARIANTS, ids=[getattr(v, "values", v)[0] for v in VARIANTS])
def test_variant_against_float64_reference(name, dtype, options, grad_mode):
    _check_variant(name, dtype, options, grad_mode)


def test_fused_gate_kernels_against_float64_reference():
    _check_variant(*FUSED, "exact")


def test_fused_gate_options_sigmoid_cell_with_segments():
    """The sigmoid input gate (m == 0: the fused kernels fall back to the m-free Pallas paths) with
    packed documents (two per row, one boundary inside a chunk), initial states, extreme gates."""
    inputs, cots = _inputs("float32")
    seg = jnp.asarray(np.array([[0] * 21 + [1] * 19], np.int32))
    run = lambda fn: jax.jit(lambda i, c: outputs_and_grads_of(  # noqa: E731
        lambda *a: fn(*a, return_last_states=True, segment_ids=seg, input_gate="sigmoid"), i, c))
    kernel = get_mlstm_kernel("chunkwise_pallas", chunk_size=L, **dict(FUSED[2]))
    outs, grads = run(kernel)(inputs, cots)
    ref_outs, ref_grads = run(mlstm_parallel)(to_float64(inputs), to_float64(cots))
    assert_trees_close(outs, ref_outs, TOL["float32"], "fused sigmoid segments outputs")
    assert_trees_close(grads, ref_grads, TOL["float32"], "fused sigmoid segments gradients")


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_in_kernel_gates_without_initial_state(input_gate):
    """gates_impl="kernel" and gate_grads_impl="kernel" on a call without initial states (the recurrent kernel starts from zeros
    and m0 = 0 without loading them), hard gates, two tiles of the state per row (so one program
    writes the gate vectors and the other only reads its chunk's weights), exact gradients; the
    sigmoid cell keeps the XLA gates."""
    inputs, cots = _inputs("float32")
    inputs = inputs[:5]
    kernel = get_mlstm_kernel("chunkwise_pallas", chunk_size=L, gates_impl="kernel", gate_grads_impl="kernel",
                              siz_b_DHV_inter=16)
    run = lambda fn: jax.jit(lambda i, c: outputs_and_grads_of(  # noqa: E731
        lambda *a: fn(*a, return_last_states=True, input_gate=input_gate), i, c))
    outs, grads = run(kernel)(inputs, cots)
    ref_outs, ref_grads = run(mlstm_parallel)(to_float64(inputs), to_float64(cots))
    assert_trees_close(outs, ref_outs, TOL["float32"], f"gates kernel {input_gate} outputs")
    assert_trees_close(grads, ref_grads, TOL["float32"], f"gates kernel {input_gate} gradients")


@pytest.mark.parametrize("pullback", [True, False], ids=["pullback", "no-pullback"])
def test_gate_gradients_scanned_kernel_equals_xla(pullback):
    """gate_grads_impl="kernel": the one-launch gate gradients (and the m pull-back) against
    ``gates.gate_gradients`` + ``gates.max_state_pullback_recurrent`` on rows with resets of every
    kind, several chunks per row (the pull-back's carry crosses the chunk borders)."""
    i, logf, m0 = _gates()
    vecM = gates.max_state_scan(i, logf, m0)
    reset = gates.kernel_gates(i, logf, vecM, m0, L).vecReset
    rng = np.random.default_rng(6)
    dqq, dkk, dks, dm = (jnp.asarray(rng.normal(size=i.shape), jnp.float32) for _ in range(4))
    ddecay = jnp.asarray(rng.normal(size=(3, 48 // L)), jnp.float32)
    dI, dLogF = gates.gate_gradients(dqq, dkk, dks, ddecay, reset, L)
    dM0 = jnp.zeros_like(m0)
    if pullback:
        dI_m, dLogF_m, dM0 = gates.max_state_pullback_recurrent(i, logf, m0, vecM, dm)
        dI, dLogF = dI + dI_m, dLogF + dLogF_m
        assert float(jnp.abs(dM0).max()) > 0.1
    sel = gates.max_state_selection(i, logf, m0, vecM) if pullback else None
    got = jax.jit(lambda *a: gate_kernels.gate_gradients_scanned(*a, params=_params(), interpret=True))(
        dqq, dkk, dks, ddecay, reset, sel, dm if pullback else None)
    for a, b, name in zip(got, (dI, dLogF, dM0), ("dI", "dLogF", "dM0")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_chunk_gates_scanned_equals_xla_gates():
    """The scans of ``chunk_gates_scanned`` (the recurrent kernel's gate arithmetic), chunk by chunk
    with the carried m, against ``gates.max_state_scan`` and ``gates.kernel_gates`` on rows with resets
    of every kind (f = -inf, -1e30, -300, i = -inf, time padding)."""
    i, logf, m0 = _gates()
    BH_, S_ = i.shape
    vecM = gates.max_state_scan(i, logf, m0)
    ref = gates.kernel_gates(i, logf, vecM, m0, L)
    names = ("vecM", "vecQlog", "vecKlog", "vecWinter", "vecWstate", "vecStart", "vecReset")
    got = {n: np.zeros((BH_, S_)) for n in names}
    decay = np.zeros((BH_, S_ // L))
    for b in range(BH_):
        m_prev = m0[b]
        for k in range(S_ // L):
            sl = slice(k * L, (k + 1) * L)
            out = gate_kernels.chunk_gates_scanned(i[b, sl], logf[b, sl], m_prev, k * L, L)
            for n, val in zip(names, out[:7]):
                got[n][b, sl] = np.asarray(val)
            decay[b, k], m_prev = float(out[7]), out[8]
    want = {n: np.asarray(vecM if n == "vecM" else getattr(ref, n), np.float64) for n in names}
    want["vecDecay"], got["vecDecay"] = np.asarray(ref.vecDecay, np.float64), decay
    assert want["vecReset"].sum() >= 5  # resets by -inf, -1e30 and -300 are in the rows
    for n in want:
        a, b = got[n], want[n]
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=n)
        assert not np.isnan(a).any(), n
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5, err_msg=n)


def _check_variant(name, dtype, options, grad_mode):
    inputs, cots = _inputs(dtype)
    kernel = get_mlstm_kernel("chunkwise_pallas", chunk_size=L, **dict(options))
    fn = lambda *a: kernel(*a, return_last_states=True, grad_mode=grad_mode)  # noqa: E731
    outs, grads = jax.jit(lambda i, c: outputs_and_grads_of(fn, i, c))(inputs, cots)
    ref_outs, ref_grads = _reference(dtype, grad_mode)
    assert outs["h"].dtype == jnp.dtype(dtype) and outs["C"].dtype == jnp.float32
    tol = TOL[dtype]
    assert_trees_close(outs, ref_outs, tol, f"{name} {grad_mode} outputs")
    if dtype == "bfloat16":  # dm0 is a difference of terms of the initial state's size: see below
        grads, ref_grads = dict(grads), dict(ref_grads)
        _check_dm0_bf16(grads.pop("m0"), ref_grads.pop("m0"), ref_grads, to_float64(inputs), tol)
    assert_trees_close(grads, ref_grads, tol, f"{name} {grad_mode} gradients")


def _check_dm0_bf16(dm0, dm0_ref, grads_ref, inputs64, tol):
    """As in test_chunkwise_pallas: with bf16 products the error of dm0 = <dC0, C0> + <dn0, n0> +
    (pull-back through m) is measured against the size of its parts."""
    c0, n0 = inputs64[5], inputs64[6]
    scale = jnp.abs(jnp.sum(grads_ref["c0"] * c0, axis=(2, 3))) + jnp.abs(jnp.sum(grads_ref["n0"] * n0, axis=2))
    err = float(jnp.linalg.norm(dm0.astype(jnp.float64) - dm0_ref)) / float(jnp.linalg.norm(scale))
    assert np.isfinite(err) and err < tol, f"grad m0: error {err:.3e} relative to its parts"


# ----------------------------------------------------------------------------- the pieces
def _gates(seed=3, BH=3, S_=48):
    rng = np.random.default_rng(seed)
    i = rng.normal(0.0, 3.0, (BH, S_)).astype(np.float32)
    logf = np.asarray(jax.nn.log_sigmoid(rng.normal(2.0, 2.0, (BH, S_))), np.float32)
    logf[0, [0, 16, 21]] = -np.inf
    logf[1, [15, 30]] = -1e30
    logf[2, 7] = -300.0  # a reset by weight, not by -inf
    i[1, [4, 17]] = -np.inf
    i[:, -5:] = gates.CLOSED_INPUT_GATE  # time padding
    logf[:, -5:] = 0.0
    m0 = np.array([0.5, -20.0, 12.0], np.float32)
    return jnp.asarray(i), jnp.asarray(logf), jnp.asarray(m0)


def _params(**kw):
    return chunkwise_kernel_params(S=48, DHQK=16, DHV=32, dtype=jnp.float32, chunk_size=L, **kw)


def _chunk_form(g, name):
    """A gate vector of a Pallas gate kernel, vecDecay in the (BH, NC) form of the XLA path."""
    x = getattr(g, name)
    return gates.chunk_decays(x, L, x.shape[1] // L) if name == "vecDecay" else x


def test_gate_vectors_kernel_equals_xla():
    i, logf, m0 = _gates()
    vecM = gates.max_state_scan(i, logf, m0)
    ref = gates.kernel_gates(i, logf, vecM, m0, L)
    got = jax.jit(lambda *a: gate_kernels.gate_vectors(*a, params=_params(), interpret=True))(i, logf, vecM, m0)
    assert int(ref.vecReset.sum()) >= 6  # the test has resets of every kind
    np.testing.assert_array_equal(np.asarray(got.vecReset), np.asarray(ref.vecReset))
    np.testing.assert_array_equal(np.asarray(got.vecStart), np.asarray(ref.vecStart))
    for name in ("vecQlog", "vecKlog", "vecWinter", "vecWstate", "vecDecay", "scaM_borders"):
        a, b = np.asarray(_chunk_form(got, name)), np.asarray(getattr(ref, name))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=name)
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5, err_msg=name)


def test_gate_vectors_without_max_state():
    """max_state=False (the sigmoid input-gate variant): m == 0 everywhere, whatever vecM says."""
    i, logf, m0 = _gates()
    i = jax.nn.log_sigmoid(i)
    zeros = jnp.zeros_like(i)
    ref = gates.kernel_gates(i, logf, zeros, jnp.zeros_like(m0), L)
    got = gate_kernels.gate_vectors(i, logf, zeros + 5.0, m0, params=_params(), interpret=True, max_state=False)
    np.testing.assert_array_equal(np.asarray(got.vecReset), np.asarray(ref.vecReset))
    for name in ("vecQlog", "vecKlog", "vecWinter", "vecWstate", "vecDecay", "scaM_borders"):
        a, b = np.asarray(_chunk_form(got, name)), np.asarray(getattr(ref, name))
        fin = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), fin, err_msg=name)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5, err_msg=name)


def test_fused_gate_kernels_equal_xla():
    """gates_impl="fused": m and the gate vectors from one kernel; gate_grads_impl="fused": the gate
    gradients plus the m pull-back (the jax.vjp of the XLA scan) from one kernel."""
    i, logf, m0 = _gates()
    vecM = gates.max_state_scan(i, logf, m0)
    ref = gates.kernel_gates(i, logf, vecM, m0, L)
    p = _params()
    g, m = jax.jit(lambda *a: gate_kernels.fused_gate_vectors(*a, params=p, interpret=True))(i, logf, m0)
    np.testing.assert_allclose(np.asarray(m), np.asarray(vecM), rtol=1e-6, atol=1e-6)
    # the m scan in sub-blocks (two per chunk here; the default 32 is the whole chunk at L = 16)
    _, m_sub = jax.jit(lambda *a: gate_kernels.fused_gate_vectors(*a, params=p, interpret=True, m_block=8))(
        i, logf, m0)
    np.testing.assert_allclose(np.asarray(m_sub), np.asarray(vecM), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g.vecReset), np.asarray(ref.vecReset))
    np.testing.assert_array_equal(np.asarray(g.vecStart), np.asarray(ref.vecStart))
    for name in ("vecQlog", "vecKlog", "vecWinter", "vecWstate", "vecDecay", "scaM_borders"):
        a, b = np.asarray(_chunk_form(g, name)), np.asarray(getattr(ref, name))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=name)
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5, err_msg=name)
    rng = np.random.default_rng(5)
    dqq, dkk, dks, dm = (jnp.asarray(rng.normal(size=i.shape), jnp.float32) for _ in range(4))
    ddecay = jnp.asarray(rng.normal(size=(3, 48 // L)), jnp.float32)
    dI, dLogF = gates.gate_gradients(dqq, dkk, dks, ddecay, ref.vecReset, L)
    dI_m, dLogF_m, dM0_m = gates.max_state_pullback(i, logf, m0, dm)
    got = jax.jit(lambda *a: gate_kernels.fused_gate_gradients(*a, params=p, interpret=True))(
        i, logf, vecM, m0, dm, dqq, dkk, dks, ddecay, ref.vecReset)
    assert float(jnp.abs(dM0_m).max()) > 0.1  # the pull-back reaches m0 in this test
    for a, b, name in zip(got, (dI + dI_m, dLogF + dLogF_m, dM0_m), ("dI", "dLogF", "dM0")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_fused_dkdv_kernel_equals_separate_kernels():
    """fuse_dkdv: the one kernel's dK, <dk, k>, <dk_state, k>, dV against the dK and dV kernels, with
    several head-dim tiles of each contraction and a reset inside a chunk (vecStart)."""
    BH, S_, DK, DV, Lc = 2, 64, 32, 64, 32
    p = chunkwise_kernel_params(S=S_, DHQK=DK, DHV=DV, dtype=jnp.float32, chunk_size=Lc, siz_b_L_parallel=16,
                                siz_b_L_loop=16, siz_b_DH_loop=16)
    ks = jax.random.split(jax.random.PRNGKey(21), 11)
    f32 = jnp.float32
    q, k = (jax.random.normal(ks[i], (BH, S_, DK), f32) for i in range(2))
    v, dh = (jax.random.normal(ks[i], (BH, S_, DV), f32) for i in range(2, 4))
    qlog, klog = (-jax.random.uniform(ks[i], (BH, S_), f32) for i in range(4, 6))
    wstate, den_inv, dnq = (jax.random.uniform(ks[i], (BH, S_), f32) for i in range(6, 9))
    start = jnp.broadcast_to((jnp.arange(S_) // Lc * Lc).astype(jnp.int32), (BH, S_)).at[:, 40:].set(40)
    dC = jax.random.normal(ks[9], (BH, S_ // Lc + 1, DK, DV), f32)
    dN = jax.random.normal(ks[10], (BH, S_ // Lc + 1, DK), f32)
    kw = dict(params=p, qk_scale=0.3, output_dtype=f32, interpret=True)
    want = parallel_bw_dk(q, k, v, dh, qlog, klog, wstate, den_inv, dnq, start, dC, dN, **kw)
    want = want + (parallel_bw_dv(q, k, dh, qlog, klog, wstate, den_inv, start, dC, **kw),)
    got = parallel_bw_dkdv(q, k, v, dh, qlog, klog, wstate, den_inv, dnq, start, dC, dN, **kw)
    for a, b, name in zip(got, want, ("dK", "dkk", "dkk_state", "dV")):
        b = np.asarray(b)
        assert np.abs(b).max() > 1.0, name
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=name)


def test_gate_gradients_kernel_equals_xla():
    i, logf, m0 = _gates()
    vecM = gates.max_state_scan(i, logf, m0)
    reset = gates.kernel_gates(i, logf, vecM, m0, L).vecReset
    rng = np.random.default_rng(5)
    dqq, dkk, dks = (jnp.asarray(rng.normal(size=i.shape), jnp.float32) for _ in range(3))
    ddecay = jnp.asarray(rng.normal(size=(3, 48 // L)), jnp.float32)
    ref = gates.gate_gradients(dqq, dkk, dks, ddecay, reset, L)
    got = gate_kernels.gate_gradients(dqq, dkk, dks, ddecay, reset, params=_params(), interpret=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=1e-5, atol=1e-5)


def test_linear_max_state_scan_and_pullback():
    i, logf, m0 = _gates()
    i, logf, m0 = to_float64((i, logf, m0))
    lin = gates.max_state_scan_for("linear", L)
    np.testing.assert_allclose(lin(i, logf, m0), gates.max_state_scan(i, logf, m0), rtol=1e-12, atol=1e-12)
    dm = jnp.asarray(np.random.default_rng(7).normal(size=i.shape))
    got = gates.max_state_pullback(i, logf, m0, dm, scan=lin)
    ref = gates.max_state_pullback(i, logf, m0, dm)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        gates.max_state_scan_linear(i[:, :40], logf[:, :40], m0, 16)


def _sequential_max_states(i, logf, m0):
    """m_t = max(logf_t + m_{t-1}, i_t), one step at a time (the reference's recurrence)."""

    def step(m_prev, x):
        m = jnp.maximum(x[1] + m_prev, x[0])
        return m, m

    return jax.lax.scan(step, m0, (i.T, logf.T))[1].T


@pytest.mark.parametrize("ties", [False, True], ids=["no-ties", "ties"])
def test_recurrent_pullback_equals_sequential_autodiff(ties):
    """``max_state_pullback_recurrent`` (the exact path's pull-back of dm) against ``jax.vjp`` of the
    step-by-step recurrence in float64, with resets (f = -inf, -1e30, -300), i = -inf and the time
    padding; with ``ties`` also i_t = logf_t + m_{t-1} exactly (i = -inf after logf = -inf, and a
    step where both are set equal), where the split must be jnp.maximum's 1/2."""
    i, logf, m0 = to_float64(_gates())
    if ties:
        i = i.at[0, 16].set(-jnp.inf)  # logf = -inf there too: -inf = -inf
        m_seq = _sequential_max_states(i, logf, m0)
        i = i.at[2, 10].set(logf[2, 10] + m_seq[2, 9])  # an exact tie of two finite values
    dm = jnp.asarray(np.random.default_rng(11).normal(size=i.shape))
    vecM = gates.max_state_scan(i, logf, m0)
    got = gates.max_state_pullback_recurrent(i, logf, m0, vecM, dm)
    _, vjp = jax.vjp(_sequential_max_states, i, logf, m0)
    want = vjp(dm)
    for a, b, name in zip(got, want, ("dI", "dLogF", "dM0")):
        assert not np.isnan(np.asarray(a)).any(), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12, err_msg=name)
    assert float(jnp.abs(got[2]).max()) > 0.1  # the pull-back reaches m0
    if not ties:  # away from ties: the vjp of the associative scan, summed in another order
        for a, b in zip(got, gates.max_state_pullback(i, logf, m0, dm)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_recurrent_kernels_16bit_states_and_decay_grads():
    """states_dtype: the C / dC states are the fp32 ones rounded once; the fp32 last state and dC0
    are exact; the fused decay inner products equal the XLA einsum over the states."""
    BH, S_ = 2, 48
    key = jax.random.PRNGKey(11)
    ks = jax.random.split(key, 8)
    kb = jax.random.normal(ks[0], (BH, S_, 16)).astype(jnp.bfloat16)
    vb = jax.random.normal(ks[1], (BH, S_, 32)).astype(jnp.bfloat16)
    f32 = jnp.float32
    w = jax.random.uniform(ks[2], (BH, S_), f32)
    decay = jax.random.uniform(ks[3], (BH, S_ // L), f32).at[0, 1].set(0.0)
    C0, n0 = jax.random.normal(ks[4], (BH, 16, 32), f32), jax.random.normal(ks[5], (BH, 16), f32)
    p = chunkwise_kernel_params(S=S_, DHQK=16, DHV=32, dtype=jnp.bfloat16, chunk_size=L)
    C32, n32 = recurrent_fw_states(kb, vb, w, decay, C0, n0, params=p, interpret=True)
    C16, n16, Clast = recurrent_fw_states(kb, vb, w, decay, C0, n0, params=p, interpret=True,
                                          states_dtype=jnp.bfloat16)
    # the decay in the gate kernels' (BH, S) layout and the zero initial state (not loaded)
    decay_rep = jnp.repeat(decay, L, axis=1)
    Cz, nz = recurrent_fw_states(kb, vb, w, decay, jnp.zeros_like(C0), jnp.zeros_like(n0), params=p, interpret=True)
    Cz2, nz2 = recurrent_fw_states(kb, vb, w, decay_rep, None, None, params=p, interpret=True)
    np.testing.assert_array_equal(np.asarray(Cz2), np.asarray(Cz))
    np.testing.assert_array_equal(np.asarray(nz2), np.asarray(nz))
    with pytest.raises(ValueError, match="both"):
        recurrent_fw_states(kb, vb, w, decay, C0, None, params=p, interpret=True)
    with pytest.raises(ValueError, match="columns"):
        recurrent_fw_states(kb, vb, w, decay[:, :2], C0, n0, params=p, interpret=True)
    assert C16.dtype == jnp.bfloat16 and Clast.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(C16), np.asarray(C32.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(Clast), np.asarray(C32[:, -1]))
    np.testing.assert_array_equal(np.asarray(n16), np.asarray(n32))
    qb, dhb = kb[:, ::-1], jax.random.normal(ks[6], (BH, S_, 32), f32).astype(jnp.bfloat16)
    den, dnq = 1.0 + w, jax.random.normal(ks[7], (BH, S_), f32)
    dCl, dnl = C0[::-1], n0[::-1]
    kw = dict(params=p, qk_scale=0.25, interpret=True)
    dC32, dn32 = recurrent_bw_states(qb, dhb, w, den, dnq, decay, dCl, dnl, **kw)
    dC32r, dn32r = recurrent_bw_states(qb, dhb, w, den, dnq, decay_rep, dCl, dnl, **kw)
    np.testing.assert_array_equal(np.asarray(dC32r), np.asarray(dC32))
    np.testing.assert_array_equal(np.asarray(dn32r), np.asarray(dn32))
    dC16, dn16, dC0, ddec = recurrent_bw_states(qb, dhb, w, den, dnq, decay, dCl, dnl, **kw,
                                                states_dtype=jnp.bfloat16, matC_states=C16, vecN_states=n16)
    np.testing.assert_array_equal(np.asarray(dC16), np.asarray(dC32.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(dC0), np.asarray(dC32[:, 0]))
    want = decay * (jnp.einsum("bkij,bkij->bk", dC32[:, 1:], C16[:, :-1].astype(jnp.float32))
                    + jnp.einsum("bki,bki->bk", dn32[:, 1:], n16[:, :-1]))
    np.testing.assert_allclose(np.asarray(ddec), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_variant_option_validation_and_registry():
    p = _params(m_scan="linear", gates_impl="pallas", gate_grads_impl="pallas", states_bf16=True)
    assert (p.m_scan, p.gates_impl, p.gate_grads_impl, p.states_bf16) == ("linear", "pallas", "pallas", True)
    d = _params()
    assert (d.m_scan, d.gates_impl, d.gate_grads_impl, d.states_bf16) == ("associative", "xla", "xla", False)
    f = _params(gates_impl="fused", gate_grads_impl="fused", save_gates=True, fuse_dkdv=True)
    assert (f.gates_impl, f.gate_grads_impl, f.save_gates, f.fuse_dkdv) == ("fused", "fused", True, True)
    assert (d.save_gates, d.fuse_dkdv) == (False, False)
    for bad in (dict(m_scan="sequential"), dict(gates_impl="triton"), dict(gate_grads_impl=1),
                dict(states_bf16="yes"), dict(save_gates=1), dict(fuse_dkdv="on")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _params(**bad)
    get_mlstm_kernel("chunkwise_pallas", m_scan="linear", gates_impl="pallas", gate_grads_impl="pallas",
                     states_bf16=True)
