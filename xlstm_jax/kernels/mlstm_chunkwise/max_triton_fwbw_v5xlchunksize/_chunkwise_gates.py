"""Chunkwise (cumulative) gates for the forward and backward pass, and the gate gradients.

Stable formulations (no subtraction of large cumulative sums): vecB is the in-chunk cumulative sum
of log sigmoid(f); vecA = i_s + sum_{r = s+1 .. L} log sigmoid(f_r), an exclusive reverse
cumulative sum. Resets (a forget gate of 0, f = -inf, or one too small for the old state to matter;
``pallas.gates``) are marked by -inf in vecB, after which the sum restarts, and give vecA = -inf
where they follow s (the layout of ``..seed_compat``). Thin over ``..seed_compat`` and
``xlstm_jax.kernels.mlstm_chunkwise.pallas.gates``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...validation import check_floating, check_shape, shape_str
from ..pallas import gates
from ..seed_compat import chunk_log_gates


def compute_chunkwise_log_gates_vecB_vecA(
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
    return_vecB_only: bool = False,
    *,
    scaM_initial: jax.Array | None = None,  # (B, NH)
):
    """vecB (B, NH, NC, L) and vecA (B, NH, NC, L) (or only vecB), float32; S a multiple of L.

    The resets follow the kernels' m scan from ``scaM_initial`` (default 0, as without initial states).
    """
    vecB, vecA = chunk_log_gates(vecI, vecF, chunk_size, scaM_initial=scaM_initial)
    if return_vecB_only:
        return vecB
    return vecB, vecA


def compute_chunkwise_log_gates_vecB(
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
) -> jax.Array:
    """vecB (B, NH, NC, L): in-chunk cumulative sum of log sigmoid(f), float32.

    Without the input gates the max state is unknown, so only exact zeros of the forget gate
    (f = -inf) count as resets here; ``compute_chunkwise_log_gates_vecB_vecA`` finds them all.
    """
    kernel = "compute_chunkwise_log_gates_vecB"
    if getattr(vecF, "ndim", None) != 3:
        raise ValueError(f"{kernel}: vecF must have shape (B, NH, S); got {shape_str(vecF)}")
    check_floating("vecF", vecF, kernel=kernel)
    B, NH, S = vecF.shape
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 or S % chunk_size:
        raise ValueError(f"{kernel}: S={S} must be a multiple of a positive int chunk_size; got {chunk_size!r}")
    NC, L, BH = S // chunk_size, chunk_size, B * NH
    logf = gates.log_forget_gate(vecF).astype(jnp.float32).reshape(BH, S)
    cg = gates.chunk_gates(jnp.zeros_like(logf), logf, logf == -jnp.inf, L)
    return gates.seed_chunk_gates(cg)[0].reshape(B, NH, NC, L)


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
    kernel = "compute_gate_grads_vecDeltaI_vecDeltaF"
    if getattr(matQ, "ndim", None) != 4:
        raise ValueError(f"{kernel}: matQ must have shape (B, NH, S, DHQK); got {shape_str(matQ)}")
    B, NH, S, DHQK = matQ.shape
    because = f"from matQ {shape_str(matQ)}"
    for name, x in (("matK", matK), ("matDeltaQ", matDeltaQ), ("matDeltaK", matDeltaK)):
        check_shape(kernel, name, x, (B, NH, S, DHQK), because)
    check_shape(kernel, "vecF", vecF, (B, NH, S), because)
    for name, x in (("matQ", matQ), ("matK", matK), ("matDeltaQ", matDeltaQ), ("matDeltaK", matDeltaK), ("vecF", vecF)):
        check_floating(name, x, kernel=kernel)
    for name, x in (("matC_last", matC_last), ("matDeltaC_last", matDeltaC_last)):
        if x is not None and (getattr(x, "ndim", None) != 4 or tuple(x.shape[:3]) != (B, NH, DHQK)):
            raise ValueError(f"{kernel}: {name} has shape {shape_str(x)}; expected (B, NH, DHQK, DHV) {because}")
    if matC_last is not None and matDeltaC_last is not None:
        check_shape(kernel, "matDeltaC_last", matDeltaC_last, tuple(matC_last.shape),
                    f"from matC_last {shape_str(matC_last)}")
    for name, x in (("vecN_last", vecN_last), ("vecDeltaN_last", vecDeltaN_last)):
        if x is not None:
            check_shape(kernel, name, x, (B, NH, DHQK), because)
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
