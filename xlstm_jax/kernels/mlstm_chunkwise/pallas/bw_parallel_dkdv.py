"""Backward parallel kernel for dK and dV together (``fuse_dkdv=True``).

Notation (see ``gates.py``, ``bw_parallel_dk.py``, ``bw_parallel_dv.py``): bLk = siz_b_L_parallel
key rows per program, bLq = siz_b_L_loop query rows per loop iteration; a program owns all DHQK
columns of dK and all DHV columns of dV of its key block, and the contracted head dims are tiled
by siz_b_DH_loop (bDK for k . q, bDV for v . dnum). For key s in chunk k:

    dk_s = qk_scale sum_{t >= s in chunk, z_t <= s} dP[t, s] D[t, s] q_t + vecWstate_s (dC_k v_s + dn_k)
    dv_s = sum_{t >= s in chunk, z_t <= s} (qs_t . k_s) D[t, s] dnum_t + vecWstate_s dC_k^T k_s

with D[t, s] = exp2(vecQlog_t + vecKlog_s), dP[t, s] = v_s . dnum_t + dnq_t. The two separate
kernels each load the query block's q and dh tiles and evaluate the gate tile D; here they are
loaded and evaluated once, for the two products per tile (S^T for dV, dP^T for dK). The
accumulators are bLk x (DHQK + DHV) fp32 values per program (24 K at the small heads 64 / 128 with
bLk = 128): meant for small heads; at large heads a smaller siz_b_L_parallel, or the separate
kernels. The kernel also writes <dk_s, k_s> and <state part of dk_s, k_s> as the dK kernel does.

Grid (S / bLk, BH).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot, dot_nt, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def parallel_bw_dkdv_kernel(
    matQ_ref,  # (S, DHQK)
    matK_ref,  # (bLk, DHQK)
    matV_ref,  # (bLk, DHV)
    matDH_ref,  # (S, DHV)
    vecQlog_ref,  # (S,)
    vecKlog_ref,  # (S,)
    vecWstate_ref,  # (S,)
    vecDenInv_ref,  # (S,)
    vecDnq_ref,  # (S,)
    vecStart_ref,  # (S,) int32
    matDC_states_ref,  # (NC+1, DHQK, DHV)
    vecDN_states_ref,  # (NC+1, DHQK)
    matDK_ref,  # out (bLk, DHQK)
    matDV_ref,  # out (bLk, DHV)
    vecDkk_ref,  # out (bLk,)
    vecDkkState_ref,  # out (bLk,)
    *,
    L: int,
    bLk: int,
    bLq: int,
    bDK: int,
    bDV: int,
    qk_scale: float,
):
    """Kernel body of one (key block, batch*head) program."""
    dtype = matQ_ref.dtype
    DHQK, DHV = matQ_ref.shape[-1], matDH_ref.shape[-1]
    nDK, nDV = DHQK // bDK, DHV // bDV
    ik = pl.program_id(0)
    s0 = pl.multiple_of(ik * bLk, bLk)
    k = jax.lax.div(ik, jnp.int32(L // bLk))
    c0 = pl.multiple_of(k * L, L)

    k_tiles = [matK_ref[:, pl.ds(d * bDK, bDK)] for d in range(nDK)]
    v_tiles = [matV_ref[:, pl.ds(e * bDV, bDV)] for e in range(nDV)]

    # state parts (index k + 1: the state leaving chunk k): dC_k v_s + dn_k and dC_k^T k_s
    acc_state_k = jnp.zeros((bLk, DHQK), _F32)
    for e in range(nDV):
        matDCT_e = matDC_states_ref[k + 1, :, pl.ds(e * bDV, bDV)].T.astype(dtype)  # (bDV, DHQK)
        acc_state_k = acc_state_k + dot(v_tiles[e], matDCT_e)
    acc_state_k = acc_state_k + vecDN_states_ref[k + 1, :][None, :]
    acc_state_v = jnp.zeros((bLk, DHV), _F32)
    for d in range(nDK):
        matDC_d = matDC_states_ref[k + 1, pl.ds(d * bDK, bDK), :]
        acc_state_v = acc_state_v + dot(k_tiles[d], matDC_d.astype(dtype))

    vecKlog = vecKlog_ref[pl.ds(s0, bLk)]
    idx_s = s0 + jnp.arange(bLk, dtype=jnp.int32)

    def body(j, carry):
        acc_k, acc_v = carry
        t0 = pl.multiple_of(c0 + j * bLq, bLq)
        matSt = jnp.zeros((bLk, bLq), _F32)
        for d in range(nDK):
            matSt = matSt + dot_nt(k_tiles[d], matQ_ref[pl.ds(t0, bLq), pl.ds(d * bDK, bDK)])
        matDPt = jnp.zeros((bLk, bLq), _F32)
        for e in range(nDV):
            matDPt = matDPt + dot_nt(v_tiles[e], matDH_ref[pl.ds(t0, bLq), pl.ds(e * bDV, bDV)])
        vecDenInv = vecDenInv_ref[pl.ds(t0, bLq)]
        idx_t = t0 + jnp.arange(bLq, dtype=jnp.int32)
        vecStart = vecStart_ref[pl.ds(t0, bLq)]
        mask = (idx_t[None, :] >= idx_s[:, None]) & (idx_s[:, None] >= vecStart[None, :])
        matLogDt = vecKlog[:, None] + vecQlog_ref[pl.ds(t0, bLq)][None, :]
        matDt = jnp.exp2(jnp.where(mask, matLogDt, -jnp.inf))  # the gate tile, once for both products
        matDSt = (matDPt * vecDenInv[None, :] + vecDnq_ref[pl.ds(t0, bLq)][None, :]) * matDt
        matPt = (matSt * (vecDenInv * qk_scale)[None, :]) * matDt
        acc_k = acc_k + dot(matDSt.astype(dtype), matQ_ref[pl.ds(t0, bLq), :])
        acc_v = acc_v + dot(matPt.astype(dtype), matDH_ref[pl.ds(t0, bLq), :])
        return acc_k, acc_v

    j0 = jax.lax.div(s0 - c0, jnp.int32(bLq))
    init = (jnp.zeros((bLk, DHQK), _F32), jnp.zeros((bLk, DHV), _F32))
    acc_k, acc_v = jax.lax.fori_loop(j0, jnp.int32(L // bLq), body, init)
    vecW = vecWstate_ref[pl.ds(s0, bLk)][:, None]
    matDK_state = vecW * acc_state_k
    matDK = acc_k * qk_scale + matDK_state
    matDK_ref[...] = matDK.astype(matDK_ref.dtype)
    matDV_ref[...] = (acc_v + vecW * acc_state_v).astype(matDV_ref.dtype)
    matK = matK_ref[...].astype(_F32)
    vecDkk_ref[...] = jnp.sum(matDK * matK, axis=1)
    vecDkkState_ref[...] = jnp.sum(matDK_state * matK, axis=1)


def parallel_bw_dkdv(
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
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Launch ``parallel_bw_dkdv_kernel``: (dK, <dk, k>, <dk_state, k>, dV), as ``parallel_bw_dk``
    and ``parallel_bw_dv`` return them."""
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    NC1 = matDC_states.shape[1]
    L = params.chunk_size_intra
    bLk, bLq = params.siz_b_L_parallel, params.siz_b_L_loop
    bDK = params.tile("siz_b_DH_loop", DHQK)
    bDV = params.tile("siz_b_DH_loop", DHV)
    kernel = functools.partial(
        parallel_bw_dkdv_kernel, L=L, bLk=bLk, bLq=bLq, bDK=bDK, bDV=bDV, qk_scale=float(qk_scale)
    )
    seq = pl.BlockSpec((None, S), lambda ik, b: (b, 0))
    matDK, matDV, vecDkk, vecDkkState = launch(
        kernel,
        grid=(S // bLk, BH),
        in_specs=[
            pl.BlockSpec((None, S, DHQK), lambda ik, b: (b, 0, 0)),
            pl.BlockSpec((None, bLk, DHQK), lambda ik, b: (b, ik, 0)),
            pl.BlockSpec((None, bLk, DHV), lambda ik, b: (b, ik, 0)),
            pl.BlockSpec((None, S, DHV), lambda ik, b: (b, 0, 0)),
            seq, seq, seq, seq, seq, seq,
            pl.BlockSpec((None, NC1, DHQK, DHV), lambda ik, b: (b, 0, 0, 0)),
            pl.BlockSpec((None, NC1, DHQK), lambda ik, b: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bLk, DHQK), lambda ik, b: (b, ik, 0)),
            pl.BlockSpec((None, bLk, DHV), lambda ik, b: (b, ik, 0)),
            pl.BlockSpec((None, bLk), lambda ik, b: (b, ik)),
            pl.BlockSpec((None, bLk), lambda ik, b: (b, ik)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, S, DHQK), output_dtype),
            jax.ShapeDtypeStruct((BH, S, DHV), output_dtype),
            jax.ShapeDtypeStruct((BH, S), _F32),
            jax.ShapeDtypeStruct((BH, S), _F32),
        ],
        num_warps=params.num_warps_intra,
        num_stages=params.num_stages_intra,
        interpret=interpret,
        name="mlstm_chunkwise_parallel_bw_dkdv",
    )(matQ, matK, matV, matDH, vecQlog, vecKlog, vecWstate, vecDenInv, vecDnq, vecStart, matDC_states,
      vecDN_states)
    return matDK, vecDkk, vecDkkState, matDV
