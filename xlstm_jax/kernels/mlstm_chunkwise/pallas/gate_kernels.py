"""Pallas kernels for the O(S) gate glue of the chunkwise family (``gates_impl`` / ``gate_grads_impl``).

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, NC = S / L. The XLA versions
(``gates.kernel_gates``, ``gates.gate_gradients``) run as many small passes (associative scans of
depth log2(L), concatenations, reshapes); here one program per (batch, head) row reads each input
vector once and writes each output once.

``gate_vectors`` (forward gate preparation, ``gates_impl="pallas"``). Grid (BH, NC): one program
per (row, chunk), all independent (the m scan is done before). A program loads i, logf, m of its
chunk (L values each) and m_{k-1} (the step before the chunk, m0 for the first) and computes, with
(L, L) masked reductions in registers instead of scans (exact sums of the same terms as the XLA
path, no differences of partial sums):

    reset_t   = logf_t + m_{t-1} - m_t < -104              (m_{t-1}: m shifted by one, m_{k-1} first)
    z_t       = latest reset <= t in the chunk (-1: none)    (masked max over s <= t)
    b_t       = sum_{z_t < s <= t} logf_s                    (a reset's own logf enters no sum)
    a_s       = i_s + sum_{r > s} logf_r,  -inf when a reset follows s in the chunk
    g_k       = b_{L-1}, -inf if the chunk holds a reset

and writes vecQlog, vecKlog, vecWinter, vecWstate, vecStart, the resets (int32) and vecDecay_k
(repeated over the chunk's L slots; the launcher keeps one) exactly as
``gates.kernel_gates_from_chunk_gates`` defines them. The m scan itself stays in XLA
(``gates.max_state_scan`` / ``max_state_scan_linear``): a (max, +) scan needs a cumulative max,
which Pallas' Triton lowering does not have, and the (L, L) form would need differences of sums
(inexact for f = -1e30). With ``max_state=False`` (the sigmoid input-gate variant, m == 0) the
kernel reads no m and takes m == 0 everywhere.

``gate_gradients`` (backward, ``gate_grads_impl="pallas"``). Grid (BH, NC); per chunk, from <dq, q>,
<dk, k>, <dk, k>_state, the decay term and the resets (see ``gates.gate_gradients``):

    dlogf_r = sum_{t >= r, no reset in (r, t]} (<dq_t,q_t> - <dk_t,k_t>)
              + [r >= last reset of the chunk] (sum_s <dk_s,k_s>_state + scaDdecay_k),   0 at resets

The suffix sum is a masked (L, L) row sum. The decay terms <dC_k, decay_k C_{k-1}> + <dn_k,
decay_k n_{k-1}> come from the recurrent backward kernel (``bw_recurrent``, ``decay_grads=True``)
instead of an XLA pass over both state arrays.

Block sizes: one chunk (L values) of every vector per program (plus the row of m, resp. of the
decay terms, for one scalar load); the (L, L) temporaries are L^2 fp32 values (64 KB at L = 128,
spread over the registers of 4 warps). Launch: 4 warps, one stage.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import gates
from ...pallas import _triton
from ._kernel_utils import launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def _latest_reset(reset, L):
    """(L,) int32: the latest s <= t with reset_s, -1 if none (a masked max over (L, L))."""
    t = jnp.arange(L, dtype=jnp.int32)[:, None]
    s = jnp.arange(L, dtype=jnp.int32)[None, :]
    cand = jnp.where((s <= t) & (reset[None, :] != 0), s, jnp.int32(-1))
    return jnp.max(cand, axis=1)


def _shift_down(x, d: int, L: int, fill):
    """(L,): x_{t-d} at t >= d, ``fill`` below (a masked (L, L) selection: exact, any values)."""
    idx = jnp.arange(L, dtype=jnp.int32)
    hit = idx[None, :] == idx[:, None] - d
    if fill == -jnp.inf:
        return jnp.max(jnp.where(hit, x[None, :], -jnp.inf), axis=1)
    return jnp.where(idx >= d, jnp.sum(jnp.where(hit, x[None, :], 0.0), axis=1), fill)


def gate_vectors_kernel(
    vecI_ref,  # (L,)
    vecLogF_ref,  # (L,)
    vecM_ref,  # (S,) the whole row (the entering m is the step before the chunk)
    scaM0_ref,  # (1,)
    vecQlog_ref,  # out (L,)
    vecKlog_ref,  # out (L,)
    vecWinter_ref,  # out (L,)
    vecWstate_ref,  # out (L,)
    vecStart_ref,  # out (L,) int32
    vecReset_ref,  # out (L,) int32
    vecDecay_ref,  # out (L,) the chunk's decay, repeated (sliced to (BH, NC) by the launcher)
    *,
    L: int,
    max_state: bool,
):
    """Kernel body of one (batch*head row, chunk) program."""
    k = pl.program_id(1)
    c0 = pl.multiple_of(k * L, L)
    idx = jnp.arange(L, dtype=jnp.int32)
    vecI = vecI_ref[...]
    vecLogF = vecLogF_ref[...]
    if max_state:
        vecM = vecM_ref[pl.ds(c0, L)]
        m_next = vecM_ref[c0 + L - 1]
        m_border = jnp.where(k > 0, vecM_ref[jnp.maximum(c0 - 1, 0)], scaM0_ref[0])
        vecMprev = jnp.where(idx == 0, m_border, _shift_down(vecM, 1, L, 0.0))
    else:
        vecM = jnp.zeros((L,), _F32)
        m_next = m_border = jnp.float32(0.0)
        vecMprev = vecM
    outs = _chunk_gate_vectors(vecI, vecLogF, vecM, vecMprev, m_border, m_next, c0, L)
    refs = (vecQlog_ref, vecKlog_ref, vecWinter_ref, vecWstate_ref, vecStart_ref, vecReset_ref, vecDecay_ref)
    for ref, val in zip(refs, outs):
        ref[...] = val


def _chunk_gate_vectors(vecI, vecLogF, vecM, vecMprev, m_border, m_next, c0, L):
    """The gate vectors of one chunk from its i, logf, m, m_{t-1} (all (L,)), the entering m and
    the chunk's last m (scalars): (vecQlog, vecKlog, vecWinter, vecWstate, vecStart, reset int32,
    the chunk's decay repeated over (L,)), the seven outputs of ``gate_vectors_kernel``."""
    idx = jnp.arange(L, dtype=jnp.int32)
    t_ = idx[:, None]
    s_ = idx[None, :]
    reset = (vecLogF + vecMprev - vecM < -gates.RESET_LOG_WEIGHT).astype(jnp.int32)
    latest = _latest_reset(reset, L)
    last = jnp.max(jnp.where(reset != 0, idx, jnp.int32(-1)))
    logf = jnp.where(reset != 0, 0.0, vecLogF)  # a reset's logf enters no sum
    vecB = jnp.sum(jnp.where((s_ <= t_) & (s_ > latest[:, None]), logf[None, :], 0.0), axis=1)
    rev_excl = jnp.sum(jnp.where(s_ > t_, logf[None, :], 0.0), axis=1)  # row s: sum_{r > s}
    vecQlog, vecKlog, vecWinter, vecWstate, vecStart, scaDecay = _vectors_from_sums(
        vecI, vecM, vecB, rev_excl, latest, last, m_border, m_next, c0, L)
    return vecQlog, vecKlog, vecWinter, vecWstate, vecStart, reset, jnp.full((L,), scaDecay, _F32)


