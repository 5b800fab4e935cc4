"""Gate preprocessing and postprocessing of the Pallas chunkwise kernels (pure JAX/XLA, O(S) work).

Notation (see ``xlstm_jax.kernels._common``); here the batch and head axes are merged:

    BH                 B * NH
    L, NC              intra chunk size and number of chunks (S_pad = NC * L)
    vecI     (BH, S)   input gate pre-activations (padding: CLOSED_INPUT_GATE)
    vecLogF  (BH, S)   log forget gates ``log_sigmoid(f)`` (padding: 0, the gate fully open)
    vecM     (BH, S)   the max state m_t = max(logf_t + m_{t-1}, i_t) of every step (m_0 = m0)
    vecReset (BH, S)   bool: the state before t is dropped at t (a reset, see below)
    vecB     (BH, NC, L)  b_t: cumulative sum of logf inside each chunk, restarting after every reset
                          (b_t = sum of logf over (z_t, t], z_t the latest reset <= t; without a
                          reset in the chunk, from the chunk start)
    vecA     (BH, NC, L)  a_s = i_s + sum_{r=s+1..L} logf_r: log weight of step s in the chunk's
                          end state (an exclusive reverse cumulative sum: no cancellation); -inf
                          when a reset follows s in the chunk
    vecStart (BH, S)   int32: z_t, the latest reset <= t in t's chunk, else the chunk start
    scaM_borders (BH, NC+1)  m at the chunk borders (index 0: m0, index k: m after chunk k)

The kernels never take a maximum: every stabilizer comes from ``vecM``, computed here by an
associative scan over the (max, +) semiring. In exact arithmetic the chunkwise m_t equals the
recurrent one, so the kernels see exactly the stabilizers of docs/design.md. The vectors the
kernels load (``KernelGates``) are

    vecQlog   = (b_t - m_t) log2(e)      query side of the intra-chunk log weight, base 2
    vecKlog   = (i_s - b_s) log2(e)      key side: exp(logD[t, s] - m_t) = exp2(vecQlog_t + vecKlog_s)
                                         for z_t <= s <= t (base 2: exp2 is the GPU's native
                                         exponential); the pairs s < z_t are masked by vecStart
    vecWinter = exp(b_t + m_{k-1} - m_t)    weight of the entering state in h_t (0 after a reset)
    vecWstate = exp(a_s - m_k)              weight of step s in the state leaving its chunk
    vecDecay  = exp(g_k + m_{k-1} - m_k)    (BH, NC) decay of the state over chunk k (0 with a reset)

Resets. A forget gate of 0 (f = -inf, logf = -inf) drops the state: every weight across it is
exp(-inf) = 0 and m_t = i_t, a fresh start. Written with plain cumulative sums, -inf enters b and
turns vecQlog_t + vecKlog_s into -inf + inf = NaN, and a very negative finite logf (f = -1e30)
absorbs the other terms of the sums (rounding error |logf| * 2^-24). Instead, ``reset_positions``
marks every t with

    logf_t + m_{t-1} - m_t < -RESET_LOG_WEIGHT = -104,

i.e. where the old state's weight exp(logf_t + m_{t-1} - m_t) is below e^-104 ~ 7e-46, and the
sums restart there (the logf of a reset enters no sum). Error analysis: at such a t, m_t = i_t
(the old state lost the max), so the new input has weight exp(i_t - m_t) = 1 while the dropped term
is e^-104 * C_{t-1} with |C_{t-1}| <= (t-1) max_s |k_s| |v_s| (every stabilized weight is <= 1).
Dropping it changes C_t and n_t by a relative e^-104 * S * max_s |k_s||v_s| / |k_t||v_t|: below
float32 resolution (2^-24) unless S * (that norm ratio) exceeds 1e38, and below float64 resolution
(2^-53) unless it exceeds 3e29; in float32 the recurrent form itself rounds such a weight to zero
(e^-104 is below the smallest float32). The gradient of logf_t there is of the same relative size
and is returned as 0. Every f = -inf is a reset; a finite logf > -104 + (m_t - m_{t-1}) is never
one, so ordinary gates are computed exactly as without resets. The m scan needs no reset: it adds
and compares only, and a sum holding -inf or -1e30 simply loses the max.

Packed documents (``segment_ids``) arrive as f = -inf at every document start (``validation``), so
they are ordinary resets. (``vecReset``, explicit resets where m_{t-1} is taken as 0, i.e. the
(max, +) map of step t becomes x -> max(logf_t, i_t), is kept for callers that want that start.)
The sigmoid input gate (``input_gate="sigmoid"``) runs with vecM = 0 (``autodiff.CoreConfig.
max_state`` False): every log weight is then <= 0 and a reset drops a term below exp(-104) |C| in
absolute size, the denominator being at least norm_val.

Gradients: with every m held fixed, i_s multiplies each occurrence of k_s by exp(i_s), so
d i_s = <dk_s, k_s>; logf_r scales every term that spans r, which ``gate_gradients`` sums chunk by
chunk, restarting at resets (see there). The exact gradient adds the pull-back of dm (the cotangent
of every m_t) through the scan.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

CLOSED_INPUT_GATE = -1e30
LOG2_E = 1.4426950408889634  # log2(e): the kernels' intra-chunk weights are powers of two
RESET_LOG_WEIGHT = 104.0
"""The state before t is dropped where its weight exp(logf_t + m_{t-1} - m_t) < exp(-104) (module doc)."""


class KernelGates(NamedTuple):
    """The per-step and per-chunk gate vectors the kernels load (all float32)."""

    vecQlog: jax.Array  # (BH, S) base-2 log weight, query side
    vecKlog: jax.Array  # (BH, S) base-2 log weight, key side
    vecWinter: jax.Array  # (BH, S)
    vecWstate: jax.Array  # (BH, S)
    vecDecay: jax.Array  # (BH, NC); (BH, S) repeated per chunk from ``gate_kernels`` (``chunk_decays``)
    scaM_borders: jax.Array  # (BH, NC+1)
    vecStart: jax.Array  # (BH, S) int32: the latest reset <= t in t's chunk, else the chunk start
    vecReset: jax.Array  # (BH, S) bool: resets (int32, nonzero at a reset, from ``gate_kernels``)
    vecSeen: jax.Array  # (BH, S) bool: a reset at or before t in t's chunk


def chunk_decays(vecDecay: jax.Array, L: int, NC: int) -> jax.Array:
    """(BH, NC): ``KernelGates.vecDecay`` in either layout ((BH, NC), or (BH, NC * L) with each
    chunk's decay repeated over its L steps)."""
    return vecDecay if vecDecay.shape[-1] == NC else vecDecay[:, ::L]


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
    vecReset: jax.Array | None = None,  # (BH, S) bool, explicit resets
) -> jax.Array:  # (BH, S)
    """m_t = max(logf_t + m_{t-1}, i_t) for every t, m_0 = scaM0, as an associative scan.

    Partial sums of logf (all <= 0) have no cancellation; ``jax.vjp`` of this function is the exact
    pull-back of the cotangents of every m_t to i, logf and m0 (ties split like ``jnp.maximum``).
    logf = -inf needs no care (the map becomes the constant i_t). At an explicit reset the map of
    step t is x -> max(logf_t, i_t) (m_{t-1} taken as 0).
    """
    vecAm, vecBm = vecLogF, vecI
    if vecReset is not None:
        vecAm = jnp.where(vecReset, -jnp.inf, vecLogF)
        vecBm = jnp.where(vecReset, jnp.maximum(vecLogF, vecI), vecI)
    vecAm, vecBm = jax.lax.associative_scan(_compose, (vecAm, vecBm), axis=1)
    return jnp.maximum(scaM0[:, None] + vecAm, vecBm)


