"""Backward parallel kernel for dK (and the row sums <dk_s, k_s> the gate gradients need).

Notation (see ``gates.py`` and ``bw_parallel_dq.py``): bLk = siz_b_L_parallel key rows per program,
bLq = siz_b_L_loop query rows per loop iteration, bDK = siz_b_DH_parallel (the dK columns a program
owns), bDV = siz_b_DH_loop (the DHV tile of v . dnum). For key s in chunk k (leaving state C_k with
cotangents dC_k, dn_k from ``bw_recurrent``):

    dk_s = qk_scale sum_{t >= s in chunk, z_t <= s} dP[t, s] exp2(vecQlog_t + vecKlog_s) q_t
           + vecWstate_s (dC_k v_s + dn_k)                                   (the state part)

with z_t = vecStart_t (the latest reset <= t in the chunk, else the chunk start). The kernel also
writes <dk_s, k_s> and <state part of dk_s, k_s> (the gate gradients need both).

Grid (DHQK / bDK, S / bLk, BH).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot, dot_nt, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def parallel_bw_dk_kernel(
    matQ_ref,  # (S, bDK)
    matK_ref,  # (bLk, bDK)
    matV_ref,  # (S, DHV)
    matDH_ref,  # (S, DHV)
    vecQlog_ref,  # (S,)
    vecKlog_ref,  # (S,)
    vecWstate_ref,  # (S,)
    vecDenInv_ref,  # (S,)
    vecDnq_ref,  # (S,)
    vecStart_ref,  # (S,) int32
    matDC_states_ref,  # (NC+1, bDK, DHV)
    vecDN_states_ref,  # (NC+1, bDK)
    matDK_ref,  # out (bLk, bDK)
    vecDkk_ref,  # out (bLk,)
    vecDkkState_ref,  # out (bLk,)
    *,
    L: int,
    bLk: int,
    bLq: int,
    bDV: int,
    qk_scale: float,
):
    """Kernel body of one (DHQK tile, key block, batch*head) program.

    Matrix products take loaded tiles (v, dh, q) or a state tile transposed before its cast; the
    per-query scale 1/den is applied to the fp32 products.
    """
    dtype = matQ_ref.dtype
    nDV = matV_ref.shape[-1] // bDV
    ik = pl.program_id(1)
    s0 = pl.multiple_of(ik * bLk, bLk)
    k = jax.lax.div(ik, jnp.int32(L // bLk))
    c0 = pl.multiple_of(k * L, L)

    def v_tile(e):
        return matV_ref[pl.ds(s0, bLk), pl.ds(e * bDV, bDV)]

    v_fixed = [v_tile(0)] if nDV == 1 else None
    get_v = (lambda e: v_fixed[0]) if nDV == 1 else v_tile

    # state part: dC_k v_s + dn_k (index k + 1: the state leaving chunk k)
    acc_state = jnp.zeros((bLk, matQ_ref.shape[-1]), _F32)
    for e in range(nDV):
        matDCT_e = matDC_states_ref[k + 1, :, pl.ds(e * bDV, bDV)].T.astype(dtype)  # (bDV, bDK)
        acc_state = acc_state + dot(get_v(e), matDCT_e)
    acc_state = acc_state + vecDN_states_ref[k + 1, :][None, :]

    vecKlog = vecKlog_ref[pl.ds(s0, bLk)]
    idx_s = s0 + jnp.arange(bLk, dtype=jnp.int32)

    def body(j, acc):
        t0 = pl.multiple_of(c0 + j * bLq, bLq)
        matDPt = jnp.zeros((bLk, bLq), _F32)
        for e in range(nDV):
            matDPt = matDPt + dot_nt(get_v(e), matDH_ref[pl.ds(t0, bLq), pl.ds(e * bDV, bDV)])
        vecDenInv = vecDenInv_ref[pl.ds(t0, bLq)]
        matDPt = matDPt * vecDenInv[None, :] + vecDnq_ref[pl.ds(t0, bLq)][None, :]
        idx_t = t0 + jnp.arange(bLq, dtype=jnp.int32)
        vecStart = vecStart_ref[pl.ds(t0, bLq)]
        mask = (idx_t[None, :] >= idx_s[:, None]) & (idx_s[:, None] >= vecStart[None, :])
        matLogDt = vecKlog[:, None] + vecQlog_ref[pl.ds(t0, bLq)][None, :]
        matDSt = matDPt * jnp.exp2(jnp.where(mask, matLogDt, -jnp.inf))
        return acc + dot(matDSt.astype(dtype), matQ_ref[pl.ds(t0, bLq), :])

    j0 = jax.lax.div(s0 - c0, jnp.int32(bLq))
    acc = jax.lax.fori_loop(j0, jnp.int32(L // bLq), body, jnp.zeros((bLk, matQ_ref.shape[-1]), _F32))
    matDK_state = vecWstate_ref[pl.ds(s0, bLk)][:, None] * acc_state
    matDK = acc * qk_scale + matDK_state
    matDK_ref[...] = matDK.astype(matDK_ref.dtype)
    matK = matK_ref[...].astype(_F32)
    vecDkk_ref[...] = jnp.sum(matDK * matK, axis=1)
    vecDkkState_ref[...] = jnp.sum(matDK_state * matK, axis=1)


def parallel_bw_dk(
    matQ: jax.Array,  # (BH, S, DHQK)
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    matDH: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S)
    vecKlog: jax.Array,  # (BH, S)
    vecWstate: jax.Array,  # (BH, S)
    vecDenInv: jax.Array,  # (BH, S)
    vecDnq: jax.Array,  # (BH, S)
    vecStart: jax.Array,  # (BH, S) int32
    matDC_states: jax.Array,  # (BH, NC+1, DHQK, DHV)
    vecDN_states: jax.Array,  # (BH, NC+1, DHQK)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    output_dtype,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Launch ``parallel_bw_dk_kernel``: dK (BH, S, DHQK) in ``output_dtype``, <dk, k> (BH, S) and
    its state part <dk_state, k> (the term through the leaving state C_k) (BH, S), fp32."""
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    NC1 = matDC_states.shape[1]
    L = params.chunk_size_intra
    bLk, bLq = params.siz_b_L_parallel, params.siz_b_L_loop
    bDK = params.tile("siz_b_DH_parallel", DHQK)
    bDV = params.tile("siz_b_DH_loop", DHV)
    nDK = DHQK // bDK
    kernel = functools.partial(
        parallel_bw_dk_kernel, L=L, bLk=bLk, bLq=bLq, bDV=bDV, qk_scale=float(qk_scale)
    )
    seq = pl.BlockSpec((None, S), lambda idk, ik, b: (b, 0))
    matDK, vecDkk, vecDkkState = launch(
        kernel,
        grid=(nDK, S // bLk, BH),
        in_specs=[
            pl.BlockSpec((None, S, bDK), lambda idk, ik, b: (b, 0, idk)),
            pl.BlockSpec((None, bLk, bDK), lambda idk, ik, b: (b, ik, idk)),
            pl.BlockSpec((None, S, DHV), lambda idk, ik, b: (b, 0, 0)),
            pl.BlockSpec((None, S, DHV), lambda idk, ik, b: (b, 0, 0)),
            seq, seq, seq, seq, seq, seq,
            pl.BlockSpec((None, NC1, bDK, DHV), lambda idk, ik, b: (b, 0, idk, 0)),
            pl.BlockSpec((None, NC1, bDK), lambda idk, ik, b: (b, 0, idk)),
        ],
        out_specs=[
            pl.BlockSpec((None, bLk, bDK), lambda idk, ik, b: (b, ik, idk)),
            pl.BlockSpec((None, None, bLk), lambda idk, ik, b: (idk, b, ik)),
            pl.BlockSpec((None, None, bLk), lambda idk, ik, b: (idk, b, ik)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, S, DHQK), output_dtype),
            jax.ShapeDtypeStruct((nDK, BH, S), _F32),
            jax.ShapeDtypeStruct((nDK, BH, S), _F32),
        ],
        num_warps=params.num_warps_intra,
        num_stages=params.num_stages_intra,
        interpret=interpret,
        name="mlstm_chunkwise_parallel_bw_dk",
    )(matQ, matK, matV, matDH, vecQlog, vecKlog, vecWstate, vecDenInv, vecDnq, vecStart, matDC_states,
      vecDN_states)
    return matDK, jnp.sum(vecDkk, axis=0), jnp.sum(vecDkkState, axis=0)
