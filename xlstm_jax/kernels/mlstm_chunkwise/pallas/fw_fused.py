"""Fused forward kernel (``fw_impl="fused"``): the state recurrence and h in one pass over the chunks.

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, NC = S / L, Li = chunk_size_inter,
bLq = siz_b_L_parallel query rows per block, bLkv = siz_b_L_loop key rows per block, bV =
siz_b_DH_parallel value columns per program.

The split forward (``fw_recurrent`` then ``fw_parallel``) writes the chunk-border states C_k
(BH, NC+1, DHQK, DHV) to memory and reads them back, and reads k and v twice. Here one program
owns a (batch*head, DHV tile) pair and walks its NC chunks in order, the state tile C (DHQK, bV)
and n (DHQK) in fp32 registers: for chunk k it computes h of the chunk's queries from the entering
state C_{k-1} and the causal intra-chunk part (the formulas of ``fw_parallel``, same roundings: the
state is cast to the kernel dtype for the q.C product), then folds the chunk into the state (the
formula of ``fw_recurrent``). The border states are written only when the backward pass keeps them
(``store_states``); the last state always (fp32).

Grid (DHV / bV, BH): fewer programs than the split kernels (no parallelism over chunks), so it
suits many (batch*head) rows or short sequences; the tuner decides (``tuning.SEARCH_SPACE``).
Every program computes the same n and the same q.k scores of its rows (they do not depend on the
DHV tile); nq is written by every program (identical values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot, dot_nt, dot_tn, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def fused_fw_kernel(
    matQ_ref,  # (S, DHQK)
    matK_ref,  # (S, DHQK)
    matV_ref,  # (S, bV)
    vecQlog_ref,  # (S,)
    vecKlog_ref,  # (S,)
    vecWinter_ref,  # (S,)
    vecM_ref,  # (S,)
    vecStart_ref,  # (S,) int32
    vecWstate_ref,  # (S,)
    vecDecay_ref,  # (NC,)
    matC0_ref,  # (DHQK, bV)
    vecN0_ref,  # (DHQK,)
    matH_ref,  # out (S, bV)
    vecNq_ref,  # out (S,)
    matC_last_ref,  # out (DHQK, bV) fp32
    vecN_last_ref,  # out (DHQK,)
    *states_refs,  # (matC_states_ref (NC+1, DHQK, bV), vecN_states_ref (NC+1, DHQK)) with store_states
    NC: int,
    L: int,
    L_inter: int,
    bLq: int,
    bLkv: int,
    qk_scale: float,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
):
    """Kernel body of one (DHV tile, batch*head) program."""
    dtype = matQ_ref.dtype

    def chunk(k, carry):
        matC, vecN = carry
        if states_refs:
            states_refs[0][k, :, :] = matC.astype(states_refs[0].dtype)
            states_refs[1][k, :] = vecN
        c0 = pl.multiple_of(k * L, L)
        matC_k = matC.astype(dtype)  # the q.C product's operand (fw_parallel casts the stored state alike)
        for iq in range(L // bLq):  # static: query blocks of the chunk
            t0 = pl.multiple_of(c0 + iq * bLq, bLq)
            q = matQ_ref[pl.ds(t0, bLq), :]
            vecW = vecWinter_ref[pl.ds(t0, bLq)] * qk_scale
            acc = dot(q, matC_k) * vecW[:, None]
            vecNq = jnp.sum(q.astype(_F32) * vecN[None, :], axis=1) * vecW
            vecQlog = vecQlog_ref[pl.ds(t0, bLq)]
            vecStart = vecStart_ref[pl.ds(t0, bLq)]
            idx_t = t0 + jnp.arange(bLq, dtype=jnp.int32)
            for j in range(-(-((iq + 1) * bLq) // bLkv)):  # static: key blocks up to the diagonal
                s0 = pl.multiple_of(c0 + j * bLkv, bLkv)
                matS = dot_nt(q, matK_ref[pl.ds(s0, bLkv), :])
                idx_s = s0 + jnp.arange(bLkv, dtype=jnp.int32)
                mask = (idx_t[:, None] >= idx_s[None, :]) & (idx_s[None, :] >= vecStart[:, None])
                matLogD = vecQlog[:, None] + vecKlog_ref[pl.ds(s0, bLkv)][None, :]
                matP = (matS * qk_scale) * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))
                acc = acc + dot(matP.astype(dtype), matV_ref[pl.ds(s0, bLkv), :])
                vecNq = vecNq + jnp.sum(matP, axis=1)
            vecM = vecM_ref[pl.ds(t0, bLq)]
            if stabilize_correctly:
                vecLam = norm_val * jnp.exp(-vecM)
            else:
                vecLam = jnp.full((bLq,), norm_val, _F32)
            vecDen = jnp.maximum(jnp.abs(vecNq), vecLam) + eps
            matH_ref[pl.ds(t0, bLq), :] = (acc / vecDen[:, None]).astype(matH_ref.dtype)
            vecNq_ref[pl.ds(t0, bLq)] = vecNq
        scaDecay = vecDecay_ref[k]
        matC = matC * scaDecay
        vecN = vecN * scaDecay
        for j in range(L // L_inter):  # static: sub-chunks of chunk_size_inter steps
            s0 = pl.multiple_of(c0 + j * L_inter, L_inter)
            vecWs = vecWstate_ref[pl.ds(s0, L_inter)]
            matKw = matK_ref[pl.ds(s0, L_inter), :].astype(_F32) * vecWs[:, None]
            matC = matC + dot_tn(matKw.astype(dtype), matV_ref[pl.ds(s0, L_inter), :])
            vecN = vecN + jnp.sum(matKw, axis=0)
        return matC, vecN

    init = (matC0_ref[...].astype(_F32), vecN0_ref[...].astype(_F32))
    matC, vecN = jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, init)
    if states_refs:
        states_refs[0][NC, :, :] = matC.astype(states_refs[0].dtype)
        states_refs[1][NC, :] = vecN
    matC_last_ref[...] = matC
    vecN_last_ref[...] = vecN


def fused_fw(
    matQ: jax.Array,  # (BH, S, DHQK)
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S)
    vecKlog: jax.Array,  # (BH, S)
    vecWinter: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S)
    vecStart: jax.Array,  # (BH, S) int32
    vecWstate: jax.Array,  # (BH, S)
    vecDecay: jax.Array,  # (BH, NC)
    matC0: jax.Array,  # (BH, DHQK, DHV) fp32
    vecN0: jax.Array,  # (BH, DHQK)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
    output_dtype,
    store_states: bool,
    states_dtype=None,
    interpret: bool,
):
    """Launch ``fused_fw_kernel``: (h (BH, S, DHV), nq (BH, S), C_last (BH, DHQK, DHV) fp32,
    n_last (BH, DHQK), C_states, n_states); the two state arrays ((BH, NC+1, DHQK, DHV) in
    ``states_dtype``, default fp32, and (BH, NC+1, DHQK) fp32) only with ``store_states``, else None."""
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    L, L_inter = params.chunk_size_intra, params.chunk_size_inter
    NC = S // L
    bLq, bLkv = min(params.siz_b_L_parallel, L), min(params.siz_b_L_loop, L)
    bV = params.tile("siz_b_DH_parallel", DHV)
    cdt = _F32 if states_dtype is None else jnp.dtype(states_dtype)
    kernel = functools.partial(
        fused_fw_kernel, NC=NC, L=L, L_inter=L_inter, bLq=bLq, bLkv=bLkv, qk_scale=float(qk_scale),
        eps=float(eps), norm_val=float(norm_val), stabilize_correctly=bool(stabilize_correctly),
    )
    seq = pl.BlockSpec((None, S), lambda iv, b: (b, 0))
    out_specs = [
        pl.BlockSpec((None, S, bV), lambda iv, b: (b, 0, iv)),
        seq,
        pl.BlockSpec((None, DHQK, bV), lambda iv, b: (b, 0, iv)),
        pl.BlockSpec((None, DHQK), lambda iv, b: (b, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((BH, S, DHV), output_dtype),
        jax.ShapeDtypeStruct((BH, S), _F32),
        jax.ShapeDtypeStruct((BH, DHQK, DHV), _F32),
        jax.ShapeDtypeStruct((BH, DHQK), _F32),
    ]
    if store_states:
        out_specs += [
            pl.BlockSpec((None, NC + 1, DHQK, bV), lambda iv, b: (b, 0, 0, iv)),
            pl.BlockSpec((None, NC + 1, DHQK), lambda iv, b: (b, 0, 0)),
        ]
        out_shape += [
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHV), cdt),
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK), _F32),
        ]
    out = launch(
        kernel,
        grid=(DHV // bV, BH),
        in_specs=[
            pl.BlockSpec((None, S, DHQK), lambda iv, b: (b, 0, 0)),
            pl.BlockSpec((None, S, DHQK), lambda iv, b: (b, 0, 0)),
            pl.BlockSpec((None, S, bV), lambda iv, b: (b, 0, iv)),
            seq, seq, seq, seq, seq, seq,
            pl.BlockSpec((None, NC), lambda iv, b: (b, 0)),
            pl.BlockSpec((None, DHQK, bV), lambda iv, b: (b, 0, iv)),
            pl.BlockSpec((None, DHQK), lambda iv, b: (b, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        num_warps=params.num_warps_intra,
        num_stages=params.num_stages_intra,
        interpret=interpret,
        name="mlstm_chunkwise_fused_fw",
    )(matQ, matK, matV, vecQlog, vecKlog, vecWinter, vecM, vecStart, vecWstate, vecDecay, matC0, vecN0)
    matH, vecNq, matC_last, vecN_last = out[:4]
    if store_states:
        return matH, vecNq, matC_last, vecN_last, out[4], out[5]
    return matH, vecNq, matC_last, vecN_last, None, None