def max_state_scan_linear(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    L: int,
    vecReset: jax.Array | None = None,  # (BH, S) bool, explicit resets
) -> jax.Array:  # (BH, S)
    """``max_state_scan`` in two levels (``m_scan="linear"``): the (max, +) maps of every chunk
    composed by an associative scan of depth log2(L) (all chunks at once), then a sequential
    ``lax.scan`` over the NC chunk borders carrying only m_k (unrolled up to NC = 512). S must be a
    multiple of ``L``.

    The same maps, composed in another order: equal to ``max_state_scan`` up to rounding of the
    partial sums of logf (all <= 0, no cancellation); ``jax.vjp`` is again the exact pull-back.
    """
    BH, S = vecI.shape
    if S % L:
        raise ValueError(f"max_state_scan_linear: S={S} must be a multiple of L={L}")
    NC = S // L
    vecAm, vecBm = vecLogF, vecI
    if vecReset is not None:
        vecAm = jnp.where(vecReset, -jnp.inf, vecLogF)
        vecBm = jnp.where(vecReset, jnp.maximum(vecLogF, vecI), vecI)
    vecAm, vecBm = jax.lax.associative_scan(
        _compose, (vecAm.reshape(BH, NC, L), vecBm.reshape(BH, NC, L)), axis=2
    )

    def border(m_prev, ab):
        a, b = ab
        m = jnp.maximum(m_prev + a, b)
        return m, m_prev

    # unrolled (up to 512 chunks): one straight-line chain on (BH,) vectors that XLA fuses, instead
    # of NC while-loop iterations of tiny kernels
    _, m_entering = jax.lax.scan(
        border, scaM0, (jnp.moveaxis(vecAm[..., -1], 1, 0), jnp.moveaxis(vecBm[..., -1], 1, 0)),
        unroll=NC if NC <= 512 else 8,
    )
    m_entering = jnp.moveaxis(m_entering, 0, 1)[..., None]  # (BH, NC, 1): m before each chunk
    return jnp.maximum(m_entering + vecAm, vecBm).reshape(BH, S)


