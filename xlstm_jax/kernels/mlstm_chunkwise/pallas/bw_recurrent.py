"""Backward recurrent kernel: the cotangents of the states (C, n) at every chunk border.

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, Li = chunk_size_inter, NC = S / L;
dnum_t = dh_t / den_t (``vecDenInv``), dnq_t the cotangent of qs_t . n_t (zero in the TFLA
convention). With dC_NC = dC_last, going backwards over the chunks k = NC .. 1:

    dC_{k-1} = vecDecay_k dC_k + sum_{t in chunk k} vecWinter_t qs_t dnum_t^T
    dn_{k-1} = vecDecay_k dn_k + sum_{t in chunk k} vecWinter_t qs_t dnq_t

Index k of the output is the cotangent of the state after chunk k (index 0: the initial state).
Grid (DHQK / bK, DHV / bV, BH); each program keeps an fp32 (bK, bV) tile and walks the chunks in
reverse, L / Li matrix products of (bK, Li) x (Li, bV) per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot_tn, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def recurrent_bw_kernel(
    matQ_ref,  # (S, bK)
    matDH_ref,  # (S, bV)
    vecWinter_ref,  # (S,)
    vecDenInv_ref,  # (S,)
    vecDnq_ref,  # (S,)
    vecDecay_ref,  # (NC,)
    matDC_last_ref,  # (bK, bV)
    vecDN_last_ref,  # (bK,)
    matDC_states_ref,  # out (NC+1, bK, bV)
    vecDN_states_ref,  # out (NC+1, bK)
    *,
    NC: int,
    L: int,
    L_inter: int,
    qk_scale: float,
):
    """Kernel body of one (DHQK tile, DHV tile, batch*head) program."""
    dtype = matQ_ref.dtype

    def chunk(jj, carry):
        matDC, vecDN = carry
        k = NC - jj  # border after chunk k (1-based chunk index)
        matDC_states_ref[k, :, :] = matDC
        vecDN_states_ref[k, :] = vecDN
        scaDecay = vecDecay_ref[k - 1]
        matDC = matDC * scaDecay
        vecDN = vecDN * scaDecay
        for j in range(L // L_inter):
            s0 = pl.multiple_of((k - 1) * L + j * L_inter, L_inter)
            # the weights go onto dnum (one rounding to the kernel dtype); q stays exact
            vecW = vecWinter_ref[pl.ds(s0, L_inter)] * qk_scale
            matQc = matQ_ref[pl.ds(s0, L_inter), :]
            vecScale = vecW * vecDenInv_ref[pl.ds(s0, L_inter)]
            matDnumW = matDH_ref[pl.ds(s0, L_inter), :].astype(_F32) * vecScale[:, None]
            matDC = matDC + dot_tn(matQc, matDnumW.astype(dtype))
            vecDnqW = vecDnq_ref[pl.ds(s0, L_inter)] * vecW
            vecDN = vecDN + jnp.sum(matQc.astype(_F32) * vecDnqW[:, None], axis=0)
        return matDC, vecDN

    init = (matDC_last_ref[...].astype(_F32), vecDN_last_ref[...].astype(_F32))
    matDC, vecDN = jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, init)
    matDC_states_ref[0, :, :] = matDC
    vecDN_states_ref[0, :] = vecDN


def recurrent_bw_states(
    matQ: jax.Array,  # (BH, S, DHQK)
    matDH: jax.Array,  # (BH, S, DHV)
    vecWinter: jax.Array,  # (BH, S)
    vecDenInv: jax.Array,  # (BH, S)
    vecDnq: jax.Array,  # (BH, S)
    vecDecay: jax.Array,  # (BH, NC)
    matDC_last: jax.Array,  # (BH, DHQK, DHV)
    vecDN_last: jax.Array,  # (BH, DHQK)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Launch ``recurrent_bw_kernel``: (BH, NC+1, DHQK, DHV) and (BH, NC+1, DHQK), fp32."""
    BH, S, DHQK = matQ.shape
    DHV = matDH.shape[-1]
    L, L_inter = params.chunk_size_intra, params.chunk_size_inter
    NC = S // L
    bK = params.tile("siz_b_DHQK_inter", DHQK)
    bV = params.tile("siz_b_DHV_inter", DHV)
    kernel = functools.partial(
        recurrent_bw_kernel, NC=NC, L=L, L_inter=L_inter, qk_scale=float(qk_scale)
    )
    seq = pl.BlockSpec((None, S), lambda ik, iv, b: (b, 0))
    return launch(
        kernel,
        grid=(DHQK // bK, DHV // bV, BH),
        in_specs=[
            pl.BlockSpec((None, S, bK), lambda ik, iv, b: (b, 0, ik)),
            pl.BlockSpec((None, S, bV), lambda ik, iv, b: (b, 0, iv)),
            seq, seq, seq,
            pl.BlockSpec((None, NC), lambda ik, iv, b: (b, 0)),
            pl.BlockSpec((None, bK, bV), lambda ik, iv, b: (b, ik, iv)),
            pl.BlockSpec((None, bK), lambda ik, iv, b: (b, ik)),
        ],
        out_specs=[
            pl.BlockSpec((None, NC + 1, bK, bV), lambda ik, iv, b: (b, 0, ik, iv)),
            pl.BlockSpec((None, NC + 1, bK), lambda ik, iv, b: (b, 0, ik)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHV), _F32),
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK), _F32),
        ],
        num_warps=params.num_warps_inter,
        num_stages=params.num_stages_inter,
        interpret=interpret,
        name="mlstm_chunkwise_recurrent_bw",
    )(matQ, matDH, vecWinter, vecDenInv, vecDnq, vecDecay, matDC_last, vecDN_last)