def _vectors_from_sums(vecI, vecM, vecB, rev_excl, latest, last, m_prev, m_last, c0, L):
    """The kernel gate vectors of one chunk (``gates.kernel_gates_from_chunk_gates``) from its sums:
    b_t (vecB), sum_{r > s} logf_r (rev_excl), the latest reset <= t (latest, -1: none) and the
    chunk's last reset (last), the entering and the chunk's last m. Returns (vecQlog, vecKlog,
    vecWinter, vecWstate, vecStart, the chunk's decay as a scalar)."""
    idx = jnp.arange(L, dtype=jnp.int32)
    vecA = jnp.where(idx < last, -jnp.inf, vecI + rev_excl)
    b_end = jnp.sum(jnp.where(idx == L - 1, vecB, 0.0))  # b_{L-1}: the same rounding as vecB
    scaG = jnp.where(last >= 0, -jnp.inf, b_end)
    seen = latest >= 0
    return (
        (vecB - vecM) * gates.LOG2_E,
        (vecI - vecB) * gates.LOG2_E,
        jnp.where(seen, 0.0, jnp.exp(vecB + m_prev - vecM)),
        jnp.exp(vecA - m_last),
        c0 + jnp.maximum(latest, 0),
        jnp.exp(scaG + m_prev - m_last),
    )


