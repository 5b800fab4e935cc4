"""Chunkwise mLSTM in pure JAX/XLA with its own ``jax.custom_vjp``: the fast fallback everywhere.

Notation: see ``xlstm_jax.kernels._common``. Additionally, with chunk size L and NC = ceil(S / L):

    vecLogF  (B, NH, NC, L)    log forget gates per chunk
    vecB     (B, NH, NC, L)    inclusive cumulative sum of vecLogF inside each chunk (b_t)
    vecG     (B, NH, NC)       total log forget gate of each chunk (g_k = b_L)
    matC_all (B, NH, NC+1, DHQK, DHV), vecN_all (B, NH, NC+1, DHQK), scaM_all (B, NH, NC+1)
                               the states at the chunk borders (index 0: the initial state)

Forward: a ``lax.scan`` over chunks computes the border states (the inter-chunk recurrence); then all
chunks compute h at once from their border state and their own masked parallel form (intra-chunk),
under one stabilizer ``m_t = max(b_t + m_{k-1}, max_s logD[t, s])``.

The custom VJP keeps only the inputs and the border states (memory linear in S) and recomputes in the
backward pass: the intra-chunk part is differentiated for all chunks at once, the border recurrence by
the scan's own reverse pass. The result is the exact gradient of the function (``grad_mode="exact"``)
or, with ``grad_mode="tfla"``, the gradient with the denominator and m held constant.

A sequence length that is not a multiple of L is padded with open forget gates (log f = 0) and
closed input gates (i = -1e30), which carry the state through unchanged. Chunk sizes follow
``xlstm_jax.kernels.chunking`` (any positive int, at most S).

Extreme gates are exact: every weight is the exponential of a sum of log gates over its own segment
(masked cumulative sums, never a difference of two sums), so f = -inf or a very negative f gives
weights exp(-inf) = 0 across it, and i = -inf gives zero weight to its step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..registry import register_mlstm_kernel
from .._common import MLSTMState, compute_dtype, normalizer_lower_bound
from ..chunking import fit_chunk_size, validate_chunk_size
from ..mlstm_parallel.native import stablef_log_decay
from ..options import CellOptions
from ..validation import empty_sequence_outputs, validate_sequence_call

_CLOSED_GATE = -1e30


def _pad_to_chunks(x: jax.Array, S_pad: int, value: float) -> jax.Array:
    S = x.shape[2]
    if S_pad == S:
        return x
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, S_pad - S)
    return jnp.pad(x, pad, constant_values=value)


def _to_chunks(x: jax.Array, NC: int, L: int) -> jax.Array:
    """(B, NH, S, ...) -> (B, NH, NC, L, ...)."""
    return x.reshape(x.shape[:2] + (NC, L) + x.shape[3:])


def _chunk_gates(vecI, vecLogF):
    """Per-chunk gate quantities. vecI, vecLogF: (B, NH, NC, L)."""
    vecB = jnp.cumsum(vecLogF, axis=-1)  # b_t, inclusive
    vecG = vecB[..., -1]  # g_k
    # sum_{r=s+1..L} logF_r as an exclusive reverse cumulative sum (no cancellation)
    vecRev = jnp.cumsum(vecLogF[..., ::-1], axis=-1)[..., ::-1]
    vecRevExcl = jnp.concatenate([vecRev[..., 1:], jnp.zeros_like(vecRev[..., :1])], axis=-1)
    vecA = vecI + vecRevExcl  # log weight of step s in the chunk's end state
    return vecB, vecG, vecA


def _border_states(matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, *, sg, max_state=True):
    """Inter-chunk recurrence. Chunked inputs (B, NH, NC, L, ...); returns states (B, NH, NC+1, ...)."""
    _, vecG, vecA = _chunk_gates(vecI, vecLogF)

    def body(carry, x):
        matC, vecN, scaM = carry
        k, v, g, a = x  # (B, NH, L, DHQK), (B, NH, L, DHV), (B, NH), (B, NH, L)
        if max_state:
            scaM_new = sg(jnp.maximum(g + scaM, jnp.max(a, axis=-1)))
        else:  # the sigmoid cell: m is held at 0
            scaM_new = jnp.zeros_like(scaM)
        scaDecay = jnp.exp(g + scaM - scaM_new)
        vecW = jnp.exp(a - scaM_new[..., None])  # (B, NH, L)
        kw = k * vecW[..., None]
        matC_new = scaDecay[..., None, None] * matC + jnp.einsum("bhld,bhlv->bhdv", kw, v)
        vecN_new = scaDecay[..., None] * vecN + jnp.sum(kw, axis=-2)
        new = (matC_new, vecN_new, scaM_new)
        return new, new

    xs = (
        jnp.moveaxis(matK, 2, 0), jnp.moveaxis(matV, 2, 0),
        jnp.moveaxis(vecG, 2, 0), jnp.moveaxis(vecA, 2, 0),
    )
    _, (matC_all, vecN_all, scaM_all) = jax.lax.scan(body, (matC0, vecN0, scaM0), xs)
    cat = lambda x0, xs_: jnp.concatenate([x0[None], xs_], axis=0)  # noqa: E731
    return (
        jnp.moveaxis(cat(matC0, matC_all), 0, 2),
        jnp.moveaxis(cat(vecN0, vecN_all), 0, 2),
        jnp.moveaxis(cat(scaM0, scaM_all), 0, 2),
    )


def _chunk_outputs(matQ, matK, matV, vecI, vecLogF, matC_prev, vecN_prev, scaM_prev, *, opts, sg):
    """Intra-chunk parallel form plus the inter-chunk term, for all chunks at once.

    Chunked inputs (B, NH, NC, L, ...); matC_prev etc. are the states *entering* each chunk
    (B, NH, NC, ...). Returns h (B, NH, NC, L, DHV), vecNorm and vecM (B, NH, NC, L).
    """
    vecB = jnp.cumsum(vecLogF, axis=-1)  # (B, NH, NC, L)
    matLogD = stablef_log_decay(vecLogF) + vecI[..., None, :]  # (B, NH, NC, L, L)
    vecLogInter = vecB + scaM_prev[..., None]  # (B, NH, NC, L)
    if opts["max_state"]:
        vecM = sg(jnp.maximum(jnp.max(matLogD, axis=-1), vecLogInter))
    else:  # the sigmoid cell: m is held at 0
        vecM = jnp.zeros_like(vecLogInter)
    qs = matQ * opts["qk_scale"]
    matS = jnp.einsum("bhctd,bhcsd->bhcts", qs, matK)
    matCt = matS * jnp.exp(matLogD - vecM[..., None])
    vecInter = jnp.exp(vecLogInter - vecM)  # (B, NH, NC, L)
    matNum = jnp.einsum("bhcts,bhcsv->bhctv", matCt, matV) + vecInter[..., None] * jnp.einsum(
        "bhctd,bhcdv->bhctv", qs, matC_prev
    )
    vecQN = jnp.sum(matCt, axis=-1) + vecInter * jnp.einsum("bhctd,bhcd->bhct", qs, vecN_prev)
    vecLower = normalizer_lower_bound(
        vecM, norm_val=opts["norm_val"], stabilize_correctly=opts["stabilize_correctly"]
    )
    vecNorm = jnp.maximum(jnp.abs(vecQN), vecLower)
    h = matNum / sg(vecNorm + opts["eps"])[..., None]
    return h, vecNorm, vecM


def _forward(inputs, opts, L):
    q, k, v, i, logf, C0, n0, m0 = inputs
    sg = jax.lax.stop_gradient if opts["grad_mode"] == "tfla" else (lambda x: x)
    B, NH, S, _ = q.shape
    NC = S // L
    qc, kc, vc = (_to_chunks(x, NC, L) for x in (q, k, v))
    ic, fc = _to_chunks(i, NC, L), _to_chunks(logf, NC, L)
    borders = _border_states(kc, vc, ic, fc, C0, n0, m0, sg=sg, max_state=opts["max_state"])
    prev = tuple(x[:, :, :-1] for x in borders)
    h, vecNorm, vecM = _chunk_outputs(qc, kc, vc, ic, fc, *prev, opts=opts, sg=sg)
    h = h.reshape(B, NH, S, -1)
    last = tuple(x[:, :, -1] for x in borders)
    return h, last, borders, (vecNorm.reshape(B, NH, S), vecM.reshape(B, NH, S))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _chunkwise_core(inputs, opts, L):
    h, last, _, _ = _forward(inputs, dict(opts), L)
    return h, last


def _core_fwd(inputs, opts, L):
    h, last, borders, _ = _forward(inputs, dict(opts), L)
    return (h, last), (inputs, borders)


def _core_bwd(opts, L, res, cts):
    opts = dict(opts)
    inputs, borders = res
    dh, dlast = cts
    q, k, v, i, logf, C0, n0, m0 = inputs
    sg = jax.lax.stop_gradient if opts["grad_mode"] == "tfla" else (lambda x: x)
    B, NH, S, _ = q.shape
    NC = S // L
    qc, kc, vc = (_to_chunks(x, NC, L) for x in (q, k, v))
    ic, fc = _to_chunks(i, NC, L), _to_chunks(logf, NC, L)
    prev = tuple(x[:, :, :-1] for x in borders)

    def intra(qc, kc, vc, ic, fc, *prev):
        return _chunk_outputs(qc, kc, vc, ic, fc, *prev, opts=opts, sg=sg)[0]

    _, vjp_intra = jax.vjp(intra, qc, kc, vc, ic, fc, *prev)
    dqc, dkc_a, dvc_a, dic_a, dfc_a, dC_prev, dn_prev, dm_prev = vjp_intra(
        _to_chunks(dh, NC, L).astype(qc.dtype)
    )
    # cotangents of the border states: the entering states of each chunk, plus the last state
    dborders = tuple(
        jnp.concatenate([d_prev, d_last[:, :, None].astype(d_prev.dtype)], axis=2)
        for d_prev, d_last in zip((dC_prev, dn_prev, dm_prev), dlast)
    )

    def border_fn(kc, vc, ic, fc, C0, n0, m0):
        return _border_states(kc, vc, ic, fc, C0, n0, m0, sg=sg, max_state=opts["max_state"])

    _, vjp_border = jax.vjp(border_fn, kc, vc, ic, fc, C0, n0, m0)
    dkc_b, dvc_b, dic_b, dfc_b, dC0, dn0, dm0 = vjp_border(dborders)
    unchunk = lambda x: x.reshape((B, NH, S) + x.shape[4:])  # noqa: E731
    return (
        (
            unchunk(dqc), unchunk(dkc_a + dkc_b), unchunk(dvc_a + dvc_b),
            unchunk(dic_a + dic_b), unchunk(dfc_a + dfc_b), dC0, dn0, dm0,
        ),
    )


_chunkwise_core.defvjp(_core_fwd, _core_bwd)


def mlstm_chunkwise(
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
    qk_scale: float | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
    input_gate: str = "exp",
    cell_options: CellOptions | None = None,
    chunk_size: int = 64,
    return_normalizer: bool = False,
):
    """Chunkwise mLSTM in XLA. Any S (padded internally), gradients to all inputs and initial states.

    Returns ``h`` (B, NH, S, DHV) in the dtype of q; with ``return_normalizer`` also ``(vecN, vecM)``
    (B, NH, S) (forward only, not differentiated); with ``return_last_states`` also
    ``(matC, vecN, scaM)`` in float32 (float64 for float64 inputs). The cell options come as the
    flat keywords or as ``cell_options`` (``CellOptions``).
    """
    call = validate_sequence_call(
        "chunkwise_native", matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial,
        segment_ids=segment_ids, cell_options=cell_options, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    vecI, vecF, state0, cell = call.vecI, call.vecF, call.state, call.options
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    L = fit_chunk_size(validate_chunk_size("chunk_size", chunk_size, S=S), S)
    dt = compute_dtype(matQ, matK, matV, vecI, vecF, *(state0 or ()))
    if call.empty:
        return empty_sequence_outputs(call, h_dtype=matQ.dtype, state_dtype=dt,
                                      return_last_states=return_last_states, return_normalizer=return_normalizer)
    if state0 is None:
        state0 = MLSTMState(
            jnp.zeros((B, NH, DHQK, DHV), dt), jnp.zeros((B, NH, DHQK), dt), jnp.zeros((B, NH), dt)
        )
    S_pad = -(-S // L) * L
    q, k, v = (_pad_to_chunks(x.astype(dt), S_pad, 0.0) for x in (matQ, matK, matV))
    i = _pad_to_chunks(vecI.astype(dt), S_pad, _CLOSED_GATE)
    logf = _pad_to_chunks(jax.nn.log_sigmoid(vecF.astype(dt)), S_pad, 0.0)
    opts = dict(
        qk_scale=call.qk_scale, eps=cell.eps, norm_val=cell.norm_val,
        stabilize_correctly=cell.stabilize_correctly, grad_mode=cell.grad_mode, max_state=cell.max_state,
    )
    inputs = (q, k, v, i, logf, *(x.astype(dt) for x in state0))
    if return_normalizer:
        h, last, _, (vecNorm, vecM) = _forward(inputs, opts, L)
    else:
        h, last = _chunkwise_core(inputs, tuple(sorted(opts.items())), L)
    out = [h[:, :, :S].astype(matQ.dtype)]
    if return_normalizer:
        out.append((vecNorm[:, :, :S], vecM[:, :, :S]))
    if return_last_states:
        out.append(MLSTMState(*last))
    return out[0] if len(out) == 1 else tuple(out)


def _chunkwise_kernel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *, chunk_size=64, **kw):
    return mlstm_chunkwise(q, k, v, i, f, c_initial, n_initial, m_initial, chunk_size=chunk_size, **kw)


register_mlstm_kernel(
    "chunkwise_native",
    _chunkwise_kernel,
    options={"chunk_size": 64},
    description="chunkwise form in XLA with its own custom VJP (border states kept, rest recomputed)",
)
