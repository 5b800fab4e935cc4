"""Pallas kernels for the O(S) gate glue of the chunkwise family (``gates_impl`` / ``gate_grads_impl``).

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, NC = S / L. The XLA versions
(``gates.kernel_gates``, ``gates.gate_gradients``) run as many small passes (associative scans of
depth log2(L), concatenations, reshapes); here one program per (batch, head) row reads each input
vector once and writes each output once.

``gate_vectors`` (forward gate preparation, ``gates_impl="pallas"``). Grid (BH,). The program
walks the NC chunks in order (``fori_loop``) carrying m_{k-1}, the max state entering the chunk; per
chunk it loads i, logf, m (L values each) and computes, with (L, L) masked reductions in registers
instead of scans (exact sums of the same terms as the XLA path, no differences of partial sums):

    reset_t   = logf_t + m_{t-1} - m_t < -104              (m_{t-1}: m shifted by one, m_{k-1} first)
    z_t       = latest reset <= t in the chunk (-1: none)    (masked max over s <= t)
    b_t       = sum_{z_t < s <= t} logf_s                    (a reset's own logf enters no sum)
    a_s       = i_s + sum_{r > s} logf_r,  -inf when a reset follows s in the chunk
    g_k       = b_{L-1}, -inf if the chunk holds a reset

and writes vecQlog, vecKlog, vecWinter, vecWstate, vecStart, the resets (int32) and vecDecay_k
exactly as ``gates.kernel_gates_from_chunk_gates`` defines them. The m scan itself stays in XLA
(``gates.max_state_scan`` / ``max_state_scan_linear``): a (max, +) scan needs a cumulative max,
which Pallas' Triton lowering does not have, and the (L, L) form would need differences of sums
(inexact for f = -1e30). With ``max_state=False`` (the sigmoid input-gate variant, m == 0) the
kernel reads no m and takes m == 0 everywhere.

``gate_gradients`` (backward, ``gate_grads_impl="pallas"``). Grid (BH,); per chunk, from <dq, q>,
<dk, k>, <dk, k>_state, the decay term and the resets (see ``gates.gate_gradients``):

    dlogf_r = sum_{t >= r, no reset in (r, t]} (<dq_t,q_t> - <dk_t,k_t>)
              + [r >= last reset of the chunk] (sum_s <dk_s,k_s>_state + scaDdecay_k),   0 at resets

The suffix sum is a masked (L, L) row sum. The decay terms <dC_k, decay_k C_{k-1}> + <dn_k,
decay_k n_{k-1}> come from the recurrent backward kernel (``bw_recurrent``, ``decay_grads=True``)
instead of an XLA pass over both state arrays.

Block sizes: whole rows (S, NC) per program; the (L, L) temporaries are L^2 fp32 values (64 KB at
L = 128, held by ``num_warps`` warps). Launch: ``num_warps_inter`` warps, one stage.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import gates
from ._kernel_utils import launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def _latest_reset(reset, L):
    """(L,) int32: the latest s <= t with reset_s, -1 if none (a masked max over (L, L))."""
    t = jnp.arange(L, dtype=jnp.int32)[:, None]
    s = jnp.arange(L, dtype=jnp.int32)[None, :]
    cand = jnp.where((s <= t) & (reset[None, :] != 0), s, jnp.int32(-1))
    return jnp.max(cand, axis=1)


def gate_vectors_kernel(
    vecI_ref,  # (S,)
    vecLogF_ref,  # (S,)
    vecM_ref,  # (S,)
    scaM0_ref,  # (1,)
    vecQlog_ref,  # out (S,)
    vecKlog_ref,  # out (S,)
    vecWinter_ref,  # out (S,)
    vecWstate_ref,  # out (S,)
    vecStart_ref,  # out (S,) int32
    vecReset_ref,  # out (S,) int32
    vecDecay_ref,  # out (NC,)
    *,
    NC: int,
    L: int,
    max_state: bool,
):
    """Kernel body of one (batch*head) row: every chunk in order."""
    idx = jnp.arange(L, dtype=jnp.int32)
    t_ = idx[:, None]
    s_ = idx[None, :]

    def chunk(k, m_border):
        c0 = pl.multiple_of(k * L, L)
        vecI = vecI_ref[pl.ds(c0, L)]
        vecLogF = vecLogF_ref[pl.ds(c0, L)]
        if max_state:
            vecM = vecM_ref[pl.ds(c0, L)]
            m_next = vecM_ref[c0 + L - 1]
            # m_{t-1}: m shifted by one step, the entering m first
            shifted = jnp.sum(jnp.where(s_ == t_ - 1, vecM[None, :], 0.0), axis=1)
            vecMprev = jnp.where(idx == 0, m_border, shifted)
        else:
            vecM = jnp.zeros((L,), _F32)
            m_next = jnp.float32(0.0)
            vecMprev = vecM
        reset = (vecLogF + vecMprev - vecM < -gates.RESET_LOG_WEIGHT).astype(jnp.int32)
        latest = _latest_reset(reset, L)
        last = jnp.max(jnp.where(reset != 0, idx, jnp.int32(-1)))
        logf = jnp.where(reset != 0, 0.0, vecLogF)  # a reset's logf enters no sum
        vecB = jnp.sum(jnp.where((s_ <= t_) & (s_ > latest[:, None]), logf[None, :], 0.0), axis=1)
        rev_excl = jnp.sum(jnp.where(s_ > t_, logf[None, :], 0.0), axis=1)  # sum_{r > s}, row s
        vecA = jnp.where(idx < last, -jnp.inf, vecI + rev_excl)
        b_end = jnp.sum(jnp.where(idx > last, logf, 0.0))
        scaG = jnp.where(last >= 0, -jnp.inf, b_end)
        seen = latest >= 0
        vecQlog_ref[pl.ds(c0, L)] = (vecB - vecM) * gates.LOG2_E
        vecKlog_ref[pl.ds(c0, L)] = (vecI - vecB) * gates.LOG2_E
        vecWinter_ref[pl.ds(c0, L)] = jnp.where(seen, 0.0, jnp.exp(vecB + m_border - vecM))
        vecWstate_ref[pl.ds(c0, L)] = jnp.exp(vecA - m_next)
        vecStart_ref[pl.ds(c0, L)] = c0 + jnp.maximum(latest, 0)
        vecReset_ref[pl.ds(c0, L)] = reset
        vecDecay_ref[k] = jnp.exp(scaG + m_border - m_next)
        return m_next

    m0 = scaM0_ref[0] if max_state else jnp.float32(0.0)
    jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, m0)


def gate_vectors(
    vecI: jax.Array,  # (BH, S) float32
    vecLogF: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S); ignored with max_state=False
    scaM0: jax.Array,  # (BH,)
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
    max_state: bool = True,
) -> gates.KernelGates:
    """``gates.kernel_gates`` (no explicit resets) as one Pallas kernel; vecSeen is not returned (None).

    With ``max_state=False`` m == 0 everywhere (vecM, scaM0 unused; scaM_borders all 0).
    """
    BH, S = vecI.shape
    L = params.chunk_size_intra
    NC = S // L
    kernel = functools.partial(gate_vectors_kernel, NC=NC, L=L, max_state=bool(max_state))
    seq = pl.BlockSpec((None, S), lambda b: (b, 0))
    f32 = jax.ShapeDtypeStruct((BH, S), _F32)
    i32 = jax.ShapeDtypeStruct((BH, S), jnp.int32)
    qlog, klog, winter, wstate, start, reset, decay = launch(
        kernel,
        grid=(BH,),
        in_specs=[seq, seq, seq, pl.BlockSpec((None, 1), lambda b: (b, 0))],
        out_specs=[seq] * 6 + [pl.BlockSpec((None, NC), lambda b: (b, 0))],
        out_shape=[f32, f32, f32, f32, i32, i32, jax.ShapeDtypeStruct((BH, NC), _F32)],
        num_warps=params.num_warps_inter,
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_gate_vectors",
    )(vecI.astype(_F32), vecLogF.astype(_F32), vecM.astype(_F32), scaM0.astype(_F32).reshape(BH, 1))
    if max_state:
        scaM_borders = gates.border_max_states(vecM.astype(_F32), scaM0.astype(_F32), L)
    else:
        scaM_borders = jnp.zeros((BH, NC + 1), _F32)
    return gates.KernelGates(qlog, klog, winter, wstate, decay, scaM_borders, start, reset != 0, None)


def gate_gradients_kernel(
    vecDqq_ref,  # (S,)
    vecDkk_ref,  # (S,)
    vecDkkState_ref,  # (S,)
    scaDdecay_ref,  # (NC,)
    vecReset_ref,  # (S,) int32
    vecDLogF_ref,  # out (S,)
    *,
    NC: int,
    L: int,
):
    """Kernel body of one (batch*head) row: the dlogf of every chunk (independent chunks)."""
    idx = jnp.arange(L, dtype=jnp.int32)
    t_ = idx[None, :]  # summed index (columns)
    r_ = idx[:, None]  # output index (rows)

    def chunk(k, carry):
        c0 = pl.multiple_of(k * L, L)
        reset = vecReset_ref[pl.ds(c0, L)]
        x = vecDqq_ref[pl.ds(c0, L)] - vecDkk_ref[pl.ds(c0, L)]
        latest = _latest_reset(reset, L)
        # t >= r with no reset in (r, t], i.e. latest_t <= r
        suffix = jnp.sum(jnp.where((t_ >= r_) & (latest[None, :] <= r_), x[None, :], 0.0), axis=1)
        last = jnp.max(jnp.where(reset != 0, idx, jnp.int32(-1)))
        per_chunk = jnp.sum(vecDkkState_ref[pl.ds(c0, L)]) + scaDdecay_ref[k]
        dlogf = suffix + jnp.where(idx >= last, per_chunk, 0.0)
        vecDLogF_ref[pl.ds(c0, L)] = jnp.where(reset != 0, 0.0, dlogf)
        return carry

    jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, jnp.int32(0))


def gate_gradients(
    vecDqq: jax.Array,  # (BH, S)
    vecDkk: jax.Array,  # (BH, S)
    vecDkkState: jax.Array,  # (BH, S)
    scaDdecay: jax.Array,  # (BH, NC)
    vecReset: jax.Array,  # (BH, S) bool or int
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """``gates.gate_gradients`` as one Pallas kernel: (dI, dLogF) with every m held fixed."""
    BH, S = vecDqq.shape
    L = params.chunk_size_intra
    NC = S // L
    kernel = functools.partial(gate_gradients_kernel, NC=NC, L=L)
    seq = pl.BlockSpec((None, S), lambda b: (b, 0))
    dlogf = launch(
        kernel,
        grid=(BH,),
        in_specs=[seq, seq, seq, pl.BlockSpec((None, NC), lambda b: (b, 0)), seq],
        out_specs=seq,
        out_shape=jax.ShapeDtypeStruct((BH, S), _F32),
        num_warps=params.num_warps_inter,
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_gate_gradients",
    )(vecDqq.astype(_F32), vecDkk.astype(_F32), vecDkkState.astype(_F32), scaDdecay.astype(_F32),
      vecReset.astype(jnp.int32))
    return vecDkk, dlogf