def _maxplus_carry(earlier, later):
    """(A, B, C) of consecutive steps composed: A the sum of logf, B the best log weight of an input
    seen so far (its i plus the logf after it), C the same without the segment's last input (the
    carried part). One step t is (logf_t, i_t, -inf)."""
    a1, b1, c1 = earlier
    a2, b2, c2 = later
    del c1
    carried = b1 + a2
    return a1 + a2, jnp.maximum(carried, b2), jnp.maximum(carried, c2)


def _restarting_sum(earlier, later):
    """(value, flag) pairs: the inclusive sum restarting at every flagged step (from its value)."""
    v1, f1 = earlier
    v2, f2 = later
    return jnp.where(f2 != 0, v2, v1 + v2), jnp.maximum(f1, f2)


def chunk_gates_scanned(vecI, vecLogF, m_prev, c0, L: int):
    """The gate vectors of one chunk and its per-step m, from i, logf (L,) and the entering m
    (scalar), with associative scans (``_triton.associative_scan``: ``tt.scan`` in a Triton kernel)
    instead of (L, L) selections: usable inside a kernel that walks the chunks in order
    (``gates_impl="kernel"``, ``fw_recurrent``).

        (A_t, B_t, C_t) = scan of ``_maxplus_carry`` over (logf, i, -inf)
        carry_t = max(m_{k-1} + A_t, C_t)          (= logf_t + m_{t-1}: the old state's log weight)
        m_t     = max(carry_t, i_t)                (the recurrence m_t = max(logf_t + m_{t-1}, i_t))
        reset_t = carry_t - m_t < -104 or logf_t = -inf   (``gates.reset_positions``)
        z_t     = max_{s <= t, reset_s} s (-1: none), a cumulative max
        b_t     = sum_{z_t < s <= t} logf_s        (a scan restarting at resets; no differences)
        a_s     = i_s + sum_{r > s} logf_r         (reverse cumulative sum minus logf_s; -inf before
                                                    the chunk's last reset, as in ``gates.chunk_gates``)

    Every sum adds logf values (all <= 0) with the reset positions' logf left out, as the XLA path
    (``gates.kernel_gates``) does; only a_s is a difference (of the reverse sum and the step's own
    logf: both are <= 0 and the step's logf is part of the sum, so the error is that of the sum).
    Returns (vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart, reset int32, scaDecay, m_last).
    """
    idx = jnp.arange(L, dtype=jnp.int32)
    neg_inf = jnp.full((L,), -jnp.inf, _F32)
    A, _, C = _triton.associative_scan(_maxplus_carry, (vecLogF, vecI, neg_inf))
    carry = jnp.maximum(m_prev + A, C)
    vecM = jnp.maximum(carry, vecI)
    # f = -inf is a reset also where i = -inf too (there carry - m is -inf - -inf = NaN)
    reset = ((carry - vecM < -gates.RESET_LOG_WEIGHT) | (vecLogF == -jnp.inf)).astype(jnp.int32)
    (latest,) = _triton.associative_scan(lambda x, y: (jnp.maximum(x[0], y[0]),),
                                         (jnp.where(reset != 0, idx, jnp.int32(-1)),))
    last = jnp.max(jnp.where(reset != 0, idx, jnp.int32(-1)))
    logf = jnp.where(reset != 0, 0.0, vecLogF)  # a reset's logf enters no sum
    vecB, _ = _triton.associative_scan(_restarting_sum, (logf, reset))
    (rev,) = _triton.associative_scan(lambda x, y: (x[0] + y[0],), (logf,), reverse=True)
    m_last = jnp.max(jnp.where(idx == L - 1, vecM, -jnp.inf))
    vecQlog, vecKlog, vecWinter, vecWstate, vecStart, scaDecay = _vectors_from_sums(
        vecI, vecM, vecB, rev - logf, latest, last, m_prev, m_last, c0, L)
    return vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart, reset, scaDecay, m_last


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
    """``gates.kernel_gates`` (no explicit resets) as one Pallas kernel; vecSeen is not returned (None),
    vecReset comes as int32 (1 at a reset: the dtype the gate-gradient kernels load; no conversion),
    vecDecay in the (BH, S) layout, each chunk's decay repeated over its L steps (the recurrent
    kernels read it there: no XLA slice; ``gates.chunk_decays`` gives the (BH, NC) form).

    With ``max_state=False`` m == 0 everywhere (vecM, scaM0 unused; scaM_borders all 0).
    """
    BH, S = vecI.shape
    L = params.chunk_size_intra
    NC = S // L
    kernel = functools.partial(gate_vectors_kernel, L=L, max_state=bool(max_state))
    blk = pl.BlockSpec((None, L), lambda b, k: (b, k))
    row = pl.BlockSpec((None, S), lambda b, k: (b, 0))
    f32 = jax.ShapeDtypeStruct((BH, S), _F32)
    i32 = jax.ShapeDtypeStruct((BH, S), jnp.int32)
    qlog, klog, winter, wstate, start, reset, decay = launch(
        kernel,
        grid=(BH, NC),
        in_specs=[blk, blk, row, pl.BlockSpec((None, 1), lambda b, k: (b, 0))],
        out_specs=[blk] * 7,
        out_shape=[f32, f32, f32, f32, i32, i32, f32],
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_gate_vectors",
    )(vecI.astype(_F32), vecLogF.astype(_F32), vecM.astype(_F32), scaM0.astype(_F32).reshape(BH, 1))
    if max_state:
        scaM_borders = gates.border_max_states(vecM.astype(_F32), scaM0.astype(_F32), L)
    else:
        scaM_borders = jnp.zeros((BH, NC + 1), _F32)
    return gates.KernelGates(qlog, klog, winter, wstate, decay, scaM_borders, start, reset, None)


