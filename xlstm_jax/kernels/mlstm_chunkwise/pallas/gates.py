"""Gate preprocessing and postprocessing of the Pallas chunkwise kernels (pure JAX/XLA, O(S) work).

Notation (see ``xlstm_jax.kernels._common``); here the batch and head axes are merged:

    BH                 B * NH
    L, NC              intra chunk size and number of chunks (S_pad = NC * L)
    vecI     (BH, S)   input gate pre-activations (padding: CLOSED_INPUT_GATE)
    vecLogF  (BH, S)   log forget gates ``log_sigmoid(f)`` (padding: 0, the gate fully open)
    vecM     (BH, S)   the max state m_t = max(logf_t + m_{t-1}, i_t) of every step (m_0 = m0)
    vecB     (BH, NC, L)  b_t: inclusive cumulative sum of logf inside each chunk
    vecA     (BH, NC, L)  a_s = i_s + sum_{r=s+1..L} logf_r: log weight of step s in the chunk's
                          end state (an exclusive reverse cumulative sum: no cancellation)
    scaM_borders (BH, NC+1)  m at the chunk borders (index 0: m0, index k: m after chunk k)

The kernels never take a maximum: every stabilizer comes from ``vecM``, computed here by an
associative scan over the (max, +) semiring. In exact arithmetic the chunkwise m_t equals the
recurrent one, so the kernels see exactly the stabilizers of DESIGN.md section 1. The vectors the
kernels load (``KernelGates``) are

    vecQlog   = (b_t - m_t) log2(e)      query side of the intra-chunk log weight, base 2
    vecKlog   = (i_s - b_s) log2(e)      key side: exp(logD[t, s] - m_t) = exp2(vecQlog_t + vecKlog_s)
                                         for s <= t (base 2: exp2 is the GPU's native exponential)
    vecWinter = exp(b_t + m_{k-1} - m_t)    weight of the entering state in h_t
    vecWstate = exp(a_s - m_k)              weight of step s in the state leaving its chunk
    vecDecay  = exp(g_k + m_{k-1} - m_k)    (BH, NC) decay of the state over chunk k

Gradients: with every m held fixed, i_s multiplies each occurrence of k_s by exp(i_s), so
d i_s = <dk_s, k_s>; logf_r scales every term that spans r, which ``gate_gradients`` sums chunk by
chunk (see there). The exact gradient adds the pull-back of dm (the cotangent of every m_t)
through the scan.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

CLOSED_INPUT_GATE = -1e30
LOG2_E = 1.4426950408889634  # log2(e): the kernels' intra-chunk weights are powers of two


class KernelGates(NamedTuple):
    """The per-step and per-chunk gate vectors the kernels load (all float32)."""

    vecQlog: jax.Array  # (BH, S) base-2 log weight, query side
    vecKlog: jax.Array  # (BH, S) base-2 log weight, key side
    vecWinter: jax.Array  # (BH, S)
    vecWstate: jax.Array  # (BH, S)
    vecDecay: jax.Array  # (BH, NC)
    scaM_borders: jax.Array  # (BH, NC+1)


def log_forget_gate(vecF: jax.Array) -> jax.Array:
    """``log_sigmoid(f)`` in float32 (float64 stays float64)."""
    dt = jnp.promote_types(vecF.dtype, jnp.float32)
    return jax.nn.log_sigmoid(vecF.astype(dt))


def pad_time(x: jax.Array, S_pad: int, value: float) -> jax.Array:
    """Pad axis 1 (time) of ``x`` (BH, S, ...) to ``S_pad`` with ``value``."""
    S = x.shape[1]
    if S_pad == S:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, S_pad - S)
    return jnp.pad(x, pad, constant_values=value)


def cumsum(x: jax.Array, axis: int, reverse: bool = False) -> jax.Array:
    """Cumulative sum as an associative scan (XLA:GPU's reduce-window form of ``jnp.cumsum``
    failed to compile inside one fusion in our tests; the scan has O(log n) depth)."""
    return jax.lax.associative_scan(jnp.add, x, reverse=reverse, axis=axis)


def _compose(earlier, later):
    """(a1, b1) then (a2, b2) as maps x -> max(x + a, b): (a1 + a2, max(b1 + a2, b2))."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 + a2, jnp.maximum(b1 + a2, b2)


