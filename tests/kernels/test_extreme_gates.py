"""Extreme valid gates give the exact answer in every kernel (issue 8, finding 3).

A forget-gate pre-activation f = -inf (a forget gate of exactly 0), f = -1e30 or f = -1e3 (gates
whose exp underflows even in float64) at any position (start, middle, either side of a chunk edge,
end) equals a fresh start from that position: the state before it dropped (C = n = 0, m = 0). An
input gate i = -inf is an input that contributes nothing. The reference is the recurrent
definition in float64 with that reset written out (``_fresh_start_reference``); outputs, last
states and every gradient are compared, and NaN fails every comparison.

Pallas kernels run in interpret mode on CPU (compiled on the GPU machine); one jitted function per
kernel serves every gate pattern (same shapes), so each kernel compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import get_mlstm_kernel, get_mlstm_step_kernel
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
from xlstm_jax.kernels.mlstm_chunkwise.pallas import gates
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef import triton_fwbw as stablef
from xlstm_jax.testing import assert_trees_close, mlstm_inputs, outputs_and_grads_of, to_float64

B, NH, S, DHQK, DHV, L = 1, 2, 40, 16, 16, 16
POSITIONS = (0, 7, 15, 16, 39)  # start, middle, chunk end, chunk start, sequence end
F64_TOL = 1e-10
F32_TOL = 2e-4  # the Pallas kernels compute in float32
NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _pattern(name: str):
    """(positions of i = -inf, {position: f value}) of a gate pattern."""
    if name == "f=-inf":
        return (), {p: -np.inf for p in POSITIONS}
    if name == "f=-1e30":
        return (), {p: -1e30 for p in POSITIONS}
    if name == "f=-1e3":
        return (), {p: -1e3 for p in POSITIONS}
    if name == "i=-inf":
        return POSITIONS, {}
    if name == "mixed":  # every kind in one sequence, at different positions
        return (5, 30, 38), {0: -np.inf, 16: -np.inf, 15: -1e30, 27: -1e30, 33: -1e3, 39: -1e30}
    raise ValueError(name)


PATTERNS = ("f=-inf", "f=-1e30", "f=-1e3", "i=-inf", "mixed")


def _inputs(pattern: str, dtype=jnp.float32):
    """(inputs, cotangents, reset mask (S,)) with the pattern's extreme gates."""
    key = jax.random.PRNGKey(20261201)
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=dtype, gate_scale=2.0,
                                             initial_states=True, m_initial_scale=3.0)
    i_pos, f_vals = _pattern(pattern)
    for p in i_pos:
        i = i.at[:, :, p].set(-jnp.inf)
    for p, val in f_vals.items():
        f = f.at[:, :, p].set(val)
    reset = np.zeros(S, bool)
    reset[list(f_vals)] = True
    ks = jax.random.split(jax.random.fold_in(key, 1), 4)
    cots = (
        jax.random.normal(ks[0], (B, NH, S, DHV)), jax.random.normal(ks[1], (B, NH, DHQK, DHV)),
        jax.random.normal(ks[2], (B, NH, DHQK)), jax.random.normal(ks[3], (B, NH)),
    )
    return (q, k, v, i, f, c0, n0, m0), cots, jnp.asarray(reset)


def _fresh_start_reference(q, k, v, i, f, c0, n0, m0, reset, *, grad_mode="exact", eps=1e-6):
    """The recurrent cell in float64, with the state dropped (C = n = 0, m = 0) before every reset."""
    sg = jax.lax.stop_gradient if grad_mode == "tfla" else (lambda x: x)
    qk_scale = q.shape[-1] ** -0.5

    def step(carry, x):
        C, n, m = carry
        qt, kt, vt, it, ft, rt = x
        C, n, m = jnp.where(rt, 0.0, C), jnp.where(rt, 0.0, n), jnp.where(rt, 0.0, m)
        logf = jax.nn.log_sigmoid(ft)
        m_new = sg(jnp.maximum(logf + m, it))
        fa, ia = jnp.exp(logf + m - m_new), jnp.exp(it - m_new)
        C = fa[..., None, None] * C + ia[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = fa[..., None] * n + ia[..., None] * kt
        qs = qt * qk_scale
        den = sg(jnp.maximum(jnp.abs(jnp.einsum("bhd,bhd->bh", qs, n)), jnp.exp(-m_new)) + eps)
        return (C, n, m_new), jnp.einsum("bhd,bhdv->bhv", qs, C) / den[..., None]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f)) + (reset,)
    (C, n, m), hs = jax.lax.scan(step, (c0, n0, m0), xs)
    return jnp.moveaxis(hs, 0, 2), (C, n, m)


@functools.lru_cache(maxsize=None)
def _reference_fn(grad_mode):
    def run(inputs, cots, reset):
        return outputs_and_grads_of(
            lambda *a: _fresh_start_reference(*a, reset, grad_mode=grad_mode), inputs, cots
        )

    return jax.jit(run)