def _chunk_dlogf(suffix, reset, per_chunk, L: int):
    """dlogf of one chunk (``gates.gate_gradients``) from the suffix sums of <dq, q> - <dk, k> up to
    the next reset and the chunk's state part (sum of <dk, k>_state plus the decay term): the state
    part counts from the chunk's last reset on; 0 at the resets themselves."""
    idx = jnp.arange(L, dtype=jnp.int32)
    last = jnp.max(jnp.where(reset != 0, idx, jnp.int32(-1)))
    return jnp.where(reset != 0, 0.0, suffix + jnp.where(idx >= last, per_chunk, 0.0))


def gate_gradients_kernel(
    vecDqq_ref,  # (L,)
    vecDkk_ref,  # (L,)
    vecDkkState_ref,  # (L,)
    scaDdecay_ref,  # (NC,) the whole row
    vecReset_ref,  # (L,) int32
    vecDLogF_ref,  # out (L,)
    *,
    L: int,
):
    """Kernel body of one (batch*head row, chunk) program (the chunks are independent)."""
    k = pl.program_id(1)
    idx = jnp.arange(L, dtype=jnp.int32)
    t_ = idx[None, :]  # summed index (columns)
    r_ = idx[:, None]  # output index (rows)
    reset = vecReset_ref[...]
    x = vecDqq_ref[...] - vecDkk_ref[...]
    latest = _latest_reset(reset, L)
    # t >= r with no reset in (r, t], i.e. latest_t <= r
    suffix = jnp.sum(jnp.where((t_ >= r_) & (latest[None, :] <= r_), x[None, :], 0.0), axis=1)
    per_chunk = jnp.sum(vecDkkState_ref[...]) + scaDdecay_ref[k]
    vecDLogF_ref[...] = _chunk_dlogf(suffix, reset, per_chunk, L)


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
    kernel = functools.partial(gate_gradients_kernel, L=L)
    blk = pl.BlockSpec((None, L), lambda b, k: (b, k))
    dlogf = launch(
        kernel,
        grid=(BH, NC),
        in_specs=[blk, blk, blk, pl.BlockSpec((None, NC), lambda b, k: (b, 0)), blk],
        out_specs=blk,
        out_shape=jax.ShapeDtypeStruct((BH, S), _F32),
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_gate_gradients",
    )(vecDqq.astype(_F32), vecDkk.astype(_F32), vecDkkState.astype(_F32), scaDdecay.astype(_F32),
      vecReset.astype(jnp.int32))
    return vecDkk, dlogf


# ----------------------------------------------------------------------------- fused row kernels
def _in_chunk_max_maps(vecLogF, vecI, L: int):
    """(A_t, B_t) of one chunk: the (max, +) maps x -> max(x + logf_t, i_t) of steps 0..t composed,
    m_t = max(m_{k-1} + A_t, B_t). Hillis-Steele over log2(L) levels, each shift a masked (L, L)
    selection; the composition is ``gates._compose`` (sums of logf <= 0: no cancellation)."""
    a, b = vecLogF, vecI
    d = 1
    while d < L:
        a_sh = _shift_down(a, d, L, 0.0)  # the identity map (0, -inf) before the chunk start
        b_sh = _shift_down(b, d, L, -jnp.inf)
        a, b = a_sh + a, jnp.maximum(b_sh + a, b)
        d *= 2
    return a, b


