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
from .gate_kernels import chunk_gates_scanned
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


# ----------------------------------------------------------------------------- gates in the kernel
def recurrent_fw_gated_kernel(
    matK_ref,  # (S, bK)
    matV_ref,  # (S, bV)
    vecI_ref,  # (S,) float32
    vecLogF_ref,  # (S,) float32
    *refs,  # [matC0 (bK, bV), vecN0 (bK,), scaM0 (1,)] unless zero_initial; then the outputs:
    # matC_states (NC+1, bK, bV), vecN_states (NC+1, bK), [matC_last (bK, bV) fp32 with 16-bit states],
    # vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart (int32), vecReset (int32), vecDecay: (S,) each
    NC: int,
    L: int,
    zero_initial: bool,
    split: bool,
):
    """``recurrent_fw_kernel`` that also computes the gates (``gates_impl="kernel"``): per chunk, from
    i, logf and the m carried from the previous chunk, ``gate_kernels.chunk_gates_scanned`` gives the
    chunk's m, its state weights and decay (used here) and the vectors of the parallel kernels (written
    by the program of the first (DHQK, DHV) tile of each row). Chunk size inter = intra (one product
    per chunk: the weights stay in registers)."""
    dtype = matK_ref.dtype
    refs = list(refs)
    if zero_initial:
        matC0_ref = vecN0_ref = scaM0_ref = None
    else:
        matC0_ref, vecN0_ref, scaM0_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    matC_states_ref, vecN_states_ref = refs.pop(0), refs.pop(0)
    matC_last_ref = refs.pop(0) if split else None
    gate_refs = refs  # vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart, vecReset, vecDecay
    first_tile = (pl.program_id(0) == 0) & (pl.program_id(1) == 0)

    def chunk(k, carry):
        matC, vecN, m_prev = carry
        matC_states_ref[k, :, :] = matC.astype(matC_states_ref.dtype)
        vecN_states_ref[k, :] = vecN
        c0 = pl.multiple_of(k * L, L)
        (vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart, vecReset, scaDecay, m_last) = chunk_gates_scanned(
            vecI_ref[pl.ds(c0, L)], vecLogF_ref[pl.ds(c0, L)], m_prev, c0, L)

        @pl.when(first_tile)
        def _write_gates():
            vecDecay = jnp.full((L,), scaDecay, _F32)
            for ref, val in zip(gate_refs, (vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart, vecReset,
                                            vecDecay)):
                ref[pl.ds(c0, L)] = val

        matKw = matK_ref[pl.ds(c0, L), :].astype(_F32) * vecWstate[:, None]
        matC = matC * scaDecay + dot_tn(matKw.astype(dtype), matV_ref[pl.ds(c0, L), :])
        vecN = vecN * scaDecay + jnp.sum(matKw, axis=0)
        return matC, vecN, m_last

    bK, bV = matC_states_ref.shape[-2:]
    if zero_initial:
        init = (jnp.zeros((bK, bV), _F32), jnp.zeros((bK,), _F32), jnp.float32(0.0))
    else:
        init = (matC0_ref[...].astype(_F32), vecN0_ref[...].astype(_F32), scaM0_ref[0].astype(_F32))
    matC, vecN, _ = jax.lax.fori_loop(jnp.int32(0), jnp.int32(NC), chunk, init)
    matC_states_ref[NC, :, :] = matC.astype(matC_states_ref.dtype)
    vecN_states_ref[NC, :] = vecN
    if split:
        matC_last_ref[...] = matC


