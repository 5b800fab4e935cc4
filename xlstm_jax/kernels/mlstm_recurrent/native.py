"""Recurrent mLSTM in pure JAX: one step, and a whole sequence by a Python loop or ``lax.scan``.

Notation: see ``xlstm_jax.kernels._common``. One step takes

    matC (B, NH, DHQK, DHV), vecN (B, NH, DHQK), scaM (B, NH)     the state before the step
    vecQ, vecK (B, NH, DHQK), vecV (B, NH, DHV)                   the step's inputs
    scaI, scaF (B, NH)                                            gate pre-activations

and computes (docs/design.md, section 1)

    m_t  = max(logf_t + m_{t-1}, i_t)
    C_t  = exp(logf_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n_t likewise)
    h_t  = qs_t^T C_t / (max(|qs_t . n_t|, norm_val * exp(-m_t)) + eps)

States start at zero (m0 = 0) unless given. ``grad_mode="tfla"`` holds the denominator and m
constant in the backward pass. Extreme gates are exact: f = -inf gives exp(-inf) = 0 for the old
state (a fresh start, m_t = i_t), i = -inf gives exp(-inf) = 0 for the new input.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..registry import register_mlstm_kernel, register_mlstm_step_kernel
from .._common import MLSTMState, compute_dtype, normalizer_lower_bound
from ..options import CellOptions
from ..validation import (
    empty_sequence_outputs,
    empty_step_outputs,
    floating_dtype,
    sigmoid_step_inputs,
    validate_sequence_call,
    validate_step_call,
)


def mlstm_recurrent_step(
    matC: jax.Array,  # (B, NH, DHQK, DHV)
    vecN: jax.Array,  # (B, NH, DHQK)
    scaM: jax.Array,  # (B, NH)
    vecQ: jax.Array,  # (B, NH, DHQK)
    vecK: jax.Array,  # (B, NH, DHQK)
    vecV: jax.Array,  # (B, NH, DHV)
    scaI: jax.Array,  # (B, NH)
    scaF: jax.Array,  # (B, NH)
    *,
    qk_scale: float | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
    input_gate: str = "exp",
    cell_options: CellOptions | None = None,
) -> tuple[jax.Array, MLSTMState]:
    """One mLSTM step. Returns ``h`` (B, NH, DHV) and the new state, all in the states' dtype.

    Shapes and dtypes are checked (``validation.validate_step_call``); B == 0 or NH == 0 gives
    empty outputs.
    """
    call = validate_step_call(
        "recurrent_native step", matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF,
        cell_options=cell_options, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    if not call.options.max_state:
        matC, vecN, scaM, scaI = sigmoid_step_inputs(matC, vecN, scaM, scaI)
    return _step(matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF, call.options)


def _step(matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF, opts: CellOptions):
    """The step on validated inputs (see ``mlstm_recurrent_step``)."""
    dt = matC.dtype
    if matC.shape[0] * matC.shape[1] == 0:
        return empty_step_outputs(matC, vecN, scaM.astype(dt), vecV, dt)
    qk_scale = opts.effective_qk_scale(vecQ.shape[-1])
    eps, norm_val, stabilize_correctly = opts.eps, opts.norm_val, opts.stabilize_correctly
    sg = jax.lax.stop_gradient if opts.grad_mode == "tfla" else (lambda x: x)
    q, k, v, i, f = (x.astype(dt) for x in (vecQ, vecK, vecV, scaI, scaF))
    logF = jax.nn.log_sigmoid(f)
    if opts.max_state:
        scaM_new = sg(jnp.maximum(logF + scaM, i))  # (B, NH)
    else:  # the sigmoid cell (i is log_sigmoid of the gate): m stays 0
        scaM_new = jnp.zeros_like(scaM)
    scaFa = jnp.exp(logF + scaM - scaM_new)
    scaIa = jnp.exp(i - scaM_new)
    matC_new = scaFa[..., None, None] * matC + scaIa[..., None, None] * (k[..., :, None] * v[..., None, :])
    vecN_new = scaFa[..., None] * vecN + scaIa[..., None] * k
    qs = q * qk_scale
    vecNum = jnp.einsum("bhd,bhdv->bhv", qs, matC_new)  # (B, NH, DHV)
    scaQN = jnp.einsum("bhd,bhd->bh", qs, vecN_new)  # (B, NH)
    scaLower = normalizer_lower_bound(scaM_new, norm_val=norm_val, stabilize_correctly=stabilize_correctly)
    scaDen = sg(jnp.maximum(jnp.abs(scaQN), scaLower) + eps)
    h = vecNum / scaDen[..., None]
    return h, MLSTMState(matC_new, vecN_new, scaM_new)


def mlstm_recurrent_sequence(
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
    use_scan: bool = True,
    state_dtype=None,
    step_fn: Callable | None = None,
):
    """Run the recurrent cell over a whole sequence.

    ``state_dtype`` (a floating dtype) defaults to the initial states' dtype, else float32 (float64
    for float64 inputs). ``step_fn(matC, vecN, scaM, q, k, v, i, f) -> (h, (matC, vecN, scaM))``
    replaces the pure-JAX step (scaM, i, f of shape (B, NH); the cell options are then the step
    function's business). Returns ``h`` (B, NH, S, DHV) in the dtype of q, and with
    ``return_last_states`` also ``(matC, vecN, scaM)`` in ``state_dtype``.
    """
    call = validate_sequence_call(
        "recurrent_native", matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial,
        segment_ids=segment_ids, cell_options=cell_options, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    vecI, vecF, state0 = call.vecI, call.vecF, call.state
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    state_dtype = floating_dtype("state_dtype", state_dtype)
    if state_dtype is None:
        state_dtype = state0.matC.dtype if state0 is not None else compute_dtype(matQ, matK, matV, vecI, vecF)
    state_dtype = jnp.dtype(state_dtype)
    if call.empty:
        return empty_sequence_outputs(
            call, h_dtype=matQ.dtype, state_dtype=state_dtype, return_last_states=return_last_states
        )
    if state0 is None:
        state0 = MLSTMState(
            jnp.zeros((B, NH, DHQK, DHV), state_dtype),
            jnp.zeros((B, NH, DHQK), state_dtype),
            jnp.zeros((B, NH), state_dtype),
        )
    else:
        state0 = MLSTMState(*(x.astype(state_dtype) for x in state0))
    if step_fn is None:
        opts = call.options
        step_fn = lambda C, n, m, q, k, v, i, f: _step(C, n, m, q, k, v, i, f, opts)  # noqa: E731

    xs = (matQ, matK, matV, vecI, vecF)
    if use_scan:
        def body(carry, x):
            h, new = step_fn(*carry, *x)
            return tuple(new), h

        xs_t = tuple(jnp.moveaxis(x, 2, 0) for x in xs)  # time first
        state, hs = jax.lax.scan(body, tuple(state0), xs_t)
        h = jnp.moveaxis(hs, 0, 2)
    else:
        state, hs = tuple(state0), []
        for t in range(S):
            h_t, state = step_fn(*state, *(x[:, :, t] for x in xs))
            hs.append(h_t)
        h = jnp.stack(hs, axis=2)
    h = h.astype(matQ.dtype)
    if return_last_states:
        return h, MLSTMState(*state)
    return h


def _recurrent_kernel(
    q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *, use_scan=True, state_dtype=None,
    step_fn=None, **kw,
):
    return mlstm_recurrent_sequence(
        q, k, v, i, f, c_initial, n_initial, m_initial, use_scan=use_scan, state_dtype=state_dtype,
        step_fn=step_fn, **kw,
    )


register_mlstm_kernel(
    "recurrent_native",
    _recurrent_kernel,
    options={"use_scan": True, "state_dtype": None, "step_fn": None},
    description=(
        "recurrent form in pure JAX, one step at a time (lax.scan or a Python loop); options: "
        "use_scan, state_dtype, step_fn (a replacement step, see mlstm_recurrent_sequence)"
    ),
)

register_mlstm_step_kernel("recurrent_native", mlstm_recurrent_step, description="one recurrent step in pure JAX")
