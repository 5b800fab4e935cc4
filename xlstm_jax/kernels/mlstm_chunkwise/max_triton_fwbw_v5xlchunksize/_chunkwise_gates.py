"""Chunkwise (cumulative) gates for the forward and backward pass, and the gate gradients.

Stable formulations (no subtraction of large cumulative sums): vecB is the in-chunk cumulative sum
of log sigmoid(f); vecA = i_s + sum_{r = s+1 .. L} log sigmoid(f_r), an exclusive reverse
cumulative sum. Thin over ``xlstm_jax.kernels.mlstm_chunkwise.pallas.gates``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..pallas import gates


def _check(vecF: jax.Array, chunk_size: int) -> tuple[int, int, int]:
    if vecF.ndim != 3:
        raise ValueError(f"gates must have shape (B, NH, S); got {tuple(vecF.shape)}")
    B, NH, S = vecF.shape
    if not isinstance(chunk_size, int) or chunk_size < 1 or S % chunk_size:
        raise ValueError(f"S={S} must be a multiple of chunk_size={chunk_size!r}")
    return B, NH, S


def compute_chunkwise_log_gates_vecB_vecA(
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
    return_vecB_only: bool = False,
):
    """vecB (B, NH, NC, L) and vecA (B, NH, NC, L) (or only vecB), float32."""
    B, NH, S = _check(vecF, chunk_size)
    if vecI.shape != vecF.shape:
        raise ValueError(f"vecI {tuple(vecI.shape)} and vecF {tuple(vecF.shape)} must have the same shape")
    NC, L = S // chunk_size, chunk_size
    logf = gates.log_forget_gate(vecF).astype(jnp.float32).reshape(B * NH, S)
    vecB, vecA = gates.chunk_log_gates(vecI.astype(jnp.float32).reshape(B * NH, S), logf, L)
    vecB = vecB.reshape(B, NH, NC, L)
    if return_vecB_only:
        return vecB
    return vecB, vecA.reshape(B, NH, NC, L)


def compute_chunkwise_log_gates_vecB(
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
) -> jax.Array:
    """vecB (B, NH, NC, L): in-chunk cumulative sum of log sigmoid(f), float32."""
    B, NH, S = _check(vecF, chunk_size)
    logf = gates.log_forget_gate(vecF).astype(jnp.float32)
    return gates.cumsum(logf.reshape(B, NH, S // chunk_size, chunk_size), axis=3)


def compute_gate_grads_vecDeltaI_vecDeltaF(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matDeltaQ: jax.Array,  # (B, NH, S, DHQK)
    matDeltaK: jax.Array,  # (B, NH, S, DHQK)
    vecF: jax.Array,  # (B, NH, S)
    matC_last: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_last: jax.Array | None = None,  # (B, NH, DHQK)
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
) -> tuple[jax.Array, jax.Array]:
    """(vecDeltaI, vecDeltaF) (B, NH, S) with the stabilizers m held fixed, float32.

    dI_s = <dk_s, k_s>; dlogF_r = sum_{t >= r} (<dq_t, q_t> - <dk_t, k_t>) + <dC_last, C_last>
    + <dn_last, n_last> (the last-state terms when given); dF = dlogF * sigmoid(-f). The exact
    gradient adds the pull-back of dm through the m recurrence (``pallas.gates.max_state_pullback``).
    This global form (the seed's) sums over the whole sequence; its partial sums cancel, so in
    bf16 its error grows with S. The kernels use the chunk-local form of
    ``pallas.gates.gate_gradients`` instead.
    """
    B, NH, S, _ = matQ.shape
    f32 = jnp.float32
    vecDqq = jnp.sum(matQ.astype(f32) * matDeltaQ.astype(f32), axis=-1).reshape(B * NH, S)
    vecDkk = jnp.sum(matK.astype(f32) * matDeltaK.astype(f32), axis=-1).reshape(B * NH, S)
    scaDlast = jnp.zeros((B * NH,), f32)
    if matC_last is not None and matDeltaC_last is not None:
        scaDlast += jnp.sum(matC_last.astype(f32) * matDeltaC_last.astype(f32), axis=(-2, -1)).reshape(-1)
    if vecN_last is not None and vecDeltaN_last is not None:
        scaDlast += jnp.sum(vecN_last.astype(f32) * vecDeltaN_last.astype(f32), axis=-1).reshape(-1)
    vecDLogF = gates.cumsum(vecDqq - vecDkk, axis=1, reverse=True) + scaDlast[:, None]
    vecDF = vecDLogF.reshape(B, NH, S) * jax.nn.sigmoid(-vecF.astype(f32))
    return vecDkk.reshape(B, NH, S), vecDF