def _reference(pattern, grad_mode="exact"):
    inputs, cots, reset = _inputs(pattern)
    return _reference_fn(grad_mode)(to_float64(inputs), to_float64(cots), reset)


@functools.lru_cache(maxsize=None)
def _kernel_fn(name, grad_mode, options):
    kernel = get_mlstm_kernel(name, **dict(options))
    fn = lambda *a: kernel(*a, return_last_states=True, grad_mode=grad_mode)  # noqa: E731
    return jax.jit(lambda inputs, cots: outputs_and_grads_of(fn, inputs, cots))


def _compare(got, ref, tol, what):
    assert_trees_close(got[0], ref[0], tol, f"{what} outputs")
    assert_trees_close(got[1], ref[1], tol, f"{what} gradients")


# ----------------------------------------------------------------------------- registry kernels
XLA_KERNELS = [
    ("parallel_native", ()),
    ("recurrent_native", ()),
    ("chunkwise_native", (("chunk_size", L),)),
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name,options", XLA_KERNELS, ids=[k[0] for k in XLA_KERNELS])
def test_xla_kernels_float64(name, options, pattern):
    inputs, cots, _ = _inputs(pattern)
    got = _kernel_fn(name, "exact", options)(to_float64(inputs), to_float64(cots))
    _compare(got, _reference(pattern), F64_TOL, f"{name} {pattern}")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunkwise_pallas(pattern):
    inputs, cots, _ = _inputs(pattern)
    got = _kernel_fn("chunkwise_pallas", "exact", (("chunk_size", L),))(inputs, cots)
    _compare(got, _reference(pattern), F32_TOL, f"chunkwise_pallas {pattern}")


def test_chunkwise_pallas_tfla_gradients():
    inputs, cots, _ = _inputs("mixed")
    got = _kernel_fn("chunkwise_pallas", "tfla", (("chunk_size", L),))(inputs, cots)
    _compare(got, _reference("mixed", "tfla"), F32_TOL, "chunkwise_pallas tfla mixed")


def test_pallas_gate_sums_keep_their_precision():
    """With a reset in the chunk, the kernels' log weights are sums over one segment only: the
    intra-chunk exponents of the pairs after f = -1e30 equal those of a fresh start (no |f| * eps
    rounding), and the cross-reset pairs are masked by vecStart."""
    i = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32)), jnp.float32)
    logf = jax.nn.log_sigmoid(jnp.asarray(np.random.default_rng(1).normal(3.0, 1.0, (1, 32)), jnp.float32))
    m0 = jnp.zeros((1,), jnp.float32)
    cut = 9
    hard = logf.at[:, cut].set(-1e30)
    scan = jax.jit(gates.max_state_scan)
    vecM = scan(i, hard, m0)
    g = jax.jit(gates.kernel_gates, static_argnums=4)(i, hard, vecM, m0, 16)
    assert bool(g.vecReset[0, cut]) and int(g.vecReset.sum()) == 1
    np.testing.assert_array_equal(np.asarray(g.vecStart[0, :16]), [0] * cut + [cut] * (16 - cut))
    np.testing.assert_array_equal(np.asarray(g.vecStart[0, 16:]), [16] * 16)
    # the same segment run from scratch (m = 0 before it): identical in-segment exponent differences
    seg_i, seg_f = i[:, cut:16], logf[:, cut:16].at[:, 0].set(-jnp.inf)
    seg_m = scan(seg_i, seg_f, m0)
    np.testing.assert_allclose(vecM[:, cut:16], seg_m, rtol=0, atol=1e-6)
    tri = jnp.tril(jnp.ones((16 - cut, 16 - cut), bool))
    got = (g.vecQlog[0, cut:16, None] + g.vecKlog[0, None, cut:16])
    want = (jnp.cumsum(seg_f[0].at[0].set(0.0))[:, None] - jnp.cumsum(seg_f[0].at[0].set(0.0))[None, :]
            + seg_i[0][None, :] - seg_m[0][:, None]) * gates.LOG2_E
    np.testing.assert_allclose(jnp.where(tri, got, 0.0), jnp.where(tri, want, 0.0), rtol=0, atol=2e-5)
    assert bool(jnp.all(jnp.isfinite(g.vecQlog))) and bool(jnp.all(jnp.isfinite(g.vecKlog)))
    assert float(g.vecWinter[0, cut:16].max()) == 0.0 and float(g.vecDecay[0, 0]) == 0.0
    assert float(g.vecWstate[0, :cut].max()) == 0.0


# ----------------------------------------------------------------------------- seed entry points
def _seed_fwbw(fn):
    return jax.jit(lambda inputs, cots: outputs_and_grads_of(fn, inputs, cots))


SEED_FNS = {
    "seed000-triton_stablef": lambda *a: stablef.mlstm_chunkwise_triton_stablef(
        *a, return_last_states=True, chunk_size=L),
    "v5-mlstm_chunkwise_max_triton": lambda *a: triton_fwbw.mlstm_chunkwise_max_triton(
        *a, return_last_states=True, chunk_size=L),
}