def fused_gate_vectors_kernel(
    vecI_ref,  # (S,) the whole row
    vecLogF_ref,  # (S,)
    scaM0_ref,  # (1,)
    vecQlog_ref,  # out (S,)
    vecKlog_ref,  # out (S,)
    vecWinter_ref,  # out (S,)
    vecWstate_ref,  # out (S,)
    vecStart_ref,  # out (S,) int32
    vecReset_ref,  # out (S,) int32
    vecDecay_ref,  # out (S,) each chunk's decay repeated over its L slots
    vecM_ref,  # out (S,)
    *,
    L: int,
    NC: int,
    Lm: int,
):
    """Kernel body of one batch*head row: the m scan and the gate vectors, chunk by chunk.

    The m scan runs on sub-blocks of ``Lm`` steps (a Hillis-Steele scan of (Lm, Lm) selections, m
    carried from one sub-block to the next), placed into the chunk's (L,) vector by one masked
    (L, Lm) selection each: (L / Lm) (2 log2 Lm + 1) Lm L element operations instead of 2 log2 L L^2.
    """
    idx = jnp.arange(L, dtype=jnp.int32)
    idx_m = jnp.arange(Lm, dtype=jnp.int32)
    outs = (vecQlog_ref, vecKlog_ref, vecWinter_ref, vecWstate_ref, vecStart_ref, vecReset_ref, vecDecay_ref)

    def chunk(k, m_border):
        c0 = pl.multiple_of(k * L, L)
        vecI = vecI_ref[pl.ds(c0, L)]
        vecLogF = vecLogF_ref[pl.ds(c0, L)]
        m_run = m_border
        vecM = jnp.full((L,), -jnp.inf, _F32)
        for j in range(L // Lm):  # static: the sub-blocks of the chunk, in order
            b0 = pl.multiple_of(c0 + j * Lm, Lm)
            vecA, vecB = _in_chunk_max_maps(vecLogF_ref[pl.ds(b0, Lm)], vecI_ref[pl.ds(b0, Lm)], Lm)
            vecMj = jnp.maximum(m_run + vecA, vecB)
            m_run = jnp.max(jnp.where(idx_m == Lm - 1, vecMj, -jnp.inf))
            if Lm == L:
                vecM = vecMj
            else:
                place = idx[:, None] == idx_m[None, :] + j * Lm
                vecM = jnp.maximum(vecM, jnp.max(jnp.where(place, vecMj[None, :], -jnp.inf), axis=1))
        m_next = m_run
        vecMprev = jnp.where(idx == 0, m_border, _shift_down(vecM, 1, L, 0.0))
        vals = _chunk_gate_vectors(vecI, vecLogF, vecM, vecMprev, m_border, m_next, c0, L)
        for ref, val in zip(outs, vals):
            ref[pl.ds(c0, L)] = val
        vecM_ref[pl.ds(c0, L)] = vecM
        return m_next

    jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, scaM0_ref[0])


def fused_gate_vectors(
    vecI: jax.Array,  # (BH, S) float32
    vecLogF: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
    m_block: int = 32,
) -> tuple[gates.KernelGates, jax.Array]:
    """``gates_impl="fused"``: (the kernel gate vectors, vecM) from i, logf and m0 in one launch.

    One program per (batch, head) row walks its chunks in order carrying m_{k-1}: per chunk the m
    scan (``_in_chunk_max_maps``, the maps of ``gates.max_state_scan`` composed in another order:
    equal up to the rounding of sums of logf <= 0) and the vectors of ``gate_vectors``. vecSeen is
    not returned (None). ``m_block``: the sub-block of the m scan (a power of two; min(m_block, L)).
    """
    BH, S = vecI.shape
    L = params.chunk_size_intra
    NC = S // L
    Lm = min(int(m_block), L)
    if Lm < 1 or L % Lm:
        raise ValueError(f"m_block must divide chunk_size_intra={L}; got {m_block!r}")
    kernel = functools.partial(fused_gate_vectors_kernel, L=L, NC=NC, Lm=Lm)
    row = pl.BlockSpec((None, S), lambda b: (b, 0))
    f32 = jax.ShapeDtypeStruct((BH, S), _F32)
    i32 = jax.ShapeDtypeStruct((BH, S), jnp.int32)
    qlog, klog, winter, wstate, start, reset, decay, vecM = launch(
        kernel,
        grid=(BH,),
        in_specs=[row, row, pl.BlockSpec((None, 1), lambda b: (b, 0))],
        out_specs=[row] * 8,
        out_shape=[f32, f32, f32, f32, i32, i32, f32, f32],
        num_warps=_row_kernel_warps(L),
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_fused_gate_vectors",
    )(vecI.astype(_F32), vecLogF.astype(_F32), scaM0.astype(_F32).reshape(BH, 1))
    scaM_borders = gates.border_max_states(vecM, scaM0.astype(_F32), L)
    g = gates.KernelGates(qlog, klog, winter, wstate, decay, scaM_borders, start, reset, None)
    return g, vecM