def max_state_scan_for(m_scan: str, L: int):
    """The m scan selected by ``ChunkwiseKernelParams.m_scan``: (vecI, vecLogF, scaM0) -> vecM."""
    if m_scan == "associative":
        return max_state_scan
    if m_scan == "linear":
        return lambda vecI, vecLogF, scaM0: max_state_scan_linear(vecI, vecLogF, scaM0, L)
    raise ValueError(f"m_scan must be 'associative' or 'linear'; got {m_scan!r}")


def previous_max_states(vecM: jax.Array, scaM0: jax.Array) -> jax.Array:
    """(BH, S): m_{t-1} of every step (m0 before the first)."""
    return jnp.concatenate([scaM0[:, None].astype(vecM.dtype), vecM[:, :-1]], axis=1)


def reset_positions(
    vecLogF: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S)
    vecM_prev: jax.Array,  # (BH, S) m_{t-1}
    vecReset: jax.Array | None = None,  # (BH, S) bool, explicit resets (packed documents)
) -> jax.Array:  # (BH, S) bool
    """Where the state before t is dropped: ``logf_t + m_{t-1} - m_t < -RESET_LOG_WEIGHT``.

    That is where the previous state's weight exp(logf_t + m_{t-1} - m_t) is below exp(-104): every
    f = -inf (a forget gate of exactly 0) and every forget gate so small that the old state cannot
    matter. See the module docstring for the error analysis. Explicit resets (``vecReset``) are
    added as they are.
    """
    reset = vecLogF + vecM_prev - vecM < -RESET_LOG_WEIGHT
    return reset if vecReset is None else reset | vecReset


class ChunkGates(NamedTuple):
    """Per-chunk gate quantities with resets (all (BH, NC, L) unless noted; see the module doc)."""

    vecB: jax.Array  # b_t: in-chunk cumulative log forget gate, restarting after each reset (0 there)
    vecA: jax.Array  # a_s: log weight of step s in the chunk's end state; -inf if a reset follows s
    vecReset: jax.Array  # bool: the state before t is dropped
    vecSeen: jax.Array  # bool: a reset at or before t in the chunk
    vecStart: jax.Array  # int32: absolute index of the latest reset <= t in the chunk, else the chunk start
    vecG: jax.Array  # (BH, NC): total log forget gate of the chunk; -inf if the chunk holds a reset