@pytest.mark.parametrize("name", list(SEED_FNS))
def test_seed_entry_points(name):
    inputs, cots, _ = _inputs("mixed")
    _compare(_seed_fwbw(SEED_FNS[name])(inputs, cots), _reference("mixed"), F32_TOL, name)


def test_seed001_combined_fw_and_bw():
    inputs, cots, _ = _inputs("mixed")
    ref_outs, ref_grads = _reference("mixed")
    h, vecN, vecM, last, _ = jax.jit(lambda *a: _combined_fw.mlstm_chunkwise_fw(
        *a, return_last_states=True, chunk_size_intra=L, chunk_size_inter=L, eps=1e-6))(*inputs)
    assert_trees_close({"h": h, "C": last[0], "n": last[1], "m": last[2]}, ref_outs, F32_TOL, "fw")
    assert bool(jnp.all(jnp.isfinite(vecN))) and bool(jnp.all(jnp.isfinite(vecM)))
    dh, dC, dn, dm = cots
    grads = jax.jit(lambda *a: _combined_bw.mlstm_chunkwise_bw(
        *a, matDeltaH=dh, matDeltaC_last=dC, vecDeltaN_last=dn, scaDeltaM_last=dm, chunk_size=L,
        eps=1e-6))(*inputs)
    assert_trees_close(dict(zip(NAMES, grads)), ref_grads, F32_TOL, "bw")


def test_seed_stage_pipeline():
    """Seeds 001/003 stage by stage (recurrent fw -> parallel fw -> recurrent bw -> dQ, dK, dV) with
    every kind of extreme gate: h and dV exact, dQ and dK the TFLA-convention gradients. The
    chunked gates need S to be a multiple of the chunk: the first 32 steps."""
    S32 = 32
    inputs, cots, reset = _inputs("mixed")
    cut = lambda x: x[:, :, :S32]  # noqa: E731
    args = tuple(map(cut, inputs[:5])) + inputs[5:]
    dh, reset = cut(cots[0]), reset[:S32]

    @jax.jit
    def stages(q, k, v, i, f, c0, n0, m0, dh):
        vecB, vecA = _chunkwise_gates.compute_chunkwise_log_gates_vecB_vecA(i, f, L, scaM_initial=m0)
        Cs, Ns, Ms = _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, c0, n0, m0, chunk_size=L)
        h, vecN, vecM = _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, Cs, Ns, Ms, chunk_size=L)
        dCs = _recurrent_bw.mlstm_chunkwise__recurrent_bw_dC(q, f, Ms, vecM, dh, vecN, None, chunk_size=L, eps=1e-6)
        ic = i.reshape(B, NH, S32 // L, L)
        common = (q, k, v, ic, vecA, vecB, Cs, Ns, Ms, vecN, vecM, dh, dCs)
        dQ = _parallel_bw_dQ.mlstm_chunkwise__parallel_bw_dQ(*common, chunk_size=L, eps=1e-6)
        dK = _parallel_bw_dK.mlstm_chunkwise__parallel_bw_dK(*common, chunk_size=L, eps=1e-6)
        dV = _parallel_bw_dV.mlstm_chunkwise__parallel_bw_dV(*common, chunk_size=L, eps=1e-6)
        return h, dQ, dK, dV

    h, dQ, dK, dV = stages(*args, dh)
    args64 = to_float64(args)
    for mode, wanted in (("exact", {"v": dV}), ("tfla", {"q": dQ, "k": dK})):
        def loss(*a):
            return jnp.sum(_fresh_start_reference(*a, reset, grad_mode=mode)[0] * dh)

        g = dict(zip(NAMES, jax.grad(loss, argnums=tuple(range(8)))(*args64)))
        assert_trees_close(wanted, {n: g[n] for n in wanted}, F32_TOL, f"stage gradients ({mode})")
    assert_trees_close(h, _fresh_start_reference(*args64, reset)[0], F32_TOL, "stage h")


# ----------------------------------------------------------------------------- step kernels
@pytest.mark.parametrize("pattern", ["f=-inf", "f=-1e30", "i=-inf"])
@pytest.mark.parametrize("name", ["recurrent_native", "recurrent_pallas"])
def test_step_kernels(name, pattern):
    """A step kernel over the sequence (lax.scan): h at every step and the last states."""
    inputs, cots, reset = _inputs(pattern)
    q, k, v, i, f, c0, n0, m0 = inputs
    step = get_mlstm_step_kernel(name)

    @jax.jit
    def run(state, xs):
        def body(carry, x):
            h, new = step(*carry, *x)
            return tuple(new), h

        last, hs = jax.lax.scan(body, state, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
        return jnp.moveaxis(hs, 0, 2), last

    h, (C, n, m) = run((c0, n0, m0), (q, k, v, i, f))
    h_ref, (C_ref, n_ref, m_ref) = _fresh_start_reference(*to_float64(inputs), reset)
    assert_trees_close({"h": h, "C": C, "n": n, "m": m}, {"h": h_ref, "C": C_ref, "n": n_ref, "m": m_ref},
                       F32_TOL, f"{name} {pattern}")