def _row_kernel_warps(L: int) -> int:
    """Warps of the fused row kernels: their (L, L) temporaries are L^2 fp32 values."""
    return 8 if L >= 128 else 4


def _inclusive_count(flag, L: int):
    """(L,) int32: the number of set flags at or before t (a masked (L, L) row sum, exact)."""
    idx = jnp.arange(L, dtype=jnp.int32)
    return jnp.sum(jnp.where(idx[None, :] <= idx[:, None], flag[None, :], 0), axis=1)


def fused_gate_gradients_kernel(
    vecI_ref,  # (S,) the whole row
    vecLogF_ref,  # (S,)
    vecM_ref,  # (S,)
    scaM0_ref,  # (1,)
    vecDM_ref,  # (S,) the cotangent of every m_t
    vecDqq_ref,  # (S,)
    vecDkk_ref,  # (S,)
    vecDkkState_ref,  # (S,)
    scaDdecay_ref,  # (NC,)
    vecReset_ref,  # (S,) int32
    vecDI_ref,  # out (S,)
    vecDLogF_ref,  # out (S,)
    scaDM0_ref,  # out (1,)
    *,
    L: int,
    NC: int,
):
    """Kernel body of one batch*head row: the chunks in reverse, carrying the m cotangent."""
    idx = jnp.arange(L, dtype=jnp.int32)
    t_ = idx[:, None]  # output index (rows)
    u_ = idx[None, :]  # summed index (columns)

    def chunk(j, carry):
        k = NC - 1 - j
        c0 = pl.multiple_of(k * L, L)
        vecI = vecI_ref[pl.ds(c0, L)]
        vecLogF = vecLogF_ref[pl.ds(c0, L)]
        vecM = vecM_ref[pl.ds(c0, L)]
        m_border = jnp.where(k > 0, vecM_ref[jnp.maximum(c0 - 1, 0)], scaM0_ref[0])
        vecMprev = jnp.where(idx == 0, m_border, _shift_down(vecM, 1, L, 0.0))
        # d m_t / d m_{t-1} of m_t = max(logf_t + m_{t-1}, i_t): 1, 0, or 1/2 at a tie (jnp.maximum)
        lhs = vecLogF + vecMprev
        sel = jnp.where(lhs > vecI, 1.0, jnp.where(lhs == vecI, 0.5, 0.0))
        zeros = _inclusive_count((sel == 0.0).astype(jnp.int32), L)
        ties = _inclusive_count((sel == 0.5).astype(jnp.int32), L)
        # P[t, u] = prod_{t < r <= u} sel_r for u >= t: 0 past a zero, else 2^-(ties in (t, u])
        reach = (u_ >= t_) & (zeros[None, :] == zeros[:, None])
        matP = jnp.where(reach, jnp.exp2(-(ties[None, :] - ties[:, None]).astype(_F32)), 0.0)
        zeros_end = jnp.max(zeros)  # counts are non-decreasing: the chunk's total
        ties_end = jnp.max(ties)
        to_end = jnp.where(zeros == zeros_end, jnp.exp2(-(ties_end - ties).astype(_F32)), 0.0)
        # G_t: the total cotangent of m_t (its own plus all later steps' through the scan)
        vecG = jnp.sum(matP * vecDM_ref[pl.ds(c0, L)][None, :], axis=1) + to_end * carry
        # the gate gradients with m held fixed (gate_gradients_kernel)
        reset = vecReset_ref[pl.ds(c0, L)]
        x = vecDqq_ref[pl.ds(c0, L)] - vecDkk_ref[pl.ds(c0, L)]
        latest = _latest_reset(reset, L)
        suffix = jnp.sum(jnp.where((u_ >= t_) & (latest[None, :] <= t_), x[None, :], 0.0), axis=1)
        per_chunk = jnp.sum(vecDkkState_ref[pl.ds(c0, L)]) + scaDdecay_ref[k]
        dlogf = _chunk_dlogf(suffix, reset, per_chunk, L)
        vecDLogF_ref[pl.ds(c0, L)] = dlogf + sel * vecG
        vecDI_ref[pl.ds(c0, L)] = vecDkk_ref[pl.ds(c0, L)] + (1.0 - sel) * vecG
        return jnp.sum(jnp.where(idx == 0, sel * vecG, 0.0))  # into m_{k-1}: the step before the chunk

    carry = jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, jnp.float32(0.0))
    scaDM0_ref[...] = jnp.full((1,), carry, _F32)


