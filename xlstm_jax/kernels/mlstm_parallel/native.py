"""Parallel (quadratic) mLSTM in pure JAX: the stabilized reference of every other form.

Notation: see ``xlstm_jax.kernels._common``. Additionally

    logF     (B, NH, S)      log forget gates, ``log_sigmoid(vecF)``
    matLogD  (B, NH, S, S)   ``logD[t, s] = sum_{r=s+1..t} logF_r + i_s`` for s <= t, -inf above the
                             diagonal, built "stablef": a masked cumulative sum, never a difference of
                             two global cumulative sums
    vecM     (B, NH, S)      per-step max state, ``m_t = max_s logD[t, s]`` (and the initial-state term)
    vecN     (B, NH, S)      per-step normalizer ``max(|qs_t . n_t|, lower bound)`` (without eps)

With initial states the parallel form adds the column ``m0 + sum_{r<=t} logF_r`` for the initial
state (C0, n0); without them it starts from m0 = -inf (docs/design.md, section 1). A row in which
nothing contributes (every weight zero: input gates of -inf, or a forget gate of 0 (f = -inf) after
the last input) has m_t = -inf; it takes m_t = 0 instead, so that h_t = 0 without NaN. Last states
are given in the m0 = 0 convention of the recurrent form.

Extreme gates are exact: f = -inf (a forget gate of exactly 0) makes every weight across it
exp(-inf) = 0, i = -inf makes its step's weights 0.

``grad_mode="tfla"`` holds the denominator and m constant in the backward pass (the TFLA kernels'
cheaper gradient); ``"exact"`` (default) is the exact gradient of the function.

``input_gate="sigmoid"``: i arrives as log_sigmoid(i) (``validation``) and m is held at 0.
``segment_ids``: f arrives as -inf at document starts (``validation``), which makes every weight
across a document border exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..registry import register_mlstm_kernel
from .._common import MLSTMState, compute_dtype, normalizer_lower_bound
from ..options import CellOptions
from ..validation import empty_sequence_outputs, validate_sequence_call


def stablef_log_decay(logF: jax.Array) -> jax.Array:
    """``D[t, s] = sum_{r=s+1..t} logF_r`` for s <= t, -inf above the diagonal.

    logF: (..., S) -> (..., S, S). Built as a cumulative sum down each column of the masked matrix
    ``logF_t [t > s]``, so each entry sums only its own segment (no cancellation).
    """
    S = logF.shape[-1]
    idx = jnp.arange(S)
    strictly_lower = idx[:, None] > idx[None, :]  # [t, s]: t > s
    matF = jnp.where(strictly_lower, logF[..., :, None], 0.0)  # (..., S_t, S_s)
    matD = jnp.cumsum(matF, axis=-2)
    return jnp.where(idx[:, None] >= idx[None, :], matD, -jnp.inf)


def mlstm_parallel(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    vecF: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    *,
    return_last_states: bool = False,
    segment_ids: jax.Array | None = None,  # (B, S) integers: packed documents
    return_normalizer: bool = False,
    qk_scale: float | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
    input_gate: str = "exp",
    cell_options: CellOptions | None = None,
):
    """Stabilized parallel mLSTM. Memory is quadratic in S: a reference, not a training kernel.

    Returns ``h`` (B, NH, S, DHV) in the dtype of q; with ``return_normalizer`` also ``(vecN, vecM)``
    (B, NH, S) each, float32 or float64; with ``return_last_states`` also ``(matC, vecN, scaM)``.
    Order: ``h``, then the normalizer pair, then the last states. The cell options come as the flat
    keywords or as ``cell_options`` (``CellOptions``).
    """
    call = validate_sequence_call(
        "parallel_native", matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial,
        segment_ids=segment_ids, cell_options=cell_options, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    vecI, vecF, state0, opts = call.vecI, call.vecF, call.state, call.options
    B, NH, S, DHQK = matQ.shape
    qk_scale, eps, norm_val = call.qk_scale, opts.eps, opts.norm_val
    stabilize_correctly, grad_mode = opts.stabilize_correctly, opts.grad_mode
    dt = compute_dtype(matQ, matK, matV, vecI, vecF, *(state0 or ()))
    if call.empty:
        return empty_sequence_outputs(call, h_dtype=matQ.dtype, state_dtype=dt,
                                      return_last_states=return_last_states, return_normalizer=return_normalizer)
    q, k, v = (x.astype(dt) for x in (matQ, matK, matV))
    vecI, vecF = vecI.astype(dt), vecF.astype(dt)
    sg = jax.lax.stop_gradient if grad_mode == "tfla" else (lambda x: x)

    logF = jax.nn.log_sigmoid(vecF)  # (B, NH, S)
    logF_cum = jnp.cumsum(logF, axis=-1)  # (B, NH, S): sum_{r<=t} logF_r
    matLogD = stablef_log_decay(logF) + vecI[..., None, :]  # (B, NH, S, S)

    vecM = jnp.max(matLogD, axis=-1)  # (B, NH, S)
    if state0 is not None:
        matC0, vecN0, scaM0 = (x.astype(dt) for x in state0)
        vecLogInit = scaM0[..., None] + logF_cum  # (B, NH, S)
        vecM = jnp.maximum(vecM, vecLogInit)
    vecM = sg(jnp.where(vecM == -jnp.inf, 0.0, vecM))  # nothing contributes to the row: m = 0
    if not call.max_state:  # the sigmoid cell: every log weight is <= 0, m is held at 0
        vecM = jnp.zeros_like(vecM)

    qs = q * qk_scale
    matS = jnp.einsum("bhtd,bhsd->bhts", qs, k)  # (B, NH, S, S)
    matCt = matS * jnp.exp(matLogD - vecM[..., None])
    matNum = jnp.einsum("bhts,bhsv->bhtv", matCt, v)  # (B, NH, S, DHV)
    vecQN = jnp.sum(matCt, axis=-1)  # (B, NH, S)
    if state0 is not None:
        vecInit = jnp.exp(vecLogInit - vecM)  # (B, NH, S)
        matNum = matNum + vecInit[..., None] * jnp.einsum("bhtd,bhdv->bhtv", qs, matC0)
        vecQN = vecQN + vecInit * jnp.einsum("bhtd,bhd->bht", qs, vecN0)
    vecLower = normalizer_lower_bound(vecM, norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    vecNorm = jnp.maximum(jnp.abs(vecQN), vecLower)  # (B, NH, S)
    vecDen = sg(vecNorm + eps)
    h = (matNum / vecDen[..., None]).astype(matQ.dtype)

    out = [h]
    if return_normalizer:
        out.append((vecNorm, vecM))
    if return_last_states:
        # states after the last step, m0 = 0 convention without initial states
        vecLogLast = matLogD[..., -1, :]  # (B, NH, S): weight of step s in the last state
        scaLogInit = (scaM0 if state0 is not None else jnp.zeros((B, NH), dt)) + logF_cum[..., -1]
        scaM = jnp.maximum(jnp.max(vecLogLast, axis=-1), scaLogInit)  # (B, NH)
        scaM = sg(jnp.where(scaM == -jnp.inf, 0.0, scaM))
        if not call.max_state:
            scaM = jnp.zeros_like(scaM)
        vecW = jnp.exp(vecLogLast - scaM[..., None])  # (B, NH, S)
        matC = jnp.einsum("bhs,bhsd,bhsv->bhdv", vecW, k, v)
        vecN = jnp.einsum("bhs,bhsd->bhd", vecW, k)
        if state0 is not None:
            scaInit = jnp.exp(scaLogInit - scaM)
            matC = matC + scaInit[..., None, None] * matC0
            vecN = vecN + scaInit[..., None] * vecN0
        out.append(MLSTMState(matC, vecN, scaM))
    return out[0] if len(out) == 1 else tuple(out)


def _parallel_kernel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, **kw):
    return mlstm_parallel(q, k, v, i, f, c_initial, n_initial, m_initial, **kw)


register_mlstm_kernel(
    "parallel_native",
    _parallel_kernel,
    description="parallel (quadratic) stabilized form in pure JAX; memory O(S^2)",
)