def recurrent_fw_states_gated(
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    matC0: jax.Array | None,  # (BH, DHQK, DHV); None (with vecN0, scaM0 None): the zero state
    vecN0: jax.Array | None,  # (BH, DHQK)
    scaM0: jax.Array | None,  # (BH,)
    *,
    params: ChunkwiseKernelParams,
    interpret: bool,
    states_dtype=None,
):
    """Launch ``recurrent_fw_gated_kernel``: (matC_states, vecN_states, matC_last fp32, vecM, gate
    vectors) with the gate vectors (vecQlog, vecKlog, vecWinter, vecWstate, vecStart int32, vecReset
    int32, vecDecay in the (BH, S) layout), each (BH, S), as ``gate_kernels.gate_vectors`` returns
    them. The exponential cell only (the m recurrence); ``chunk_size_inter`` must equal
    ``chunk_size_intra`` (``ValueError`` otherwise)."""
    BH, S, DHQK = matK.shape
    DHV = matV.shape[-1]
    L = params.chunk_size_intra
    if params.chunk_size_inter != L:
        raise ValueError(
            f"gates_impl='kernel' needs chunk_size_inter == chunk_size_intra; got {params.chunk_size_inter} "
            f"and {L}")
    NC = S // L
    bK = params.tile("siz_b_DHQK_inter", DHQK)
    bV = params.tile("siz_b_DHV_inter", DHV)
    cdt = _F32 if states_dtype is None else jnp.dtype(states_dtype)
    split = cdt != jnp.dtype(_F32)
    zero_initial = matC0 is None
    if not (zero_initial == (vecN0 is None) == (scaM0 is None)):
        raise ValueError("recurrent_fw_states_gated: matC0, vecN0 and scaM0 must all be given or all be None")
    kernel = functools.partial(recurrent_fw_gated_kernel, NC=NC, L=L, zero_initial=zero_initial, split=split)
    row = pl.BlockSpec((None, S), lambda ik, iv, b: (b, 0))
    initial_specs = [] if zero_initial else [
        pl.BlockSpec((None, bK, bV), lambda ik, iv, b: (b, ik, iv)),
        pl.BlockSpec((None, bK), lambda ik, iv, b: (b, ik)),
        pl.BlockSpec((None, 1), lambda ik, iv, b: (b, 0)),
    ]
    f32 = jax.ShapeDtypeStruct((BH, S), _F32)
    i32 = jax.ShapeDtypeStruct((BH, S), jnp.int32)
    out = launch(
        kernel,
        grid=(DHQK // bK, DHV // bV, BH),
        in_specs=[
            pl.BlockSpec((None, S, bK), lambda ik, iv, b: (b, 0, ik)),
            pl.BlockSpec((None, S, bV), lambda ik, iv, b: (b, 0, iv)),
            row, row,
        ] + initial_specs,
        out_specs=[
            pl.BlockSpec((None, NC + 1, bK, bV), lambda ik, iv, b: (b, 0, ik, iv)),
            pl.BlockSpec((None, NC + 1, bK), lambda ik, iv, b: (b, 0, ik)),
        ] + ([pl.BlockSpec((None, bK, bV), lambda ik, iv, b: (b, ik, iv))] if split else []) + [row] * 8,
        out_shape=[
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHV), cdt),
            jax.ShapeDtypeStruct((BH, NC + 1, DHQK), _F32),
        ] + ([jax.ShapeDtypeStruct((BH, DHQK, DHV), _F32)] if split else []) + [f32] * 5 + [i32, i32, f32],
        num_warps=params.num_warps_inter,
        num_stages=params.num_stages_inter,
        interpret=interpret,
        name="mlstm_chunkwise_recurrent_fw_gated",
    )(matK, matV, vecI.astype(_F32), vecLogF.astype(_F32),
      *([] if zero_initial else [matC0, vecN0, scaM0.astype(_F32).reshape(BH, 1)]))
    out = list(out)
    matC_states, vecN_states = out.pop(0), out.pop(0)
    matC_last = out.pop(0) if split else matC_states[:, -1]
    vecM, vecQlog, vecKlog, vecWinter, vecWstate, vecStart, vecReset, vecDecay = out
    return matC_states, vecN_states, matC_last, vecM, (vecQlog, vecKlog, vecWinter, vecWstate, vecStart,
                                                       vecReset, vecDecay)