def max_state_scan(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
) -> jax.Array:  # (BH, S)
    """m_t = max(logf_t + m_{t-1}, i_t) for every t, m_0 = scaM0, as an associative scan.

    Partial sums of logf (all <= 0) have no cancellation; ``jax.vjp`` of this function is the exact
    pull-back of the cotangents of every m_t to i, logf and m0 (ties split like ``jnp.maximum``).
    """
    vecA, vecBm = jax.lax.associative_scan(_compose, (vecLogF, vecI), axis=1)
    return jnp.maximum(scaM0[:, None] + vecA, vecBm)


def chunk_log_gates(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    L: int,
) -> tuple[jax.Array, jax.Array]:
    """(vecB, vecA), each (BH, NC, L): in-chunk cumulative log forget gates and end-state weights."""
    BH, S = vecLogF.shape
    NC = S // L
    logf = vecLogF.reshape(BH, NC, L)
    vecB = cumsum(logf, axis=2)
    rev = cumsum(logf, axis=2, reverse=True)  # sum_{r >= s}
    rev_excl = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    vecA = vecI.reshape(BH, NC, L) + rev_excl
    return vecB, vecA


def border_max_states(vecM: jax.Array, scaM0: jax.Array, L: int) -> jax.Array:
    """(BH, NC+1): m0, then m at the last step of every chunk."""
    BH, S = vecM.shape
    return jnp.concatenate([scaM0[:, None], vecM[:, L - 1 :: L]], axis=1)


def kernel_gates_from_chunk_gates(
    vecI: jax.Array,  # (BH, NC, L)
    vecB: jax.Array,  # (BH, NC, L)
    vecA: jax.Array,  # (BH, NC, L)
    vecM: jax.Array,  # (BH, NC, L) per-step max state
    scaM_borders: jax.Array,  # (BH, NC+1)
) -> KernelGates:
    """The vectors the kernels load, from the chunk gates and the stabilizers (see module doc)."""
    BH, NC, L = vecB.shape
    m_prev = scaM_borders[:, :-1, None]
    m_next = scaM_borders[:, 1:, None]
    vecQlog = (vecB - vecM) * LOG2_E
    vecKlog = (vecI - vecB) * LOG2_E
    vecWinter = jnp.exp(vecB + m_prev - vecM)
    vecWstate = jnp.exp(vecA - m_next)
    vecDecay = jnp.exp(vecB[..., -1] + scaM_borders[:, :-1] - scaM_borders[:, 1:])
    flat = lambda x: x.reshape(BH, NC * L).astype(jnp.float32)  # noqa: E731
    return KernelGates(
        flat(vecQlog), flat(vecKlog), flat(vecWinter), flat(vecWstate),
        vecDecay.astype(jnp.float32), scaM_borders.astype(jnp.float32),
    )


def kernel_gates(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    L: int,
) -> KernelGates:
    """All kernel gate vectors for chunk size ``L`` (S a multiple of L)."""
    BH, S = vecI.shape
    NC = S // L
    vecB, vecA = chunk_log_gates(vecI, vecLogF, L)
    scaM_borders = border_max_states(vecM, scaM0, L)
    return kernel_gates_from_chunk_gates(
        vecI.reshape(BH, NC, L), vecB, vecA, vecM.reshape(BH, NC, L), scaM_borders
    )


def normalizer_lower_bound(vecM: jax.Array, *, norm_val: float, stabilize_correctly: bool) -> jax.Array:
    """lam_t = norm_val * exp(-m_t), or norm_val when not ``stabilize_correctly``."""
    if stabilize_correctly:
        return norm_val * jnp.exp(-vecM)
    return jnp.full_like(vecM, norm_val)


