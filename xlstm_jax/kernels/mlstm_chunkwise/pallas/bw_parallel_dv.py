"""Backward parallel kernel for dV.

Notation (see ``gates.py`` and ``bw_parallel_dk.py``): bLk = siz_b_L_parallel key rows per program,
bLq = siz_b_L_loop query rows per loop iteration, bDV = siz_b_DH_parallel (the dV columns a program
owns), bDK = siz_b_DH_loop (the DHQK tile of k . q). For key s in chunk k:

    dv_s = sum_{t >= s in chunk, z_t <= s} (qs_t . k_s) exp2(vecQlog_t + vecKlog_s) dnum_t + vecWstate_s dC_k^T k_s

with z_t = vecStart_t (the latest reset <= t in the chunk, else the chunk start).
V enters neither the normalizer nor m, so dV is the same in both gradient conventions.
Grid (DHV / bDV, S / bLk, BH).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot, dot_nt, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def parallel_bw_dv_kernel(
    matQ_ref,  # (S, DHQK)
    matK_ref,  # (S, DHQK)
    matDH_ref,  # (S, bDV)
    vecQlog_ref,  # (S,)
    vecKlog_ref,  # (S,)
    vecWstate_ref,  # (S,)
    vecDenInv_ref,  # (S,)
    vecStart_ref,  # (S,) int32
    matDC_states_ref,  # (NC+1, DHQK, bDV)
    matDV_ref,  # out (bLk, bDV)
    *,
    L: int,
    bLk: int,
    bLq: int,
    bDK: int,
    qk_scale: float,
):
    """Kernel body of one (DHV tile, key block, batch*head) program."""
    dtype = matQ_ref.dtype
    nDK = matQ_ref.shape[-1] // bDK
    ik = pl.program_id(1)
    s0 = pl.multiple_of(ik * bLk, bLk)
    k = jax.lax.div(ik, jnp.int32(L // bLk))
    c0 = pl.multiple_of(k * L, L)

    def k_tile(d):
        return matK_ref[pl.ds(s0, bLk), pl.ds(d * bDK, bDK)]

    k_fixed = [k_tile(0)] if nDK == 1 else None
    get_k = (lambda d: k_fixed[0]) if nDK == 1 else k_tile

    # state part: dC_k^T k_s (index k + 1: the state leaving chunk k)
    acc_state = jnp.zeros((bLk, matDH_ref.shape[-1]), _F32)
    for d in range(nDK):
        matDC_d = matDC_states_ref[k + 1, pl.ds(d * bDK, bDK), :]
        acc_state = acc_state + dot(get_k(d), matDC_d.astype(dtype))

    vecKlog = vecKlog_ref[pl.ds(s0, bLk)]
    idx_s = s0 + jnp.arange(bLk, dtype=jnp.int32)

    def body(j, acc):
        t0 = pl.multiple_of(c0 + j * bLq, bLq)
        matSt = jnp.zeros((bLk, bLq), _F32)
        for d in range(nDK):
            matSt = matSt + dot_nt(get_k(d), matQ_ref[pl.ds(t0, bLq), pl.ds(d * bDK, bDK)])
        idx_t = t0 + jnp.arange(bLq, dtype=jnp.int32)
        vecStart = vecStart_ref[pl.ds(t0, bLq)]
        mask = (idx_t[None, :] >= idx_s[:, None]) & (idx_s[:, None] >= vecStart[None, :])
        matLogDt = vecKlog[:, None] + vecQlog_ref[pl.ds(t0, bLq)][None, :]
        # P^T scaled by 1/den per query column, then a product with the loaded dh tile
        vecScale = vecDenInv_ref[pl.ds(t0, bLq)] * qk_scale
        matPt = (matSt * vecScale[None, :]) * jnp.exp2(jnp.where(mask, matLogDt, -jnp.inf))
        return acc + dot(matPt.astype(dtype), matDH_ref[pl.ds(t0, bLq), :])

    j0 = jax.lax.div(s0 - c0, jnp.int32(bLq))
    acc = jax.lax.fori_loop(j0, jnp.int32(L // bLq), body, jnp.zeros((bLk, matDH_ref.shape[-1]), _F32))
    matDV = acc + vecWstate_ref[pl.ds(s0, bLk)][:, None] * acc_state
    matDV_ref[...] = matDV.astype(matDV_ref.dtype)


def parallel_bw_dv(
    matQ: jax.Array,  # (BH, S, DHQK)
    matK: jax.Array,  # (BH, S, DHQK)
    matDH: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S)
    vecKlog: jax.Array,  # (BH, S)
    vecWstate: jax.Array,  # (BH, S)
    vecDenInv: jax.Array,  # (BH, S)
    vecStart: jax.Array,  # (BH, S) int32
    matDC_states: jax.Array,  # (BH, NC+1, DHQK, DHV)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    output_dtype,
    interpret: bool,
) -> jax.Array:
    """Launch ``parallel_bw_dv_kernel``: dV (BH, S, DHV) in ``output_dtype``."""
    BH, S, DHQK = matQ.shape
    DHV = matDH.shape[-1]
    NC1 = matDC_states.shape[1]
    L = params.chunk_size_intra
    bLk, bLq = params.siz_b_L_parallel, params.siz_b_L_loop
    bDV = params.tile("siz_b_DH_parallel", DHV)
    bDK = params.tile("siz_b_DH_loop", DHQK)
    kernel = functools.partial(
        parallel_bw_dv_kernel, L=L, bLk=bLk, bLq=bLq, bDK=bDK, qk_scale=float(qk_scale)
    )
    seq = pl.BlockSpec((None, S), lambda iv, ik, b: (b, 0))
    return launch(
        kernel,
        grid=(DHV // bDV, S // bLk, BH),
        in_specs=[
            pl.BlockSpec((None, S, DHQK), lambda iv, ik, b: (b, 0, 0)),
            pl.BlockSpec((None, S, DHQK), lambda iv, ik, b: (b, 0, 0)),
            pl.BlockSpec((None, S, bDV), lambda iv, ik, b: (b, 0, iv)),
            seq, seq, seq, seq, seq,
            pl.BlockSpec((None, NC1, DHQK, bDV), lambda iv, ik, b: (b, 0, 0, iv)),
        ],
        out_specs=pl.BlockSpec((None, bLk, bDV), lambda iv, ik, b: (b, ik, iv)),
        out_shape=jax.ShapeDtypeStruct((BH, S, DHV), output_dtype),
        num_warps=params.num_warps_intra,
        num_stages=params.num_stages_intra,
        interpret=interpret,
        name="mlstm_chunkwise_parallel_bw_dv",
    )(matQ, matK, matDH, vecQlog, vecKlog, vecWstate, vecDenInv, vecStart, matDC_states)
