"""Backward recurrent kernel: the cotangents of the states (C, n) at every chunk border.

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, Li = chunk_size_inter, NC = S / L;
dnum_t = dh_t / den_t (``vecDenInv``), dnq_t the cotangent of qs_t . n_t (zero in the TFLA
convention). With dC_NC = dC_last, going backwards over the chunks k = NC .. 1:

    dC_{k-1} = vecDecay_k dC_k + sum_{t in chunk k} vecWinter_t qs_t dnum_t^T
    dn_{k-1} = vecDecay_k dn_k + sum_{t in chunk k} vecWinter_t qs_t dnq_t

Index k of the output is the cotangent of the state after chunk k (index 0: the initial state).
Grid (DHQK / bK, DHV / bV, BH); each program keeps an fp32 (bK, bV) tile and walks the chunks in
reverse, L / Li matrix products of (bK, Li) x (Li, bV) per chunk.

Options. ``states_dtype`` (``states_bf16``): dC is stored in the 16-bit kernel dtype (the dK / dV
kernels cast it to that dtype for their products anyway), with dC_0 also written in fp32.
``decay_grads`` (``gate_grads_impl="pallas"``): the program also loads the forward state tile
C_{k-1} (and n_{k-1}) of every chunk and writes the partial inner product

    vecDecay_k (<dC_k, C_{k-1}>_tile + [first DHV tile] <dn_k, n_{k-1}>_tile)

into a (DHQK / bK, DHV / bV, BH, NC) output, summed over the tiles by the launcher: the term
``scaDdecay`` of the logf gradients, without an XLA pass that reads both state arrays again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot_tn, launch
from .fw_recurrent import decay_stride_of
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def recurrent_bw_kernel(
    matQ_ref,  # (S, bK)
    matDH_ref,  # (S, bV)
    vecWinter_ref,  # (S,)
    vecDenInv_ref,  # (S,)
    vecDnq_ref,  # (S,)
    vecDecay_ref,  # (NC * decay_stride,)
    matDC_last_ref,  # (bK, bV)
    vecDN_last_ref,  # (bK,)
    *refs,  # [matC_states (NC+1, bK, bV), vecN_states (NC+1, bK)] if decay_grads, then the outputs:
    # matDC_states (NC+1, bK, bV), vecDN_states (NC+1, bK), [matDC0 (bK, bV) fp32 if split],
    # [scaDdecay partial (NC,) if decay_grads]
    NC: int,
    L: int,
    L_inter: int,
    qk_scale: float,
    split: bool = False,
    decay_grads: bool = False,
    decay_stride: int = 1,
):
    """Kernel body of one (DHQK tile, DHV tile, batch*head) program."""
    dtype = matQ_ref.dtype
    refs = list(refs)
    if decay_grads:
        matC_states_ref, vecN_states_ref = refs.pop(0), refs.pop(0)
    matDC_states_ref, vecDN_states_ref = refs.pop(0), refs.pop(0)
    matDC0_ref = refs.pop(0) if split else None
    scaDdecay_ref = refs.pop(0) if decay_grads else None
    first_v_tile = pl.program_id(1) == 0

    def chunk(jj, carry):
        matDC, vecDN = carry
        k = NC - jj  # border after chunk k (1-based chunk index)
        matDC_states_ref[k, :, :] = matDC.astype(matDC_states_ref.dtype)
        vecDN_states_ref[k, :] = vecDN
        scaDecay = vecDecay_ref[(k - 1) * decay_stride]
        if decay_grads:
            matC_prev = matC_states_ref[k - 1, :, :].astype(_F32)
            vecN_prev = vecN_states_ref[k - 1, :]
            part_n = jnp.where(first_v_tile, jnp.sum(vecDN * vecN_prev), 0.0)
            scaDdecay_ref[k - 1] = scaDecay * (jnp.sum(matDC * matC_prev) + part_n)
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
    matDC_states_ref[0, :, :] = matDC.astype(matDC_states_ref.dtype)
    vecDN_states_ref[0, :] = vecDN
    if split:
        matDC0_ref[...] = matDC


def recurrent_bw_states(
    matQ: jax.Array,  # (BH, S, DHQK)
    matDH: jax.Array,  # (BH, S, DHV)
    vecWinter: jax.Array,  # (BH, S)
    vecDenInv: jax.Array,  # (BH, S)
    vecDnq: jax.Array,  # (BH, S)
    vecDecay: jax.Array,  # (BH, NC), or (BH, S) repeated per chunk (``fw_recurrent.decay_stride_of``)
    matDC_last: jax.Array,  # (BH, DHQK, DHV)
    vecDN_last: jax.Array,  # (BH, DHQK)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    interpret: bool,
    states_dtype=None,
    matC_states: jax.Array | None = None,  # (BH, NC+1, DHQK, DHV): given -> decay_grads
    vecN_states: jax.Array | None = None,  # (BH, NC+1, DHQK)
):
    """Launch ``recurrent_bw_kernel``: (BH, NC+1, DHQK, DHV) and (BH, NC+1, DHQK), fp32.

    With ``states_dtype`` (16-bit) the dC states come in that dtype and dC_0 (BH, DHQK, DHV) fp32
    is returned next; with the forward states given, scaDdecay (BH, NC) is returned last.
    """
    BH, S, DHQK = matQ.shape
    DHV = matDH.shape[-1]
    L, L_inter = params.chunk_size_intra, params.chunk_size_inter
    NC = S // L
    bK = params.tile("siz_b_DHQK_inter", DHQK)
    bV = params.tile("siz_b_DHV_inter", DHV)
    cdt = _F32 if states_dtype is None else jnp.dtype(states_dtype)
    split = cdt != jnp.dtype(_F32)
    decay_grads = matC_states is not None
    nK, nV = DHQK // bK, DHV // bV
    kernel = functools.partial(
        recurrent_bw_kernel, NC=NC, L=L, L_inter=L_inter, qk_scale=float(qk_scale), split=split,
        decay_grads=decay_grads, decay_stride=decay_stride_of(vecDecay, NC, L),
    )
    seq = pl.BlockSpec((None, S), lambda ik, iv, b: (b, 0))
    state_spec = pl.BlockSpec((None, NC + 1, bK, bV), lambda ik, iv, b: (b, 0, ik, iv))
    vec_state_spec = pl.BlockSpec((None, NC + 1, bK), lambda ik, iv, b: (b, 0, ik))
    tile_spec = pl.BlockSpec((None, bK, bV), lambda ik, iv, b: (b, ik, iv))
    extra_in = [matC_states, vecN_states] if decay_grads else []
    out_specs = [state_spec, vec_state_spec]
    out_shape = [
        jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHV), cdt),
        jax.ShapeDtypeStruct((BH, NC + 1, DHQK), _F32),
    ]
    if split:
        out_specs.append(tile_spec)
        out_shape.append(jax.ShapeDtypeStruct((BH, DHQK, DHV), _F32))
    if decay_grads:
        out_specs.append(pl.BlockSpec((None, None, None, NC), lambda ik, iv, b: (ik, iv, b, 0)))
        out_shape.append(jax.ShapeDtypeStruct((nK, nV, BH, NC), _F32))
    out = launch(
        kernel,
        grid=(nK, nV, BH),
        in_specs=[
            pl.BlockSpec((None, S, bK), lambda ik, iv, b: (b, 0, ik)),
            pl.BlockSpec((None, S, bV), lambda ik, iv, b: (b, 0, iv)),
            seq, seq, seq,
            pl.BlockSpec((None, vecDecay.shape[1]), lambda ik, iv, b: (b, 0)),
            tile_spec,
            pl.BlockSpec((None, bK), lambda ik, iv, b: (b, ik)),
        ] + ([state_spec, vec_state_spec] if decay_grads else []),
        out_specs=out_specs,
        out_shape=out_shape,
        num_warps=params.num_warps_inter,
        num_stages=params.num_stages_inter,
        interpret=interpret,
        name="mlstm_chunkwise_recurrent_bw",
    )(matQ, matDH, vecWinter, vecDenInv, vecDnq, vecDecay, matDC_last, vecDN_last, *extra_in)
    out = list(out)
    if decay_grads:
        out[-1] = jnp.sum(out[-1], axis=(0, 1))
    return tuple(out)
