"""Forward parallel (intra-chunk) kernel: h, and the signed normalizer qs.n of every step.

Notation (see ``gates.py``): BH = B * NH, L = chunk_size_intra, bLq = siz_b_L_parallel query rows
per program, bLkv = siz_b_L_loop key rows per loop iteration, bV = siz_b_DH_parallel value columns
per program, bDK = siz_b_DH_loop, the DHQK tile of the q.k and q.C products.

For query t in chunk k (entering state C_{k-1}, n_{k-1} from ``fw_recurrent``):

    num_t = vecWinter_t qs_t^T C_{k-1} + sum_{z_t <= s <= t} (qs_t . k_s) exp2(vecQlog_t + vecKlog_s) v_s
    nq_t  = vecWinter_t qs_t . n_{k-1} + sum_{z_t <= s <= t} (qs_t . k_s) exp2(vecQlog_t + vecKlog_s)
    h_t   = num_t / (max(|nq_t|, lam_t) + eps),   lam_t = norm_val exp(-m_t)  (or norm_val)

with z_t = vecStart_t the latest reset <= t in the chunk (else the chunk start; see ``gates.py``):
the one compare per tile element beyond the causal mask. Grid (DHV / bV, S / bLq, BH): the
programs of one query block sit next to each other, so its q and k tiles are shared through L2.
Each program loops over the key blocks of its chunk up to the diagonal; the stabilizer m_t is an
input (no online max, no rescaling).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._kernel_utils import cdiv, dot, dot_nt, launch
from .heuristics import ChunkwiseKernelParams

_F32 = jnp.float32


def parallel_fw_kernel(
    matQ_ref,  # (S, DHQK)
    matK_ref,  # (S, DHQK)
    matV_ref,  # (S, bV)
    vecQlog_ref,  # (S,)
    vecKlog_ref,  # (S,)
    vecWinter_ref,  # (S,)
    vecM_ref,  # (S,)
    vecStart_ref,  # (S,) int32
    matC_states_ref,  # (NC+1, DHQK, bV)
    vecN_states_ref,  # (NC+1, DHQK)
    matH_ref,  # out (bLq, bV)
    vecNq_ref,  # out (bLq,)
    *,
    L: int,
    bLq: int,
    bLkv: int,
    bDK: int,
    qk_scale: float,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
):
    """Kernel body of one (DHV tile, query block, batch*head) program."""
    dtype = matQ_ref.dtype
    nDK = matQ_ref.shape[-1] // bDK
    iq = pl.program_id(1)
    t0 = pl.multiple_of(iq * bLq, bLq)
    k = jax.lax.div(iq, jnp.int32(L // bLq))  # chunk index
    c0 = pl.multiple_of(k * L, L)

    def q_tile(d):
        return matQ_ref[pl.ds(t0, bLq), pl.ds(d * bDK, bDK)]

    q_fixed = [q_tile(0)] if nDK == 1 else None
    get_q = (lambda d: q_fixed[0]) if nDK == 1 else q_tile

    # inter-chunk part: qs_t^T C_{k-1} and qs_t . n_{k-1}
    acc = jnp.zeros((bLq, matV_ref.shape[-1]), _F32)
    vecNq = jnp.zeros((bLq,), _F32)
    for d in range(nDK):
        q_d = get_q(d)
        matC_d = matC_states_ref[k, pl.ds(d * bDK, bDK), :]
        vecN_d = vecN_states_ref[k, pl.ds(d * bDK, bDK)]
        acc = acc + dot(q_d, matC_d.astype(dtype))
        vecNq = vecNq + jnp.sum(q_d.astype(_F32) * vecN_d[None, :], axis=1)
    vecW = vecWinter_ref[pl.ds(t0, bLq)] * qk_scale
    acc = acc * vecW[:, None]
    vecNq = vecNq * vecW

    # intra-chunk part
    vecQlog = vecQlog_ref[pl.ds(t0, bLq)]
    vecStart = vecStart_ref[pl.ds(t0, bLq)]
    idx_t = t0 + jnp.arange(bLq, dtype=jnp.int32)

    def body(j, carry):
        acc, vecNq = carry
        s0 = pl.multiple_of(c0 + j * bLkv, bLkv)
        matS = jnp.zeros((bLq, bLkv), _F32)
        for d in range(nDK):
            matS = matS + dot_nt(get_q(d), matK_ref[pl.ds(s0, bLkv), pl.ds(d * bDK, bDK)])
        idx_s = s0 + jnp.arange(bLkv, dtype=jnp.int32)
        mask = (idx_t[:, None] >= idx_s[None, :]) & (idx_s[None, :] >= vecStart[:, None])
        matLogD = vecQlog[:, None] + vecKlog_ref[pl.ds(s0, bLkv)][None, :]
        matP = (matS * qk_scale) * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))
        acc = acc + dot(matP.astype(dtype), matV_ref[pl.ds(s0, bLkv), :])
        vecNq = vecNq + jnp.sum(matP, axis=1)
        return acc, vecNq

    n_iter = cdiv(t0 - c0 + bLq, bLkv)
    acc, vecNq = jax.lax.fori_loop(jnp.int32(0), n_iter, body, (acc, vecNq))

    vecM = vecM_ref[pl.ds(t0, bLq)]
    if stabilize_correctly:
        vecLam = norm_val * jnp.exp(-vecM)
    else:
        vecLam = jnp.full((bLq,), norm_val, _F32)
    vecDen = jnp.maximum(jnp.abs(vecNq), vecLam) + eps
    matH_ref[...] = (acc / vecDen[:, None]).astype(matH_ref.dtype)
    vecNq_ref[...] = vecNq


def parallel_fw_h(
    matQ: jax.Array,  # (BH, S, DHQK)
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S)
    vecKlog: jax.Array,  # (BH, S)
    vecWinter: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S)
    vecStart: jax.Array,  # (BH, S) int32
    matC_states: jax.Array,  # (BH, NC+1, DHQK, DHV)
    vecN_states: jax.Array,  # (BH, NC+1, DHQK)
    *,
    params: ChunkwiseKernelParams,
    qk_scale: float,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
    output_dtype,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Launch ``parallel_fw_kernel``: h (BH, S, DHV) in ``output_dtype`` and nq (BH, S) fp32."""
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    NC1 = matC_states.shape[1]
    L = params.chunk_size_intra
    bLq, bLkv = params.siz_b_L_parallel, params.siz_b_L_loop
    bV = params.tile("siz_b_DH_parallel", DHV)
    bDK = params.tile("siz_b_DH_loop", DHQK)
    kernel = functools.partial(
        parallel_fw_kernel, L=L, bLq=bLq, bLkv=bLkv, bDK=bDK, qk_scale=float(qk_scale),
        eps=float(eps), norm_val=float(norm_val), stabilize_correctly=bool(stabilize_correctly),
    )
    seq = pl.BlockSpec((None, S), lambda iv, iq, b: (b, 0))
    return launch(
        kernel,
        grid=(DHV // bV, S // bLq, BH),
        in_specs=[
            pl.BlockSpec((None, S, DHQK), lambda iv, iq, b: (b, 0, 0)),
            pl.BlockSpec((None, S, DHQK), lambda iv, iq, b: (b, 0, 0)),
            pl.BlockSpec((None, S, bV), lambda iv, iq, b: (b, 0, iv)),
            seq, seq, seq, seq, seq,
            pl.BlockSpec((None, NC1, DHQK, bV), lambda iv, iq, b: (b, 0, 0, iv)),
            pl.BlockSpec((None, NC1, DHQK), lambda iv, iq, b: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bLq, bV), lambda iv, iq, b: (b, iq, iv)),
            pl.BlockSpec((None, bLq), lambda iv, iq, b: (b, iq)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, S, DHV), output_dtype),
            jax.ShapeDtypeStruct((BH, S), _F32),
        ],
        num_warps=params.num_warps_intra,
        num_stages=params.num_stages_intra,
        interpret=interpret,
        name="mlstm_chunkwise_parallel_fw",
    )(matQ, matK, matV, vecQlog, vecKlog, vecWinter, vecM, vecStart, matC_states, vecN_states)