def _segmented_cumsum(x: jax.Array, restart: jax.Array, axis: int) -> jax.Array:
    """Inclusive cumulative sum along ``axis`` that restarts at every ``restart`` (starting from the
    value there): an associative scan of (value, flag) pairs, exact (no differences of sums)."""

    def op(earlier, later):
        v1, f1 = earlier
        v2, f2 = later
        return jnp.where(f2, v2, v1 + v2), f1 | f2

    return jax.lax.associative_scan(op, (x, restart), axis=axis)[0]


def _latest_reset(vecReset: jax.Array) -> jax.Array:
    """(BH, NC, L) int32: in-chunk index of the latest reset at or before t, -1 if none."""
    L = vecReset.shape[-1]
    idx = jnp.where(vecReset, jnp.arange(L, dtype=jnp.int32), jnp.int32(-1))
    return jax.lax.associative_scan(jnp.maximum, idx, axis=2)


def _chunk_gates_from_parts(vecB, vecA, vecReset, latest, L) -> ChunkGates:
    BH, NC, _ = vecB.shape
    vecSeen = latest >= 0
    chunk_start = (jnp.arange(NC, dtype=jnp.int32) * L)[None, :, None]
    vecStart = chunk_start + jnp.maximum(latest, 0)
    last = latest[..., -1:]  # (BH, NC, 1) latest reset of the chunk
    reset_after = jnp.arange(L, dtype=jnp.int32) < last  # a reset in (s, L-1]
    vecA = jnp.where(reset_after, -jnp.inf, vecA)
    vecG = jnp.where(last[..., 0] >= 0, -jnp.inf, vecB[..., -1])
    return ChunkGates(vecB, vecA, vecReset, vecSeen, vecStart, vecG)


def chunk_gates(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    vecReset: jax.Array,  # (BH, S) bool
    L: int,
) -> ChunkGates:
    """The chunk gates for intra chunk ``L`` (S a multiple of L) and the given reset positions.

    The logf of a reset position never enters a sum (its state is dropped), so every sum stays as
    precise as the ordinary gates in its segment: b_t sums only from the latest reset, a_s only over
    the rest of its segment.
    """
    BH, S = vecLogF.shape
    NC = S // L
    reset = vecReset.reshape(BH, NC, L)
    logf = jnp.where(reset, 0.0, vecLogF.reshape(BH, NC, L))  # a reset's logf enters no sum
    vecB = _segmented_cumsum(logf, reset, axis=2)
    rev = cumsum(logf, axis=2, reverse=True)  # sum_{r >= s} (masked where a reset follows: see below)
    rev_excl = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    vecA = vecI.reshape(BH, NC, L) + rev_excl
    return _chunk_gates_from_parts(vecB, vecA, reset, _latest_reset(reset), L)


def seed_chunk_gates(cg: ChunkGates) -> tuple[jax.Array, jax.Array]:
    """(vecB, vecA) in the seed layout (BH, NC, L): vecB holds -inf at the reset positions (and the
    restarted sums elsewhere), vecA -inf where a reset follows. Without resets: the seed's plain
    in-chunk cumulative sums."""
    return jnp.where(cg.vecReset, -jnp.inf, cg.vecB), cg.vecA


def chunk_gates_from_seed(vecB: jax.Array, vecA: jax.Array) -> ChunkGates:
    """The inverse of ``seed_chunk_gates``: resets where vecB is -inf. (BH, NC, L) each."""
    L = vecB.shape[-1]
    reset = vecB == -jnp.inf
    vecB = jnp.where(reset, 0.0, vecB)
    return _chunk_gates_from_parts(vecB, vecA, reset, _latest_reset(reset), L)


def border_max_states(vecM: jax.Array, scaM0: jax.Array, L: int) -> jax.Array:
    """(BH, NC+1): m0, then m at the last step of every chunk."""
    BH, S = vecM.shape
    return jnp.concatenate([scaM0[:, None], vecM[:, L - 1 :: L]], axis=1)


