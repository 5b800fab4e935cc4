"""Backward parallel kernel for dQ (and the row sums <dq_t, q_t> the gate gradients need).

Notation (see ``gates.py`` and ``bw_recurrent.py``): L = chunk_size_intra, bLq = siz_b_L_parallel
query rows per program, bLkv = siz_b_L_loop key rows per loop iteration, bDK = siz_b_DH_parallel
(the dQ columns a program owns), bDV = siz_b_DH_loop (the DHV tile of dnum . v). For query t in
chunk k, with dP[t, s] = dnum_t . v_s + dnq_t (the normalizer is a value column of ones):

    dqs_t = sum_{z_t <= s <= t} dP[t, s] exp2(vecQlog_t + vecKlog_s) k_s
            + vecWinter_t (C_{k-1} dnum_t + dnq_t n_{k-1}),        dq_t = qk_scale * dqs_t

with z_t = vecStart_t (the latest reset <= t in the chunk, else the chunk start).
Grid (DHQK / bDK, S / bLq, BH).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import cdiv, dot, dot_nt, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def parallel_bw_dq_kernel(
    matQ_ref,  # (bLq, bDK)
    matK_ref,  # (S, bDK)
    matV_ref,  # (S, DHV)
    matDH_ref,  # (S, DHV)
    vecQlog_ref,  # (S,)
    vecKlog_ref,  # (S,)
    vecWinter_ref,  # (S,)
    vecDenInv_ref,  # (S,)
    vecDnq_ref,  # (S,)
    vecStart_ref,  # (S,) int32
    matC_states_ref,  # (NC+1, bDK, DHV)
    vecN_states_ref,  # (NC+1, bDK)
    matDQ_ref,  # out (bLq, bDK)
    vecDqq_ref,  # out (bLq,)
    *,
    L: int,
    bLq: int,
    bLkv: int,
    bDV: int,
    qk_scale: float,
):
    """Kernel body of one (DHQK tile, query block, batch*head) program.

    Matrix products take loaded tiles (dh, v, k) or a state tile transposed before its cast; the
    per-row scale 1/den is applied to the fp32 products (dh is never rounded after scaling).
    """
    dtype = matK_ref.dtype
    nDV = matV_ref.shape[-1] // bDV
    iq = pl.program_id(1)
    t0 = pl.multiple_of(iq * bLq, bLq)
    k = jax.lax.div(iq, jnp.int32(L // bLq))
    c0 = pl.multiple_of(k * L, L)
    vecDenInv = vecDenInv_ref[pl.ds(t0, bLq)]
    vecDnq = vecDnq_ref[pl.ds(t0, bLq)]

    def dh_tile(e):
        return matDH_ref[pl.ds(t0, bLq), pl.ds(e * bDV, bDV)]

    dh_fixed = [dh_tile(0)] if nDV == 1 else None
    get_dh = (lambda e: dh_fixed[0]) if nDV == 1 else dh_tile

    # inter-chunk part: winter_t (C_{k-1} dnum_t + dnq_t n_{k-1})
    acc = jnp.zeros((bLq, matK_ref.shape[-1]), _F32)
    for e in range(nDV):
        matCT_e = matC_states_ref[k, :, pl.ds(e * bDV, bDV)].T.astype(dtype)  # (bDV, bDK)
        acc = acc + dot(get_dh(e), matCT_e)
    acc = acc * vecDenInv[:, None] + vecDnq[:, None] * vecN_states_ref[k, :][None, :]
    acc = acc * vecWinter_ref[pl.ds(t0, bLq)][:, None]

    # intra-chunk part
    vecQlog = vecQlog_ref[pl.ds(t0, bLq)]
    vecStart = vecStart_ref[pl.ds(t0, bLq)]
    idx_t = t0 + jnp.arange(bLq, dtype=jnp.int32)

    def body(j, acc):
        s0 = pl.multiple_of(c0 + j * bLkv, bLkv)
        matDP = jnp.zeros((bLq, bLkv), _F32)
        for e in range(nDV):
            matDP = matDP + dot_nt(get_dh(e), matV_ref[pl.ds(s0, bLkv), pl.ds(e * bDV, bDV)])
        matDP = matDP * vecDenInv[:, None] + vecDnq[:, None]
        idx_s = s0 + jnp.arange(bLkv, dtype=jnp.int32)
        mask = (idx_t[:, None] >= idx_s[None, :]) & (idx_s[None, :] >= vecStart[:, None])
        matLogD = vecQlog[:, None] + vecKlog_ref[pl.ds(s0, bLkv)][None, :]
        matDS = matDP * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))
        return acc + dot(matDS.astype(dtype), matK_ref[pl.ds(s0, bLkv), :])

    acc = jax.lax.fori_loop(jnp.int32(0), cdiv(t0 - c0 + bLq, bLkv), body, acc)
    matDQ = acc * qk_scale
    matDQ_ref[...] = matDQ.astype(matDQ_ref.dtype)
    vecDqq_ref[...] = jnp.sum(matDQ * matQ_ref[...].astype(_F32), axis=1)


def parallel_bw_dq(
    matQ: jax.Array,  # (BH, S, DHQK)
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    matDH: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S)
    vecKlog: jax.Array,  # (BH, S)
    vecWinter: jax.Array,  # (BH, S)
    vecDenInv: jax.Array,  # (BH, S)
    vecDnq: jax.Array,  # (BH, S)
    vecStart: jax.Array,  # (BH, S) int32
    matC_states: jax.Array,  # (BH, NC+1, DHQK, DHV)
    vecN_states: jax.Array,  # (BH, NC+1, DHQK)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    output_dtype,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Launch ``parallel_bw_dq_kernel``: dQ (BH, S, DHQK) in ``output_dtype``, <dq, q> (BH, S) fp32."""
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    NC1 = matC_states.shape[1]
    L = params.chunk_size_intra
    bLq, bLkv = params.siz_b_L_parallel, params.siz_b_L_loop
    bDK = params.tile("siz_b_DH_parallel", DHQK)
    bDV = params.tile("siz_b_DH_loop", DHV)
    nDK = DHQK // bDK
    kernel = functools.partial(
        parallel_bw_dq_kernel, L=L, bLq=bLq, bLkv=bLkv, bDV=bDV, qk_scale=float(qk_scale)
    )
    seq = pl.BlockSpec((None, S), lambda idk, iq, b: (b, 0))
    matDQ, vecDqq = launch(
        kernel,
        grid=(nDK, S // bLq, BH),
        in_specs=[
            pl.BlockSpec((None, bLq, bDK), lambda idk, iq, b: (b, iq, idk)),
            pl.BlockSpec((None, S, bDK), lambda idk, iq, b: (b, 0, idk)),
            pl.BlockSpec((None, S, DHV), lambda idk, iq, b: (b, 0, 0)),
            pl.BlockSpec((None, S, DHV), lambda idk, iq, b: (b, 0, 0)),
            seq, seq, seq, seq, seq, seq,
            pl.BlockSpec((None, NC1, bDK, DHV), lambda idk, iq, b: (b, 0, idk, 0)),
            pl.BlockSpec((None, NC1, bDK), lambda idk, iq, b: (b, 0, idk)),
        ],
        out_specs=[
            pl.BlockSpec((None, bLq, bDK), lambda idk, iq, b: (b, iq, idk)),
            pl.BlockSpec((None, None, bLq), lambda idk, iq, b: (idk, b, iq)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, S, DHQK), output_dtype),
            jax.ShapeDtypeStruct((nDK, BH, S), _F32),
        ],
        num_warps=params.num_warps_intra,
        num_stages=params.num_stages_intra,
        interpret=interpret,
        name="mlstm_chunkwise_parallel_bw_dq",
    )(matQ, matK, matV, matDH, vecQlog, vecKlog, vecWinter, vecDenInv, vecDnq, vecStart, matC_states,
      vecN_states)
    return matDQ, jnp.sum(vecDqq, axis=0)
