"""Forward recurrent (inter-chunk) kernel: the states (C, n) at every chunk border.

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, Li = chunk_size_inter, NC = S / L,
bK x bV the state tile one program owns (siz_b_DHQK_inter x siz_b_DHV_inter).

    C_k = vecDecay_k * C_{k-1} + sum_{s in chunk k} vecWstate_s k_s v_s^T      (n_k likewise with 1)

Grid (DHQK / bK, DHV / bV, BH); each program walks the NC chunks in order, keeps its fp32 state tile
in registers, stores it at every chunk border (index 0: the initial state), and folds each chunk in
with L / Li matrix products of (bK, Li) x (Li, bV) (bf16/fp16 operands, fp32 accumulation).
The stabilizers m are not computed here: they come from ``gates.max_state_scan``.

``states_dtype`` (``states_bf16``): the border states C are stored in the 16-bit kernel dtype
(the dtype the parallel kernels' products cast them to anyway: half the bytes written here and read
there), while the recurrence stays in fp32 registers; the last state C_NC is also written in fp32
(an extra (bK, bV) output). n stays fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import dot_tn, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def recurrent_fw_kernel(
    matK_ref,  # (S, bK)
    matV_ref,  # (S, bV)
    vecWstate_ref,  # (S,)
    vecDecay_ref,  # (NC * decay_stride,)
    *refs,  # [matC0 (bK, bV), vecN0 (bK,)] unless zero_initial; matC_states (NC+1, bK, bV) out,
    # vecN_states (NC+1, bK) out, [matC_last (bK, bV) fp32 out when the states are 16-bit]
    NC: int,
    L: int,
    L_inter: int,
    decay_stride: int = 1,
    zero_initial: bool = False,
):
    """Kernel body of one (DHQK tile, DHV tile, batch*head) program."""
    dtype = matK_ref.dtype
    refs = list(refs)
    matC0_ref, vecN0_ref = (None, None) if zero_initial else (refs.pop(0), refs.pop(0))
    matC_states_ref, vecN_states_ref = refs.pop(0), refs.pop(0)
    rest = refs

    def chunk(k, carry):
        matC, vecN = carry
        matC_states_ref[k, :, :] = matC.astype(matC_states_ref.dtype)
        vecN_states_ref[k, :] = vecN
        scaDecay = vecDecay_ref[k * decay_stride]
        matC = matC * scaDecay
        vecN = vecN * scaDecay
        for j in range(L // L_inter):  # static: sub-chunks of chunk_size_inter steps
            s0 = pl.multiple_of(k * L + j * L_inter, L_inter)
            matKc = matK_ref[pl.ds(s0, L_inter), :]
            matVc = matV_ref[pl.ds(s0, L_inter), :]
            vecW = vecWstate_ref[pl.ds(s0, L_inter)]
            matKw = matKc.astype(_F32) * vecW[:, None]
            matC = matC + dot_tn(matKw.astype(dtype), matVc)
            vecN = vecN + jnp.sum(matKw, axis=0)
        return matC, vecN

    if zero_initial:
        bK, bV = matC_states_ref.shape[-2:]
        init = (jnp.zeros((bK, bV), _F32), jnp.zeros((bK,), _F32))
    else:
        init = (matC0_ref[...].astype(_F32), vecN0_ref[...].astype(_F32))
    matC, vecN = jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, init)
    matC_states_ref[NC, :, :] = matC.astype(matC_states_ref.dtype)
    vecN_states_ref[NC, :] = vecN
    if rest:
        rest[0][...] = matC


def decay_stride_of(vecDecay: jax.Array, NC: int, L: int) -> int:
    """1 for vecDecay (BH, NC), L for the (BH, NC * L) layout (each chunk's decay repeated);
    ``ValueError`` otherwise."""
    n = vecDecay.shape[-1]
    if n == NC:
        return 1
    if n == NC * L:
        return L
    raise ValueError(f"vecDecay must have NC={NC} or NC*L={NC * L} columns; got shape {vecDecay.shape}")


def recurrent_fw_states(
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    vecWstate: jax.Array,  # (BH, S)
    vecDecay: jax.Array,  # (BH, NC), or (BH, S): each chunk's decay repeated over its L steps
    matC0: jax.Array | None,  # (BH, DHQK, DHV); None (with vecN0 None): the zero state, not loaded
    vecN0: jax.Array | None,  # (BH, DHQK)
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
    states_dtype=None,
):
    """Launch ``recurrent_fw_kernel``: states (BH, NC+1, DHQK, DHV) and (BH, NC+1, DHQK), fp32.

    With ``states_dtype`` (a 16-bit dtype) the C states come in that dtype and a third output, the
    last state C_NC (BH, DHQK, DHV) in fp32, is returned. ``vecDecay`` in the (BH, S) layout of the
    Pallas gate kernels is read at every chunk's first step (no XLA slice before the launch).
    """
    BH, S, DHQK = matK.shape
    DHV = matV.shape[-1]
    L, L_inter = params.chunk_size_intra, params.chunk_size_inter
    NC = S // L
    bK = params.tile("siz_b_DHQK_inter", DHQK)
    bV = params.tile("siz_b_DHV_inter", DHV)
    grid = (DHQK // bK, DHV // bV, BH)
    cdt = _F32 if states_dtype is None else jnp.dtype(states_dtype)
    split = cdt != jnp.dtype(_F32)
    stride = decay_stride_of(vecDecay, NC, L)
    zero_initial = matC0 is None
    if zero_initial != (vecN0 is None):
        raise ValueError("recurrent_fw_states: matC0 and vecN0 must both be given or both be None")
    kernel = functools.partial(recurrent_fw_kernel, NC=NC, L=L, L_inter=L_inter, decay_stride=stride,
                               zero_initial=zero_initial)
    initial_specs = [] if zero_initial else [
        pl.BlockSpec((None, bK, bV), lambda ik, iv, b: (b, ik, iv)),
        pl.BlockSpec((None, bK), lambda ik, iv, b: (b, ik)),
    ]
    out = launch(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, S, bK), lambda ik, iv, b: (b, 0, ik)),
            pl.BlockSpec((None, S, bV), lambda ik, iv, b: (b, 0, iv)),
            pl.BlockSpec((None, S), lambda ik, iv, b: (b, 0)),
            pl.BlockSpec((None, vecDecay.shape[1]), lambda ik, iv, b: (b, 0)),
        ] + initial_specs,
        out_specs=[
            pl.BlockSpec((None, NC + 1, bK, bV), lambda ik, iv, b: (b, 0, ik, iv)),
            pl.BlockSpec((None, NC + 1, bK), lambda ik, iv, b: (b, 0, ik)),
        ] + ([pl.BlockSpec((None, bK, bV), lambda ik, iv, b: (b, ik, iv))] if split else []),
        out_shape=[
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHV), cdt),
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK), _F32),
        ] + ([jax.ShapeDtypeStruct((BH, DHQK, DHV), _F32)] if split else []),
        num_warps=params.num_warps_inter,
        num_stages=params.num_stages_inter,
        interpret=interpret,
        name="mlstm_chunkwise_recurrent_fw",
    )(matK, matV, vecWstate, vecDecay, *([] if zero_initial else [matC0, vecN0]))
    return tuple(out) if split else (out[0], out[1])