def kernel_gates_from_chunk_gates(
    vecI: jax.Array,  # (BH, NC, L)
    cg: ChunkGates,
    vecM: jax.Array,  # (BH, NC, L) per-step max state
    scaM_borders: jax.Array,  # (BH, NC+1)
) -> KernelGates:
    """The vectors the kernels load, from the chunk gates and the stabilizers (see module doc)."""
    BH, NC, L = cg.vecB.shape
    m_prev = scaM_borders[:, :-1, None]
    m_next = scaM_borders[:, 1:, None]
    vecQlog = (cg.vecB - vecM) * LOG2_E
    vecKlog = (vecI - cg.vecB) * LOG2_E
    vecWinter = jnp.where(cg.vecSeen, 0.0, jnp.exp(cg.vecB + m_prev - vecM))
    vecWstate = jnp.exp(cg.vecA - m_next)
    vecDecay = jnp.exp(cg.vecG + scaM_borders[:, :-1] - scaM_borders[:, 1:])
    flat = lambda x: x.reshape(BH, NC * L).astype(jnp.float32)  # noqa: E731
    return KernelGates(
        flat(vecQlog), flat(vecKlog), flat(vecWinter), flat(vecWstate),
        vecDecay.astype(jnp.float32), scaM_borders.astype(jnp.float32),
        cg.vecStart.reshape(BH, NC * L), cg.vecReset.reshape(BH, NC * L), cg.vecSeen.reshape(BH, NC * L),
    )


def kernel_gates(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    vecM: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    L: int,
    vecReset: jax.Array | None = None,  # (BH, S) bool, explicit resets
) -> KernelGates:
    """All kernel gate vectors for chunk size ``L`` (S a multiple of L), resets included."""
    BH, S = vecI.shape
    NC = S // L
    reset = reset_positions(vecLogF, vecM, previous_max_states(vecM, scaM0), vecReset)
    cg = chunk_gates(vecI, vecLogF, reset, L)
    scaM_borders = border_max_states(vecM, scaM0, L)
    return kernel_gates_from_chunk_gates(vecI.reshape(BH, NC, L), cg, vecM.reshape(BH, NC, L), scaM_borders)


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


def _segmented_suffix_sum(x: jax.Array, reset: jax.Array) -> jax.Array:
    """(BH, NC, L): sum of x over [r, next reset after r) inside the chunk (restarting at resets)."""
    # reversed, a segment starts right before a reset: restart at r where reset_{r+1}
    stop = jnp.concatenate([reset[..., 1:], jnp.zeros_like(reset[..., :1])], axis=-1)
    return _segmented_cumsum(x[..., ::-1], stop[..., ::-1], axis=2)[..., ::-1]


def gate_gradients(
    vecDqq: jax.Array,  # (BH, S) <dq_t, q_t>
    vecDkk: jax.Array,  # (BH, S) <dk_t, k_t>
    vecDkkState: jax.Array,  # (BH, S) <dk_t, k_t> through the state leaving t's chunk only
    scaDdecay: jax.Array,  # (BH, NC) <dC_k, vecDecay_k C_{k-1}> + <dn_k, vecDecay_k n_{k-1}>
    vecReset: jax.Array,  # (BH, S) bool (or int, nonzero), the reset positions of ``kernel_gates``
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

    With resets every term across a reset is zero, so the sums restart: the suffix sum runs only up
    to the next reset, the state part counts only for r after the chunk's last reset (before it
    every leaving-state weight is zero), the decay is zero, and dlogf = 0 at a reset itself (its
    logf enters no weight).
    """
    BH, S = vecDqq.shape
    NC = S // L
    chunked = lambda x: x.reshape(BH, NC, L)  # noqa: E731
    reset = chunked(vecReset.astype(bool))
    suffix = _segmented_suffix_sum(chunked(vecDqq - vecDkk), reset)
    last = _latest_reset(reset)[..., -1:]  # (BH, NC, 1)
    in_last_segment = jnp.arange(L, dtype=jnp.int32) >= last
    per_chunk = jnp.sum(chunked(vecDkkState), axis=2) + scaDdecay
    vecDLogF = suffix + jnp.where(in_last_segment, per_chunk[..., None], 0.0)
    vecDLogF = jnp.where(reset, 0.0, vecDLogF).reshape(BH, S)
    return vecDkk, vecDLogF


def max_state_pullback(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    vecDM: jax.Array,  # (BH, S) cotangent of every m_t
    scan=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dI, dLogF, dM0): the cotangents of the m scan pulled back to its inputs (``scan``: the
    scan function of the forward pass, default ``max_state_scan``), by ``jax.vjp`` of the scan.
    The kernels' backward uses ``max_state_pullback_recurrent``; this one stays as the independent
    reference the tests compare it with away from ties."""
    _, vjp = jax.vjp(max_state_scan if scan is None else scan, vecI, vecLogF, scaM0)
    return vjp(vecDM.astype(vecI.dtype))


