"""The kernel stages on (B, NH, ...) arrays in the seeds' layouts: what the seed entry points call.

Notation (see ``xlstm_jax.kernels._common`` and ``gates``). The seeds keep the chunk-border states
stacked along the head dim:

    matC_all (B, NH, (NC+1) * DHQK, DHV)   vecN_all (B, NH, (NC+1) * DHQK)   scaM_all (B, NH, NC+1)

(index 0: the initial state), and give the chunk gates as (B, NH, NC, L):

    vecB  in-chunk cumulative sum of log sigmoid(f)
    vecA  i_s + sum_{r = s+1 .. L} log sigmoid(f_r)   (weight of step s in the chunk's end state)
    vecN_out (B, NH, S)  the normalizer max(|qs.n|, lam) (the denominator without eps)
    vecM_out (B, NH, S)  the per-step max state m

Each function here converts these layouts, pads head dims (and, where it only has raw gates, the
sequence) and calls the one kernel of its name; the math lives in the kernel modules. The per-kernel
backward stages compute the TFLA-convention terms (denominator and m held fixed) unless the
cotangent of the normalizer (``vecDeltaNq``) and of the n states are passed; the exact gradient of
the whole cell is assembled by ``chunkwise_backward_outputs`` (and by ``mlstm_chunkwise_pallas``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import gates
from .autodiff import (
    CoreConfig,
    chunkwise_backward,
    chunkwise_forward,
    h_kernel_dtype,
    prepare,
    resolve_interpret,
)
from .bw_parallel_dk import parallel_bw_dk
from .bw_parallel_dq import parallel_bw_dq
from .bw_parallel_dv import parallel_bw_dv
from .bw_recurrent import recurrent_bw_states
from .fw_parallel import parallel_fw_h
from .fw_recurrent import recurrent_fw_states
from .heuristics import chunkwise_kernel_params, padded_head_dim

_F32 = jnp.float32


# ----------------------------------------------------------------------------- layout helpers
def _pad_to(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _flat_seq(x: jax.Array, S_pad: int, D_pad: int, dtype=None) -> jax.Array:
    """(B, NH, S, D) -> (BH, S_pad, D_pad), zero padded."""
    B, NH, S, D = x.shape
    x = x.reshape(B * NH, S, D)
    if dtype is not None:
        x = x.astype(dtype)
    return _pad_to(_pad_to(x, 1, S_pad), 2, D_pad)


def _flat_vec(x: jax.Array, S_pad: int | None = None, value: float = 0.0) -> jax.Array:
    """(B, NH, ...) -> (BH, prod(...)) float32, padded at the end to ``S_pad`` with ``value``."""
    x = x.reshape(x.shape[0] * x.shape[1], -1).astype(_F32)
    return x if S_pad is None else _pad_to(x, 1, S_pad, value)


def _states_in(matC_all, vecN_all, B, NH, DHQK, DHV):
    """Seed layout -> (BH, NC+1, DHQKp, DHVp), (BH, NC+1, DHQKp) float32."""
    NC1 = matC_all.shape[2] // DHQK
    if matC_all.shape != (B, NH, NC1 * DHQK, DHV) or (vecN_all is not None and vecN_all.shape != (B, NH, NC1 * DHQK)):
        raise ValueError(
            f"states must have shapes (B, NH, (NC+1)*DHQK, DHV) and (B, NH, (NC+1)*DHQK) with B={B}, "
            f"NH={NH}, DHQK={DHQK}, DHV={DHV}; got {tuple(matC_all.shape)} and "
            f"{None if vecN_all is None else tuple(vecN_all.shape)}"
        )
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    matC = matC_all.astype(_F32).reshape(B * NH, NC1, DHQK, DHV)
    matC = _pad_to(_pad_to(matC, 2, Kp), 3, Vp)
    vecN = None
    if vecN_all is not None:
        vecN = _pad_to(vecN_all.astype(_F32).reshape(B * NH, NC1, DHQK), 2, Kp)
    return matC, vecN


def _states_out(matC_states, vecN_states, B, NH, DHQK, DHV):
    """(BH, NC+1, DHQKp, DHVp) -> seed layout (B, NH, (NC+1)*DHQK, DHV)."""
    NC1 = matC_states.shape[1]
    matC = matC_states[:, :, :DHQK, :DHV].reshape(B, NH, NC1 * DHQK, DHV)
    vecN = None if vecN_states is None else vecN_states[:, :, :DHQK].reshape(B, NH, NC1 * DHQK)
    return matC, vecN


def _unflat_seq(x, B, NH, S, D):
    return x[:, :S, :D].reshape(B, NH, S, D)


def _unflat_vec(x, B, NH, S):
    return x[:, :S].reshape(B, NH, S)


def _check_chunked(name, x, B, NH, NC, L):
    if tuple(x.shape) != (B, NH, NC, L):
        raise ValueError(f"{name} must have shape (B, NH, NC, L) = {(B, NH, NC, L)}; got {tuple(x.shape)}")


def _initial_states(matC_initial, vecN_initial, scaM_initial, BH, DHQK, DHV):
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    C0 = jnp.zeros((BH, Kp, Vp), _F32) if matC_initial is None else _pad_to(
        _pad_to(matC_initial.astype(_F32).reshape(BH, DHQK, DHV), 1, Kp), 2, Vp)
    n0 = jnp.zeros((BH, Kp), _F32) if vecN_initial is None else _pad_to(
        vecN_initial.astype(_F32).reshape(BH, DHQK), 1, Kp)
    m0 = jnp.zeros((BH,), _F32) if scaM_initial is None else scaM_initial.astype(_F32).reshape(BH)
    return C0, n0, m0


# ----------------------------------------------------------------------------- recurrent stages
def recurrent_fw_C(
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecF: jax.Array,  # (B, NH, S)
    vecI: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaMinter_initial: jax.Array | None = None,  # (B, NH)
    *,
    chunk_size: int = 64,
    save_states_every_nth_chunk: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
):
    """Chunk-border states every ``chunk_size * save_states_every_nth_chunk`` steps (seed layout).

    The recurrent kernel folds ``chunk_size`` steps per matrix product; S is padded to a multiple
    of the kept-state spacing (open forget gates: the last state is the state after step S).
    Returns (matC_states, vecN_states, scaMinter_states) with NC + 1 entries each.
    """
    B, NH, S, DHQK = matK.shape
    DHV = matV.shape[-1]
    if not isinstance(save_states_every_nth_chunk, int) or save_states_every_nth_chunk < 1:
        raise ValueError(f"save_states_every_nth_chunk must be a positive int; got {save_states_every_nth_chunk!r}")
    L = chunk_size * save_states_every_nth_chunk
    params = chunkwise_kernel_params(
        S=max(S, L), DHQK=DHQK, DHV=DHV, dtype=matK.dtype, chunk_size_intra=L, chunk_size_inter=chunk_size,
        num_warps_inter=num_warps, num_stages_inter=num_stages,
    )
    S_pad = -(-S // L) * L
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    BH = B * NH
    k = _flat_seq(matK, S_pad, Kp)
    v = _flat_seq(matV, S_pad, Vp, matK.dtype)
    i = _flat_vec(vecI, S_pad, gates.CLOSED_INPUT_GATE)
    logf = _flat_vec(gates.log_forget_gate(vecF), S_pad, 0.0)
    C0, n0, m0 = _initial_states(matC_initial, vecN_initial, scaMinter_initial, BH, DHQK, DHV)
    vecM = gates.max_state_scan(i, logf, m0)
    g = gates.kernel_gates(i, logf, vecM, m0, L)
    matC_states, vecN_states = recurrent_fw_states(
        k, v, g.vecWstate, g.vecDecay, C0, n0, params=params, interpret=resolve_interpret(interpret)
    )
    matC, vecN = _states_out(matC_states, vecN_states, B, NH, DHQK, DHV)
    return matC, vecN, g.scaM_borders.reshape(B, NH, -1)


def recurrent_bw_dC(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    vecF: jax.Array,  # (B, NH, S)
    scaM_inter: jax.Array,  # (B, NH, NC+1)
    vecM_combine: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHV)
    vecN_out: jax.Array,  # (B, NH, S)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    *,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    save_states_every_nth_chunk: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
    interpret: bool | None = None,
):
    """Cotangents of the chunk-border C states (seed layout (B, NH, (NC+1)*DHQK, DHV)).

    dnum = dH / (vecN_out + eps). With ``vecDeltaNq`` (the cotangent of qs.n) or ``vecDeltaN_last``
    the n-state cotangents are computed too and returned as a second array (B, NH, (NC+1)*DHQK).
    """
    B, NH, S, DHQK = matQ.shape
    DHV = matDeltaH.shape[-1]
    L = chunk_size * save_states_every_nth_chunk
    NC = scaM_inter.shape[-1] - 1
    if tuple(scaM_inter.shape) != (B, NH, NC + 1) or not (NC - 1) * L < S <= NC * L:
        raise ValueError(
            f"scaM_inter {tuple(scaM_inter.shape)} does not fit S={S} with {L}-step chunks (B={B}, NH={NH})"
        )
    if qk_scale is None:
        qk_scale = DHQK**-0.5
    params = chunkwise_kernel_params(
        S=NC * L, DHQK=DHQK, DHV=DHV, dtype=matQ.dtype, chunk_size_intra=L, chunk_size_inter=chunk_size,
        num_warps_inter=num_warps, num_stages_inter=num_stages,
    )
    S_pad = NC * L
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    BH = B * NH
    q = _flat_seq(matQ, S_pad, Kp)
    dh = _flat_seq(matDeltaH, S_pad, Vp, matQ.dtype)
    logf = _flat_vec(gates.log_forget_gate(vecF), S_pad, 0.0)
    vecM = _flat_vec(vecM_combine)
    vecM = jnp.concatenate([vecM, jnp.repeat(vecM[:, -1:], S_pad - S, axis=1)], axis=1)
    m_b = scaM_inter.astype(_F32).reshape(BH, NC + 1)
    vecB = gates.cumsum(logf.reshape(BH, NC, L), axis=2)
    vecWinter = jnp.exp(vecB + m_b[:, :-1, None] - vecM.reshape(BH, NC, L)).reshape(BH, S_pad)
    vecDecay = jnp.exp(vecB[..., -1] + m_b[:, :-1] - m_b[:, 1:])
    vecDenInv = 1.0 / (_flat_vec(vecN_out, S_pad, 1.0) + eps)
    vecDnq = jnp.zeros_like(vecDenInv) if vecDeltaNq is None else _flat_vec(vecDeltaNq, S_pad, 0.0)
    dC_last = jnp.zeros((BH, Kp, Vp), _F32) if matDeltaC_last is None else _pad_to(
        _pad_to(matDeltaC_last.astype(_F32).reshape(BH, DHQK, DHV), 1, Kp), 2, Vp)
    dn_last = jnp.zeros((BH, Kp), _F32) if vecDeltaN_last is None else _pad_to(
        vecDeltaN_last.astype(_F32).reshape(BH, DHQK), 1, Kp)
    matDC, vecDN = recurrent_bw_states(
        q, dh, vecWinter, vecDenInv, vecDnq, vecDecay, dC_last, dn_last,
        params=params, qk_scale=qk_scale, interpret=resolve_interpret(interpret),
    )
    matDC, vecDN = _states_out(matDC, vecDN, B, NH, DHQK, DHV)
    if vecDeltaNq is None and vecDeltaN_last is None:
        return matDC
    return matDC, vecDN


# ----------------------------------------------------------------------------- parallel stages
def _tile_params(S, DHQK, DHV, dtype, chunk_size, l_par, l_loop, dh_par, dh_loop, num_warps, num_stages):
    return chunkwise_kernel_params(
        S=S, DHQK=DHQK, DHV=DHV, dtype=dtype, chunk_size_intra=chunk_size,
        chunk_size_inter=min(chunk_size, 128), siz_b_L_parallel=l_par, siz_b_L_loop=l_loop,
        siz_b_DH_parallel=dh_par, siz_b_DH_loop=dh_loop, num_warps_intra=num_warps,
        num_stages_intra=num_stages,
    )


def parallel_fw_H(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    *,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    output_dtype=jnp.float32,
    interpret: bool | None = None,
):
    """h, vecN_out, vecM_out (B, NH, S, DHV), (B, NH, S), (B, NH, S) from the border states.

    Tiles: siz_b_LQ query rows per program, siz_b_LKV key rows per loop step, siz_b_DHHV value
    columns per program, siz_b_DHQK the q.k contraction tile.
    """
    B, NH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    NC = scaM_all.shape[-1] - 1
    L = chunk_size
    if tuple(scaM_all.shape) != (B, NH, NC + 1) or not (NC - 1) * L < S <= NC * L:
        raise ValueError(f"scaM_all {tuple(scaM_all.shape)} does not fit S={S} with chunk_size={L}")
    if qk_scale is None:
        qk_scale = DHQK**-0.5
    S_pad = NC * L
    params = _tile_params(S_pad, DHQK, DHV, matQ.dtype, L, siz_b_LQ, siz_b_LKV, siz_b_DHHV, siz_b_DHQK, num_warps, num_stages)
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    BH = B * NH
    q, k = _flat_seq(matQ, S_pad, Kp), _flat_seq(matK, S_pad, Kp, matQ.dtype)
    v = _flat_seq(matV, S_pad, Vp, matQ.dtype)
    i = _flat_vec(vecI, S_pad, gates.CLOSED_INPUT_GATE)
    logf = _flat_vec(gates.log_forget_gate(vecF), S_pad, 0.0)
    matC, vecN = _states_in(matC_all, vecN_all, B, NH, DHQK, DHV)
    m_b = scaM_all.astype(_F32).reshape(BH, NC + 1)
    vecB, vecA = gates.chunk_log_gates(i, logf, L)
    ic = i.reshape(BH, NC, L)
    vecM = gates.chunk_max_states(ic, vecB, m_b)
    g = gates.kernel_gates_from_chunk_gates(ic, vecB, vecA, vecM, m_b)
    vecM = vecM.reshape(BH, S_pad)
    matH, vecNq = parallel_fw_h(
        q, k, v, g.vecQlog, g.vecKlog, g.vecWinter, vecM, matC, vecN, params=params, qk_scale=qk_scale,
        eps=eps, norm_val=norm_val, stabilize_correctly=stabilize_correctly,
        output_dtype=h_kernel_dtype(output_dtype, matQ.dtype), interpret=resolve_interpret(interpret),
    )
    lam = gates.normalizer_lower_bound(vecM, norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    vecN_out = jnp.maximum(jnp.abs(vecNq), lam)
    return (
        _unflat_seq(matH, B, NH, S, DHV).astype(output_dtype),
        _unflat_vec(vecN_out, B, NH, S),
        _unflat_vec(vecM, B, NH, S),
    )


def _bw_common(matQ, matK, matV, vecI, vecA, vecB, scaM_all, vecN_out, vecM_out, matDeltaH, eps, chunk_size):
    """Shared preparation of the per-kernel backward stages (S = NC * L, no sequence padding)."""
    B, NH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    L = chunk_size
    if S % L:
        raise ValueError(f"S={S} must be a multiple of chunk_size={L} for the chunked gates")
    NC = S // L
    for name, x in (("vecI", vecI), ("vecA", vecA), ("vecB", vecB)):
        _check_chunked(name, x, B, NH, NC, L)
    if tuple(scaM_all.shape) != (B, NH, NC + 1):
        raise ValueError(f"scaM_all must have shape {(B, NH, NC + 1)}; got {tuple(scaM_all.shape)}")
    BH = B * NH
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    dt = matQ.dtype
    q, k = _flat_seq(matQ, S, Kp), _flat_seq(matK, S, Kp, dt)
    v, dh = _flat_seq(matV, S, Vp, dt), _flat_seq(matDeltaH, S, Vp, dt)
    vecM = vecM_out.astype(_F32).reshape(BH, NC, L)
    g = gates.kernel_gates_from_chunk_gates(
        vecI.astype(_F32).reshape(BH, NC, L), vecB.astype(_F32).reshape(BH, NC, L),
        vecA.astype(_F32).reshape(BH, NC, L), vecM, scaM_all.astype(_F32).reshape(BH, NC + 1),
    )
    vecDenInv = 1.0 / (_flat_vec(vecN_out) + eps)
    return (B, NH, S, DHQK, DHV), (q, k, v, dh), g, vecDenInv


def parallel_bw_dQ(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, NC, L)
    vecA: jax.Array,  # (B, NH, NC, L)
    vecB: jax.Array,  # (B, NH, NC, L)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    vecN_out: jax.Array,  # (B, NH, S)
    vecM_out: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHV)
    matDeltaC_states: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    *,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    output_dtype=jnp.float32,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    interpret: bool | None = None,
) -> jax.Array:  # (B, NH, S, DHQK)
    """dQ (B, NH, S, DHQK). Shapes as in the module doc; ``vecDeltaNq`` (B, NH, S) adds the
    normalizer's term (exact gradient), otherwise the TFLA convention. Tiles: siz_b_LQ query rows
    and siz_b_DHQK dQ columns per program, siz_b_LKV key rows and siz_b_DHHV value columns per step."""
    del matDeltaC_states  # dQ reads the forward states, not their cotangents
    dims, (q, k, v, dh), g, vecDenInv = _bw_common(
        matQ, matK, matV, vecI, vecA, vecB, scaM_all, vecN_out, vecM_out, matDeltaH, eps, chunk_size)
    B, NH, S, DHQK, DHV = dims
    qk_scale = DHQK**-0.5 if qk_scale is None else qk_scale
    params = _tile_params(S, DHQK, DHV, matQ.dtype, chunk_size, siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages)
    matC, vecN = _states_in(matC_all, vecN_all, B, NH, DHQK, DHV)
    vecDnq = jnp.zeros_like(vecDenInv) if vecDeltaNq is None else _flat_vec(vecDeltaNq)
    matDQ, _ = parallel_bw_dq(
        q, k, v, dh, g.vecQlog, g.vecKlog, g.vecWinter, vecDenInv, vecDnq, matC, vecN,
        params=params, qk_scale=qk_scale, output_dtype=h_kernel_dtype(output_dtype, matQ.dtype),
        interpret=resolve_interpret(interpret),
    )
    return _unflat_seq(matDQ, B, NH, S, DHQK).astype(output_dtype)


def parallel_bw_dK(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, NC, L)
    vecA: jax.Array,  # (B, NH, NC, L)
    vecB: jax.Array,  # (B, NH, NC, L)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    vecN_out: jax.Array,  # (B, NH, S)
    vecM_out: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHV)
    matDeltaC_states: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    *,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    output_dtype=jnp.float32,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    vecDeltaN_states: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK)
    interpret: bool | None = None,
) -> jax.Array:  # (B, NH, S, DHQK)
    """dK (B, NH, S, DHQK). ``vecDeltaNq`` (B, NH, S) and ``vecDeltaN_states`` (B, NH, (NC+1)*DHQK)
    add the normalizer's terms (exact gradient), otherwise the TFLA convention. Tiles: siz_b_LKV key
    rows and siz_b_DHQK dK columns per program, siz_b_LQ query rows and siz_b_DHHV value columns per step."""
    del matC_all, vecN_all
    dims, (q, k, v, dh), g, vecDenInv = _bw_common(
        matQ, matK, matV, vecI, vecA, vecB, scaM_all, vecN_out, vecM_out, matDeltaH, eps, chunk_size)
    B, NH, S, DHQK, DHV = dims
    qk_scale = DHQK**-0.5 if qk_scale is None else qk_scale
    params = _tile_params(S, DHQK, DHV, matQ.dtype, chunk_size, siz_b_LKV, siz_b_LQ, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages)
    matDC, vecDN = _states_in(matDeltaC_states, vecDeltaN_states, B, NH, DHQK, DHV)
    if vecDN is None:
        vecDN = jnp.zeros(matDC.shape[:3], _F32)
    vecDnq = jnp.zeros_like(vecDenInv) if vecDeltaNq is None else _flat_vec(vecDeltaNq)
    matDK, _, _ = parallel_bw_dk(
        q, k, v, dh, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, vecDnq, matDC, vecDN,
        params=params, qk_scale=qk_scale, output_dtype=h_kernel_dtype(output_dtype, matQ.dtype),
        interpret=resolve_interpret(interpret),
    )
    return _unflat_seq(matDK, B, NH, S, DHQK).astype(output_dtype)


def parallel_bw_dV(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, NC, L)
    vecA: jax.Array,  # (B, NH, NC, L)
    vecB: jax.Array,  # (B, NH, NC, L)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    vecN_out: jax.Array,  # (B, NH, S)
    vecM_out: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHV)
    matDeltaC_states: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    *,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    output_dtype=jnp.float32,
    interpret: bool | None = None,
) -> jax.Array:  # (B, NH, S, DHV)
    """dV (B, NH, S, DHV) (the same in both gradient conventions). Tiles: siz_b_LKV key rows and
    siz_b_DHHV dV columns per program, siz_b_LQ query rows and siz_b_DHQK q.k columns per step."""
    del matC_all, vecN_all
    dims, (q, k, v, dh), g, vecDenInv = _bw_common(
        matQ, matK, matV, vecI, vecA, vecB, scaM_all, vecN_out, vecM_out, matDeltaH, eps, chunk_size)
    B, NH, S, DHQK, DHV = dims
    qk_scale = DHQK**-0.5 if qk_scale is None else qk_scale
    params = _tile_params(S, DHQK, DHV, matQ.dtype, chunk_size, siz_b_LKV, siz_b_LQ, siz_b_DHHV, siz_b_DHQK, num_warps, num_stages)
    matDC, _ = _states_in(matDeltaC_states, None, B, NH, DHQK, DHV)
    matDV = parallel_bw_dv(
        q, k, dh, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, matDC,
        params=params, qk_scale=qk_scale, output_dtype=h_kernel_dtype(output_dtype, matQ.dtype),
        interpret=resolve_interpret(interpret),
    )
    return _unflat_seq(matDV, B, NH, S, DHV).astype(output_dtype)


# ----------------------------------------------------------------------------- combined stages
def _core_config(prep, *, eps, norm_val, stabilize_correctly, grad_mode, output_dtype, interpret):
    return CoreConfig(
        params=prep.params, qk_scale=float(prep.qk_scale), eps=float(eps), norm_val=float(norm_val),
        stabilize_correctly=bool(stabilize_correctly), grad_mode=grad_mode,
        h_dtype=h_kernel_dtype(output_dtype, prep.kernel_dtype), recompute_states_in_bw=True,
        interpret=resolve_interpret(interpret),
    )


def chunkwise_forward_outputs(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    *,
    qk_scale=None, return_last_states=False, return_all_states=False, tile_params: dict,
    output_dtype=jnp.float32, eps=0.0, norm_val=1.0, stabilize_correctly=True, interpret=None,
):
    """Forward only: (matH_out, vecN_out, vecM_out, last_states | None, all_states | None).

    The kernel dtype is the dtype of q; any S. ``all_states`` are the chunk-border states in the
    seed layout with NC = ceil(S / chunk_size_intra).
    """
    prep = prepare(
        matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial, qk_scale=qk_scale,
        eps=eps, norm_val=norm_val, grad_mode="exact", chunk_size=None, autocast_kernel_dtype=matQ.dtype,
        tile_params=tile_params,
    )
    cfg = _core_config(prep, eps=eps, norm_val=norm_val, stabilize_correctly=stabilize_correctly,
                       grad_mode="exact", output_dtype=output_dtype, interpret=interpret)
    out = chunkwise_forward(*prep.arrays, cfg)
    B, NH, S, DHQK, DHV = prep.B, prep.NH, prep.S, prep.DHQK, prep.DHV
    lam = gates.normalizer_lower_bound(out.vecM, norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    vecN_out = jnp.maximum(jnp.abs(out.vecNq), lam)
    matC_all, vecN_all = _states_out(out.matC_states, out.vecN_states, B, NH, DHQK, DHV)
    scaM_all = out.scaM_borders.reshape(B, NH, -1)
    last = None
    if return_last_states:
        last = (matC_all[:, :, -DHQK:, :], vecN_all[:, :, -DHQK:], scaM_all[:, :, -1])
    return (
        _unflat_seq(out.matH, B, NH, S, DHV).astype(output_dtype),
        _unflat_vec(vecN_out, B, NH, S),
        _unflat_vec(out.vecM, B, NH, S),
        last,
        (matC_all, vecN_all, scaM_all) if return_all_states else None,
    )


def chunkwise_backward_outputs(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    *,
    matDeltaH: jax.Array,  # (B, NH, S, DHV)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
    scaDeltaM_last: jax.Array | None = None,  # (B, NH)
    qk_scale=None,
    tile_params: dict, eps=0.0, norm_val=1.0, stabilize_correctly=True, grad_mode="exact", interpret=None,
):
    """Backward of the whole cell: (dQ, dK, dV, dI, dF, dC0, dN0, dM0), dtypes of the inputs.

    Recomputes the forward it needs (states, h, signed normalizer, m); the initial-state gradients
    are None when no initial states are given.
    """
    prep = prepare(
        matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial, qk_scale=qk_scale,
        eps=eps, norm_val=norm_val, grad_mode=grad_mode, chunk_size=None,
        autocast_kernel_dtype=matQ.dtype, tile_params=tile_params,
    )
    cfg = _core_config(prep, eps=eps, norm_val=norm_val, stabilize_correctly=stabilize_correctly,
                       grad_mode=grad_mode, output_dtype=jnp.float32, interpret=interpret)
    B, NH, S, DHQK, DHV = prep.B, prep.NH, prep.S, prep.DHQK, prep.DHV
    BH = B * NH
    q = prep.arrays[0]
    S_pad, Kp, Vp = q.shape[1], q.shape[2], prep.arrays[2].shape[2]
    out = chunkwise_forward(*prep.arrays, cfg)
    dh = _flat_seq(matDeltaH, S_pad, Vp, _F32)
    dC_last = jnp.zeros((BH, Kp, Vp), _F32) if matDeltaC_last is None else _pad_to(
        _pad_to(matDeltaC_last.astype(_F32).reshape(BH, DHQK, DHV), 1, Kp), 2, Vp)
    dn_last = jnp.zeros((BH, Kp), _F32) if vecDeltaN_last is None else _pad_to(
        vecDeltaN_last.astype(_F32).reshape(BH, DHQK), 1, Kp)
    dm_last = jnp.zeros((BH,), _F32) if scaDeltaM_last is None else scaDeltaM_last.astype(_F32).reshape(BH)
    dQ, dK, dV, dI, dLogF, dC0, dN0, dM0 = chunkwise_backward(
        *prep.arrays, out.vecM, out.vecNq, out.matH, out.matC_states, out.vecN_states,
        dh, dC_last, dn_last, dm_last, cfg,
    )
    vecF_sq = vecF.reshape(B, NH, S)
    dF = _unflat_vec(dLogF, B, NH, S) * jax.nn.sigmoid(-vecF_sq.astype(_F32))
    grads = [
        _unflat_seq(dQ, B, NH, S, DHQK).astype(matQ.dtype),
        _unflat_seq(dK, B, NH, S, DHQK).astype(matK.dtype),
        _unflat_seq(dV, B, NH, S, DHV).astype(matV.dtype),
        _unflat_vec(dI, B, NH, S).reshape(vecI.shape).astype(vecI.dtype),
        dF.reshape(vecF.shape).astype(vecF.dtype),
    ]
    if matC_initial is None:
        grads += [None, None, None]
    else:
        grads += [
            dC0[:, :DHQK, :DHV].reshape(B, NH, DHQK, DHV).astype(matC_initial.dtype),
            dN0[:, :DHQK].reshape(B, NH, DHQK).astype(vecN_initial.dtype),
            dM0.reshape(B, NH).astype(scaM_initial.dtype),
        ]
    return tuple(grads)