def fused_gate_gradients(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    vecDM: jax.Array,  # (BH, S) cotangent of every m_t
    vecDqq: jax.Array,  # (BH, S)
    vecDkk: jax.Array,  # (BH, S)
    vecDkkState: jax.Array,  # (BH, S)
    scaDdecay: jax.Array,  # (BH, NC)
    vecReset: jax.Array,  # (BH, S) bool or int
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``gate_grads_impl="fused"`` (exact gradients, exponential input gate): (dI, dLogF, dM0), the
    gate gradients of ``gate_gradients`` plus the pull-back of ``vecDM`` through the m scan, in one
    launch.

    The pull-back in its recurrent form: with sel_t = d m_t / d m_{t-1} (1 where logf_t + m_{t-1}
    wins, 0 where i_t wins, 1/2 at a tie, as ``jnp.maximum`` splits it), the total cotangent of m_t
    is G_t = dm_t + sel_{t+1} G_{t+1}, and dI_t += (1 - sel_t) G_t, dLogF_t += sel_t G_t,
    dM0 = sel_0 G_0. One program per (batch, head) row walks its chunks in reverse carrying
    sel G at the chunk start; inside a chunk G_t = sum_{u >= t} P[t, u] dm_u + P[t, L-1] carry
    with P[t, u] = prod_{t < r <= u} sel_r, from exact integer counts of the zeros and ties of sel
    ((L, L) masked sums). Away from ties this is the pull-back of ``gates.max_state_pullback``
    (the ``jax.vjp`` of the associative scan), summed in another order.
    """
    BH, S = vecI.shape
    L = params.chunk_size_intra
    NC = S // L
    kernel = functools.partial(fused_gate_gradients_kernel, L=L, NC=NC)
    row = pl.BlockSpec((None, S), lambda b: (b, 0))
    one = pl.BlockSpec((None, 1), lambda b: (b, 0))
    f32 = jax.ShapeDtypeStruct((BH, S), _F32)
    dI, dLogF, dM0 = launch(
        kernel,
        grid=(BH,),
        in_specs=[row, row, row, one, row, row, row, row, pl.BlockSpec((None, NC), lambda b: (b, 0)), row],
        out_specs=[row, row, one],
        out_shape=[f32, f32, jax.ShapeDtypeStruct((BH, 1), _F32)],
        num_warps=_row_kernel_warps(L),
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_fused_gate_gradients",
    )(*(x.astype(_F32) for x in (vecI, vecLogF, vecM)), scaM0.astype(_F32).reshape(BH, 1),
      *(x.astype(_F32) for x in (vecDM, vecDqq, vecDkk, vecDkkState, scaDdecay)), vecReset.astype(jnp.int32))
    return dI, dLogF, dM0[:, 0]


# ----------------------------------------------------------------------------- gate gradients, scanned
def _suffix_until_reset(right, left):
    """Reverse scan of (x, reset at the segment start, reset after the start): the sum of x from the
    segment start up to the step before its first later reset (``gates._segmented_suffix_sum``).
    Arguments in ``jax.lax.associative_scan``'s reverse order: the later part first."""
    p_l, h_l, q_l = left
    p_r, h_r, q_r = right
    blocked = jnp.maximum(q_l, h_r)
    return p_l + jnp.where(blocked != 0, 0.0, p_r), h_l, jnp.maximum(blocked, q_r)


def _affine_with_next(right, left):
    """Reverse scan of the maps y -> x + a y (H_t = sel_t (dm_t + H_{t+1})) with, beside each
    composite (a, x), the composite (a', x') that gives H at the step after the segment start."""
    a_l, x_l, a2_l, x2_l = left
    a_r, x_r, a2_r, x2_r = right
    del a2_r, x2_r
    return a_l * a_r, x_l + a_l * x_r, a2_l * a_r, x2_l + a2_l * x_r


def gate_gradients_scanned_kernel(
    vecDqq_ref,  # (S,)
    vecDkk_ref,  # (S,)
    vecDkkState_ref,  # (S,)
    scaDdecay_ref,  # (NC,)
    vecReset_ref,  # (S,) int32
    *refs,  # [vecSel (S,) d m_t / d m_{t-1}, vecDM (S,) cotangent of every m_t] with pullback;
    # then the outputs vecDI (S,), vecDLogF (S,), scaDM0 (1,)
    L: int,
    NC: int,
    pullback: bool,
):
    """One program per (batch*head) row, walking its chunks from the last: per chunk the gate
    gradients of ``gates.gate_gradients`` (a reverse scan that stops at resets) and, with
    ``pullback``, the pull-back of dm through the m recurrence (``gates.max_state_pullback_recurrent``)
    as a reverse scan of its affine maps with H = sel G carried across the chunk border."""
    vecSel_ref, vecDM_ref = refs[:2] if pullback else (None, None)
    vecDI_ref, vecDLogF_ref, scaDM0_ref = refs[-3:]
    idx = jnp.arange(L, dtype=jnp.int32)
    zeros_i = jnp.zeros((L,), jnp.int32)

    def chunk(j, carry_h):
        k = NC - 1 - j
        c0 = pl.multiple_of(k * L, L)
        sl = pl.ds(c0, L)
        reset = vecReset_ref[sl]
        x = vecDqq_ref[sl] - vecDkk_ref[sl]
        suffix, _, _ = _triton.associative_scan(_suffix_until_reset, (x, reset, zeros_i), reverse=True)
        per_chunk = jnp.sum(vecDkkState_ref[sl]) + scaDdecay_ref[k]
        dlogf = _chunk_dlogf(suffix, reset, per_chunk, L)
        dI = vecDkk_ref[sl]
        if pullback:
            sel, dm = vecSel_ref[sl], vecDM_ref[sl]
            ones = jnp.ones((L,), _F32)
            a, x_h, a2, x2 = _triton.associative_scan(
                _affine_with_next, (sel, sel * dm, ones, jnp.zeros((L,), _F32)), reverse=True)
            vecH = x_h + a * carry_h  # H_t = sel_t G_t
            vecG = dm + (x2 + a2 * carry_h)  # G_t = dm_t + H_{t+1}
            dI = dI + (1.0 - sel) * vecG
            dlogf = dlogf + vecH
            carry_h = jnp.sum(jnp.where(idx == 0, vecH, 0.0))
        vecDI_ref[sl] = dI
        vecDLogF_ref[sl] = dlogf
        return carry_h

    carry_h = jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, jnp.float32(0.0))
    scaDM0_ref[...] = jnp.full((1,), carry_h, _F32)