def max_state_selection(vecI, vecLogF, scaM0, vecM, dtype=jnp.float32) -> jax.Array:
    """(BH, S): sel_t = d m_t / d m_{t-1} of m_t = max(logf_t + m_{t-1}, i_t): 1 where the carried
    term is larger, 0 where i_t is, 1/2 at a tie (``jnp.maximum``'s split)."""
    carry = vecLogF.astype(dtype) + previous_max_states(vecM.astype(dtype), scaM0.astype(dtype))
    vecI = vecI.astype(dtype)
    return jnp.where(carry > vecI, 1.0, jnp.where(carry == vecI, 0.5, 0.0)).astype(dtype)


def max_state_pullback_recurrent(
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    scaM0: jax.Array,  # (BH,)
    vecM: jax.Array,  # (BH, S) the forward's m_t
    vecDM: jax.Array,  # (BH, S) cotangent of every m_t
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dI, dLogF, dM0): the pull-back of the cotangents of every m_t through the recurrence
    m_t = max(logf_t + m_{t-1}, i_t), from the forward's m (nothing recomputed).

    With sel_t = d m_t / d m_{t-1} (1 where logf_t + m_{t-1} > i_t, 0 where it is smaller, 1/2 at a
    tie, as ``jnp.maximum`` splits it), the total cotangent of m_t is the linear recurrence
    G_t = dm_t + sel_{t+1} G_{t+1} (G after the last step: 0), and

        dI_t = (1 - sel_t) G_t,   dLogF_t = sel_t G_t,   dM0 = sel_0 G_0.

    G is one associative scan (right to left) of the affine maps y -> dm_t + sel_{t+1} y; their
    products of sel are exact (powers of two). This is the reverse-mode derivative of the
    step-by-step recurrence (the float64 reference's), with its tie rule; away from ties it equals
    ``max_state_pullback`` (the ``jax.vjp`` of the associative (max, +) scan, which recomputes the
    scan and transposes it), summed in another order.
    """
    dt = vecDM.dtype
    sel = max_state_selection(vecI, vecLogF, scaM0, vecM, dt)
    sel_next = jnp.concatenate([sel[:, 1:], jnp.zeros_like(sel[:, :1])], axis=1)

    def compose(right, left):
        # ``right`` holds the maps of the later steps (composed), ``left`` the earlier one:
        # left(right(y)) = x_l + a_l (x_r + a_r y)
        a_r, x_r = right
        a_l, x_l = left
        return a_l * a_r, x_l + a_l * x_r

    _, vecG = jax.lax.associative_scan(compose, (sel_next, vecDM), reverse=True, axis=1)
    return (1.0 - sel) * vecG, sel * vecG, sel[:, 0] * vecG[:, 0]


def chunk_max_states(
    vecI: jax.Array,  # (BH, NC, L)
    vecLogF: jax.Array,  # (BH, NC, L)
    scaM_borders: jax.Array,  # (BH, NC+1)
) -> jax.Array:  # (BH, NC, L)
    """Per-step m from the border stabilizers: the m scan of each chunk from its entering m_{k-1}.

    Equal to ``max_state_scan`` over the whole sequence when the borders are its own; used by the
    seed entry points that receive the border states instead of the gates' whole history.
    """
    BH, NC, L = vecI.shape
    vecM = max_state_scan(vecI.reshape(BH * NC, L), vecLogF.reshape(BH * NC, L),
                          scaM_borders[:, :-1].reshape(BH * NC))
    return vecM.reshape(BH, NC, L)