def normalizer_cotangents(
    vecDhh: jax.Array,  # (BH, S) sum_j dh_tj * h_tj
    vecNq: jax.Array,  # (BH, S) signed qs_t . n_t (stabilized)
    vecM: jax.Array,  # (BH, S)
    *,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
    exact: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(vecDenInv, vecDnq, vecDm): 1/den, the cotangent of qs.n, and the cotangent of m_t.

    den = max(|nq|, lam) + eps. With ``exact=False`` (TFLA convention) den and m are constants:
    vecDnq = vecDm = 0. Otherwise dden = -sum(dh*h)/den flows to nq (where |nq| >= lam) or to lam,
    and dm_t = -(sum(dh*h) + dnq*nq + dlam*lam) (every stabilized quantity scales as exp(-m_t)).
    """
    lam = normalizer_lower_bound(vecM, norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    absnq = jnp.abs(vecNq)
    vecDenInv = 1.0 / (jnp.maximum(absnq, lam) + eps)
    if not exact:
        zeros = jnp.zeros_like(vecNq)
        return vecDenInv, zeros, zeros
    dden = -vecDhh * vecDenInv
    use_nq = absnq >= lam
    vecDnq = jnp.where(use_nq, dden * jnp.sign(vecNq), 0.0)
    # dm = -(dhh + dnq * nq + [stabilize_correctly] dlam * lam) simplifies (den = max(|nq|, lam) + eps)
    # to -dhh * eps / den whenever the max's winner scales with exp(-m), else to -dhh: written so,
    # without the cancellation of the two O(dhh) terms
    scales_with_m = use_nq | stabilize_correctly
    vecDm = jnp.where(scales_with_m, -vecDhh * eps * vecDenInv, -vecDhh)
    return vecDenInv, vecDnq, vecDm


def gate_gradients(
    vecDqq: jax.Array,  # (BH, S) <dq_t, q_t>
    vecDkk: jax.Array,  # (BH, S) <dk_t, k_t>
    vecDkkState: jax.Array,  # (BH, S) <dk_t, k_t> through the state leaving t's chunk only
    scaDdecay: jax.Array,  # (BH, NC) <dC_k, vecDecay_k C_{k-1}> + <dn_k, vecDecay_k n_{k-1}>
    L: int,
) -> tuple[jax.Array, jax.Array]:
    """(dI, dLogF) with every m held fixed, from chunk-local sums only.

    For r in chunk k, log f_r enters the intra-chunk weights of the pairs s < r <= t, the entering
    state's weight of the queries t >= r, the leaving state's weight of the keys s < r, and the
    chunk's state decay. With <dq_t, q_t> split into its intra and inter parts and <dk_s, k_s> into
    its intra and state parts this gives

        dlogf_r = sum_{t >= r in chunk} (<dq_t, q_t> - <dk_t, k_t>) + sum_{s in chunk} <dk_s, k_s>_state
                  + scaDdecay_k

    (the intra pairs spanning r sum to the in-chunk suffix sum of the intra parts). Unlike the
    equal global form sum_{t >= r} (<dq, q> - <dk, k>) + <dC_last, C_last> + <dn_last, n_last>,
    whose partial sums cancel over the whole sequence, no rounding error accumulates over S.
    """
    BH, S = vecDqq.shape
    NC = S // L
    chunked = lambda x: x.reshape(BH, NC, L)  # noqa: E731
    suffix = cumsum(chunked(vecDqq - vecDkk), axis=2, reverse=True)
    per_chunk = jnp.sum(chunked(vecDkkState), axis=2) + scaDdecay
    vecDLogF = (suffix + per_chunk[..., None]).reshape(BH, S)
    return vecDkk, vecDLogF


def max_state_pullback(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    vecDM: jax.Array,  # (BH, S) cotangent of every m_t
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dI, dLogF, dM0): the cotangents of the m scan pulled back to its inputs."""
    _, vjp = jax.vjp(max_state_scan, vecI, vecLogF, scaM0)
    return vjp(vecDM.astype(vecI.dtype))


def chunk_max_states(
    vecI: jax.Array,  # (BH, NC, L)
    vecB: jax.Array,  # (BH, NC, L)
    scaM_borders: jax.Array,  # (BH, NC+1)
) -> jax.Array:  # (BH, NC, L)
    """Per-step m from the border stabilizers: m_t = b_t + max(m_{k-1}, max_{s <= t} (i_s - b_s)).

    Equal (in exact arithmetic) to ``max_state_scan``; used by the seed entry points that receive
    the border states instead of the gates' whole history.
    """
    running = jax.lax.associative_scan(jnp.maximum, vecI - vecB, axis=2)
    return vecB + jnp.maximum(scaM_borders[:, :-1, None], running)