def gate_gradients_scanned(
    vecDqq: jax.Array,  # (BH, S)
    vecDkk: jax.Array,  # (BH, S)
    vecDkkState: jax.Array,  # (BH, S)
    scaDdecay: jax.Array,  # (BH, NC)
    vecReset: jax.Array,  # (BH, S) bool or int
    vecSel: jax.Array | None,  # (BH, S) ``gates.max_state_selection``; None: no pull-back
    vecDM: jax.Array | None,  # (BH, S)
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``gate_grads_impl="kernel"``: (dI, dLogF, dM0) = ``gates.gate_gradients`` plus (with vecSel and
    vecDM) ``gates.max_state_pullback_recurrent``, in one launch of one program per row that walks
    its chunks in reverse with associative scans (``tt.scan``) of the chunk's vectors. Without the
    pull-back dM0 is 0."""
    BH, S = vecDqq.shape
    L = params.chunk_size_intra
    NC = S // L
    pullback = vecSel is not None
    if pullback != (vecDM is not None):
        raise ValueError("gate_gradients_scanned: vecSel and vecDM must both be given or both be None")
    kernel = functools.partial(gate_gradients_scanned_kernel, L=L, NC=NC, pullback=pullback)
    row = pl.BlockSpec((None, S), lambda b: (b, 0))
    f32 = jax.ShapeDtypeStruct((BH, S), _F32)
    dI, dLogF, dM0 = launch(
        kernel,
        grid=(BH,),
        in_specs=[row, row, row, pl.BlockSpec((None, NC), lambda b: (b, 0)), row] + ([row, row] if pullback else []),
        out_specs=[row, row, pl.BlockSpec((None, 1), lambda b: (b, 0))],
        out_shape=[f32, f32, jax.ShapeDtypeStruct((BH, 1), _F32)],
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="mlstm_chunkwise_gate_gradients_scanned",
    )(*(x.astype(_F32) for x in (vecDqq, vecDkk, vecDkkState, scaDdecay)), vecReset.astype(jnp.int32),
      *((vecSel.astype(_F32), vecDM.astype(_F32)) if pullback else ()))
    return dI, dLogF, dM0[:, 0]
