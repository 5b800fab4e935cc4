"""The autodiff layer of the Pallas chunkwise (TFLA) kernels: casting, padding, ``jax.custom_vjp``.

Notation (see ``xlstm_jax.kernels._common`` and ``gates.py``): BH = B * NH; inside this layer every
array is flattened over (B, NH), padded in time to S_pad (a multiple of the intra chunk L; open
forget gates, closed input gates, zero q/k/v: the state carries through unchanged) and in the head
dims to powers of two >= 16 (zero columns, exact).

Forward (``chunkwise_forward``): the m scan and the gate vectors (XLA, O(S)), the recurrent kernel
(chunk-border states), the parallel kernel (h and the signed normalizer qs.n).

Backward (``chunkwise_backward``): dh -> (1/den, dnq, dm) in XLA; the recurrent backward kernel
(state cotangents); the dQ, dK, dV kernels; gate gradients from <dq, q>, <dk, k> and the state
decays by chunk-local sums (``gates.gate_gradients``). ``grad_mode="exact"`` (default) carries the normalizer as an extra value column
(dnq) and pulls dm back through the m recurrence (``gates.max_state_pullback_recurrent``: one linear
scan from the forward's m, with the step-by-step recurrence's tie rule); ``grad_mode="tfla"`` treats the
denominator and m as constants, the convention of the TFLA kernels (docs/design.md, section 1).

Variant paths (``ChunkwiseKernelParams`` fields, keywords of ``mlstm_chunkwise_pallas`` and of
the registry entry; the defaults are the paths above; ``heuristics.VARIANT_CHOICES``):

* ``m_scan="linear"``: the m scan as an associative scan inside each chunk plus a sequential
  ``lax.scan`` over the chunk borders (``gates.max_state_scan_linear``), forward only (the
  pull-back reads m, whichever scan computed it).
* ``gates_impl="pallas"``: the gate vectors from m in one Pallas kernel, one program per (row,
  chunk) (``gate_kernels.gate_vectors``), in the forward pass and again in the backward pass.
* ``gate_grads_impl="pallas"``: the recurrent backward kernel also returns the decay terms
  vecDecay_k (<dC_k, C_{k-1}> + <dn_k, n_{k-1}>) (it holds dC_k in registers and loads the C_{k-1}
  tile), and the per-chunk logf-gradient sums run in one Pallas kernel
  (``gate_kernels.gate_gradients``); the XLA einsum over both state arrays is gone.
* ``states_bf16=True`` (16-bit kernel dtypes only): the recurrent kernels store the C and dC border
  states in the kernel dtype, which the parallel kernels' products cast them to anyway (bit-equal
  h, dq, dk, dv); the recurrences accumulate in fp32, and the last state C_NC and dC_0 come from
  extra fp32 outputs. Only the decay terms of the logf gradient see the rounded states.
* ``gates_impl="fused"``: the m scan and the gate vectors in one Pallas launch, one program per row
  (``gate_kernels.fused_gate_vectors``); the backward pass recomputes the vectors from m with the
  ``"pallas"`` kernel.
* ``gate_grads_impl="fused"``: as ``"pallas"``, and (exact gradients, exponential cell) the m
  pull-back inside the gate-gradient kernel (``gate_kernels.fused_gate_gradients``).
* ``save_gates=True``: the forward's gate vectors are residuals (no recomputation in the backward).
* ``fuse_dkdv=True``: dK and dV from one kernel (``bw_parallel_dkdv``).

The dh -> (1/den, dnq, dm) step stays in XLA, and so does the m pull-back except with
``gate_grads_impl="fused"``.

Inputs may be float32, bfloat16, float16 (float64 inputs run in float32); q, k, v are cast to the
kernel dtype (``autocast_kernel_dtype``, default: the dtype of q), gates, states and all
accumulation are float32. Inputs are validated by ``xlstm_jax.kernels.validation`` (B == 0 or
NH == 0 gives empty outputs); extreme gates (f = -inf, f = -1e30, i = -inf) are exact through the
resets of ``gates.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..._common import MLSTMState
from ...options import CellOptions
from ...pallas import _triton
from ...validation import (
    SequenceCall,
    empty_sequence_outputs,
    floating_dtype,
    validate_sequence_call,
)
from . import gate_kernels, gates, tuning
from .bw_parallel_dk import parallel_bw_dk
from .bw_parallel_dkdv import parallel_bw_dkdv
from .bw_parallel_dq import parallel_bw_dq
from .bw_parallel_dv import parallel_bw_dv
from .bw_recurrent import recurrent_bw_states
from .fw_parallel import parallel_fw_h
from .fw_recurrent import recurrent_fw_states, recurrent_fw_states_gated
from .heuristics import ChunkwiseKernelParams, padded_head_dim

_F32 = jnp.float32
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class CoreConfig:
    """Static (hashable) options of one kernel call."""

    params: ChunkwiseKernelParams
    qk_scale: float
    eps: float
    norm_val: float
    stabilize_correctly: bool
    grad_mode: str
    h_dtype: jnp.dtype
    recompute_states_in_bw: bool
    interpret: bool
    max_state: bool = True
    """False for the sigmoid cell (``input_gate="sigmoid"``): m == 0 and dm == 0."""
    zero_initial_state: bool = False
    """True when the call has no initial state (C0, n0, m0 are the zeros of ``prepare``): the
    recurrent forward kernel then starts from zeros instead of loading them (bit-identical in
    interpret mode and compiled). ``core_config`` sets it whenever the call has no initial state."""


class ForwardOut(NamedTuple):
    """Everything the forward computes (padded, flattened)."""

    matH: jax.Array  # (BH, S, DHV)
    vecNq: jax.Array  # (BH, S) signed qs.n (stabilized)
    vecM: jax.Array  # (BH, S)
    matC_states: jax.Array  # (BH, NC+1, DHQK, DHV)
    vecN_states: jax.Array  # (BH, NC+1, DHQK)
    scaM_borders: jax.Array  # (BH, NC+1)
    matC_last: jax.Array  # (BH, DHQK, DHV) float32 (matC_states may be 16-bit: ``states_bf16``)
    gates: gates.KernelGates | None = None  # the gate vectors (kept for the backward: ``save_gates``)


def chunkwise_forward(
    matQ: jax.Array,  # (BH, S, DHQK) kernel dtype
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    vecI: jax.Array,  # (BH, S) float32
    vecLogF: jax.Array,  # (BH, S) float32
    matC0: jax.Array,  # (BH, DHQK, DHV) float32
    vecN0: jax.Array,  # (BH, DHQK)
    scaM0: jax.Array,  # (BH,)
    cfg: CoreConfig,
) -> ForwardOut:
    """The forward pass on padded, flattened arrays."""
    p = cfg.params
    vecM, g, matC_states, vecN_states, matC_last = forward_states(
        matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg
    )
    matH, vecNq = parallel_fw_h(
        matQ, matK, matV, g.vecQlog, g.vecKlog, g.vecWinter, vecM, g.vecStart, matC_states, vecN_states,
        params=p, qk_scale=cfg.qk_scale, eps=cfg.eps, norm_val=cfg.norm_val,
        stabilize_correctly=cfg.stabilize_correctly, output_dtype=cfg.h_dtype, interpret=cfg.interpret,
    )
    return ForwardOut(matH, vecNq, vecM, matC_states, vecN_states, g.scaM_borders, matC_last, g)


def forward_states(matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg: CoreConfig):
    """The forward pass up to the chunk-border states: (vecM, gates, matC_states, vecN_states,
    matC_last fp32), i.e. the m scan (m == 0 for the sigmoid cell), the gate vectors and the
    recurrent kernel; shared with the Mosaic GPU family (``mlstm_chunkwise.mosaic``)."""
    p = cfg.params
    if cfg.max_state and p.gates_impl == "kernel":  # the m recurrence and the vectors in the recurrent kernel
        return _fw_states_gated(matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg)
    if cfg.max_state and p.gates_impl == "fused":  # the m scan and the vectors in one launch
        g, vecM = gate_kernels.fused_gate_vectors(vecI, vecLogF, scaM0, params=p, interpret=cfg.interpret)
    else:
        if cfg.max_state:
            vecM = gates.max_state_scan_for(p.m_scan, p.chunk_size_intra)(vecI, vecLogF, scaM0)
        else:  # the sigmoid cell: i is log_sigmoid of the gate, every log weight <= 0, m held at 0
            vecM = jnp.zeros_like(vecI)
        g = _kernel_gates(vecI, vecLogF, vecM, scaM0, cfg)
    matC_states, vecN_states, matC_last = _fw_states(matK, matV, g, matC0, vecN0, cfg)
    return vecM, g, matC_states, vecN_states, matC_last


def _fw_states_gated(matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg: CoreConfig):
    """``forward_states`` with ``gates_impl="kernel"``: the recurrent kernel computes m and the gate
    vectors chunk by chunk (``fw_recurrent.recurrent_fw_states_gated``); no XLA gate preparation."""
    p = cfg.params
    initial = (None, None, None) if cfg.zero_initial_state else (matC0, vecN0, scaM0)
    matC_states, vecN_states, matC_last, vecM, vecs = recurrent_fw_states_gated(
        matK, matV, vecI, vecLogF, *initial, params=p, interpret=cfg.interpret,
        states_dtype=_states_dtype(cfg, matK.dtype),
    )
    vecQlog, vecKlog, vecWinter, vecWstate, vecStart, vecReset, vecDecay = vecs
    g = gates.KernelGates(vecQlog, vecKlog, vecWinter, vecWstate, vecDecay,
                          gates.border_max_states(vecM, scaM0.astype(vecM.dtype), p.chunk_size_intra),
                          vecStart, vecReset, None)
    return vecM, g, matC_states, vecN_states, matC_last


def _kernel_gates(vecI, vecLogF, vecM, scaM0, cfg: CoreConfig) -> gates.KernelGates:
    """The kernel gate vectors by ``params.gates_impl`` (XLA or the Pallas row kernel)."""
    p = cfg.params
    if p.gates_impl in ("pallas", "fused"):  # "fused" in the backward: m is known, only the vectors
        return gate_kernels.gate_vectors(vecI, vecLogF, vecM, scaM0, params=p, interpret=cfg.interpret,
                                         max_state=cfg.max_state)
    return gates.kernel_gates(vecI, vecLogF, vecM, scaM0, p.chunk_size_intra)


def _states_dtype(cfg: CoreConfig, kernel_dtype):
    """The storage dtype of the C / dC border states: the 16-bit kernel dtype with ``states_bf16``."""
    if cfg.params.states_bf16 and jnp.dtype(kernel_dtype) != jnp.dtype(_F32):
        return jnp.dtype(kernel_dtype)
    return None


def _fw_states(matK, matV, g, matC0, vecN0, cfg: CoreConfig):
    """(matC_states, vecN_states, matC_last fp32) from the recurrent forward kernel."""
    sdt = _states_dtype(cfg, matK.dtype)
    if cfg.zero_initial_state:  # no initial state: the kernel starts from zeros (nothing to load)
        matC0 = vecN0 = None
    out = recurrent_fw_states(
        matK, matV, g.vecWstate, g.vecDecay, matC0, vecN0, params=cfg.params, interpret=cfg.interpret,
        states_dtype=sdt,
    )
    if sdt is None:
        return out[0], out[1], out[0][:, -1]
    return out


def chunkwise_backward(
    matQ: jax.Array,  # (BH, S, DHQK)
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV)
    vecI: jax.Array,  # (BH, S)
    vecLogF: jax.Array,  # (BH, S)
    matC0: jax.Array,  # (BH, DHQK, DHV)
    vecN0: jax.Array,  # (BH, DHQK)
    scaM0: jax.Array,  # (BH,)
    vecM: jax.Array,  # (BH, S)
    vecNq: jax.Array,  # (BH, S)
    matH: jax.Array | None,  # (BH, S, DHV), needed for grad_mode="exact"
    matC_states: jax.Array | None,  # (BH, NC+1, DHQK, DHV); None: recompute
    vecN_states: jax.Array | None,  # (BH, NC+1, DHQK)
    matDH: jax.Array,  # (BH, S, DHV)
    matDC_last: jax.Array,  # (BH, DHQK, DHV)
    vecDN_last: jax.Array,  # (BH, DHQK)
    scaDM_last: jax.Array,  # (BH,)
    cfg: CoreConfig,
    matC_last_kept: jax.Array | None = None,  # (BH, DHQK, DHV) fp32 last state (16-bit kept states)
    gates_kept: gates.KernelGates | None = None,  # the forward's gate vectors (``save_gates``)
    bw_fns: dict | None = None,
):
    """The backward pass: (dQ, dK, dV, dI, dLogF, dC0, dN0, dM0) on padded, flattened arrays.

    With kept states, ``matC_last_kept`` is the fp32 last state (default: ``matC_states[:, -1]``);
    ``gates_kept`` replaces the recomputation of the gate vectors. ``bw_fns``: other kernels (the
    Mosaic family's) in place of Triton ones, by name: ``"dv"`` called as ``fn(matQ, matK, matDH,
    vecQlog, vecKlog, vecWstate, vecDenInv, vecStart, matDC_states) -> matDV`` instead of
    ``parallel_bw_dv``, ``"dk"`` as ``fn(matQ, matK, matV, matDH, vecQlog, vecKlog, vecWstate,
    vecDenInv, vecDnq, vecStart, matDC_states, vecDN_states) -> (matDK, vecDkk, vecDkkState)``
    instead of ``parallel_bw_dk`` (neither with ``fuse_dkdv``), ``"dq"`` as ``fn(matQ, matK, matV,
    matDH, vecQlog, vecKlog, vecWinter, vecDenInv, vecDnq, vecStart, matC_states, vecN_states) ->
    (matDQ, vecDqq)`` instead of ``parallel_bw_dq``; ``"dqdk"`` (instead of both "dq" and "dk")
    as ``fn(dq_args, dk_args) -> (matDQ, vecDqq, matDK, vecDkk, vecDkkState)`` with the two
    argument tuples above, for kernels that share work between dQ and dK.
    """
    p = cfg.params
    bw_fns = dict(bw_fns or {})
    unknown = sorted(set(bw_fns) - {"dk", "dq", "dv", "dqdk"})
    if unknown:
        raise ValueError(f"bw_fns: unknown kernel name(s) {unknown}; known: ['dk', 'dq', 'dqdk', 'dv']")
    if "dqdk" in bw_fns and ("dq" in bw_fns or "dk" in bw_fns or p.fuse_dkdv):
        raise ValueError("bw_fns: 'dqdk' (dQ and dK from one function) excludes 'dq', 'dk' and fuse_dkdv")
    if p.fuse_dkdv and ("dk" in bw_fns or "dv" in bw_fns):
        raise ValueError("fuse_dkdv computes dK and dV in the fused Triton kernel: it takes no other dK or dV kernel")
    exact = cfg.grad_mode == "exact"
    dtype = matQ.dtype
    g = _kernel_gates(vecI, vecLogF, vecM, scaM0, cfg) if gates_kept is None else gates_kept
    if matC_states is None:
        matC_states, vecN_states, matC_last = _fw_states(matK, matV, g, matC0, vecN0, cfg)
    else:
        matC_last = matC_states[:, -1].astype(_F32) if matC_last_kept is None else matC_last_kept
    if exact:
        vecDhh = jnp.sum(matDH.astype(_F32) * matH.astype(_F32), axis=-1)
    else:
        vecDhh = jnp.zeros_like(vecNq)
    vecDenInv, vecDnq, vecDm = gates.normalizer_cotangents(
        vecDhh, vecNq, vecM, eps=cfg.eps, norm_val=cfg.norm_val,
        stabilize_correctly=cfg.stabilize_correctly, exact=exact,
    )
    matDH = matDH.astype(dtype)
    kw = dict(params=p, qk_scale=cfg.qk_scale, interpret=cfg.interpret)
    sdt = _states_dtype(cfg, dtype)
    fused_decay = p.gate_grads_impl in ("pallas", "fused")  # the decay terms from the recurrent bw kernel
    bw = recurrent_bw_states(
        matQ, matDH, g.vecWinter, vecDenInv, vecDnq, g.vecDecay,
        matDC_last.astype(_F32), vecDN_last.astype(_F32), **kw, states_dtype=sdt,
        matC_states=matC_states if fused_decay else None, vecN_states=vecN_states if fused_decay else None,
    )
    matDC_states, vecDN_states = bw[0], bw[1]
    matDC0 = bw[2] if sdt is not None else matDC_states[:, 0]
    dq_args = (matQ, matK, matV, matDH, g.vecQlog, g.vecKlog, g.vecWinter, vecDenInv, vecDnq, g.vecStart,
               matC_states, vecN_states)
    dk_args = (matQ, matK, matV, matDH, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, vecDnq, g.vecStart,
               matDC_states, vecDN_states)
    if "dqdk" in bw_fns:
        matDQ, vecDqq, matDK, vecDkk, vecDkkState = bw_fns["dqdk"](dq_args, dk_args)
    elif "dq" in bw_fns:
        matDQ, vecDqq = bw_fns["dq"](*dq_args)
    else:
        matDQ, vecDqq = parallel_bw_dq(*dq_args, output_dtype=dtype, **kw)
    if p.fuse_dkdv:  # one kernel for dK and dV
        matDK, vecDkk, vecDkkState, matDV = parallel_bw_dkdv(
            matQ, matK, matV, matDH, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, vecDnq, g.vecStart,
            matDC_states, vecDN_states, output_dtype=dtype, **kw,
        )
    else:
        if "dk" in bw_fns:
            matDK, vecDkk, vecDkkState = bw_fns["dk"](*dk_args)
        elif "dqdk" not in bw_fns:  # (with "dqdk" dK came with dQ above)
            matDK, vecDkk, vecDkkState = parallel_bw_dk(*dk_args, output_dtype=dtype, **kw)
        dv_args = (matQ, matK, matDH, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, g.vecStart, matDC_states)
        if "dv" in bw_fns:
            matDV = bw_fns["dv"](*dv_args)
        else:
            matDV = parallel_bw_dv(*dv_args, output_dtype=dtype, **kw)
    vecN_last = vecN_states[:, -1]
    scaDlast = jnp.sum(matDC_last * matC_last, axis=(1, 2)) + jnp.sum(vecDN_last * vecN_last, axis=1)
    vecDN0 = vecDN_states[:, 0]
    scaDM0 = jnp.sum(matDC0 * matC0, axis=(1, 2)) + jnp.sum(vecDN0 * vecN0, axis=1)
    # exact gradients of the exponential cell: the cotangents of every m_t are pulled back through
    # the m recurrence (the last m's own cotangent joins the last step's)
    pull = exact and cfg.max_state
    vecDM = vecDm.at[:, -1].add(scaDM_last - scaDlast) if pull else None
    # <dC_k, decay_k C_{k-1}> + <dn_k, decay_k n_{k-1}>: from the recurrent backward kernel, or XLA
    scaDdecay = bw[-1] if fused_decay else _decay_terms(g, matDC_states, matC_states, vecDN_states, vecN_states, p)
    if p.gate_grads_impl == "fused" and pull:  # gate gradients and pull-back in the serial row kernel
        vecDI, vecDLogF, dM0_m = gate_kernels.fused_gate_gradients(
            vecI, vecLogF, vecM, scaM0, vecDM, vecDqq, vecDkk, vecDkkState, scaDdecay, g.vecReset,
            params=p, interpret=cfg.interpret,
        )
    elif p.gate_grads_impl == "kernel":  # gate gradients and pull-back in one scanned launch
        vecSel = gates.max_state_selection(vecI, vecLogF, scaM0, vecM) if pull else None
        vecDI, vecDLogF, dM0_m = gate_kernels.gate_gradients_scanned(
            vecDqq, vecDkk, vecDkkState, scaDdecay, g.vecReset, vecSel, vecDM, params=p, interpret=cfg.interpret)
    else:
        if fused_decay:
            vecDI, vecDLogF = gate_kernels.gate_gradients(
                vecDqq, vecDkk, vecDkkState, scaDdecay, g.vecReset, params=p, interpret=cfg.interpret
            )
        else:
            vecDI, vecDLogF = gates.gate_gradients(
                vecDqq, vecDkk, vecDkkState, scaDdecay, g.vecReset, p.chunk_size_intra
            )
        dM0_m = 0.0
        if pull:  # one linear scan of the recurrence from the forward's m (no recomputed m scan)
            dI_m, dLogF_m, dM0_m = gates.max_state_pullback_recurrent(vecI, vecLogF, scaM0, vecM, vecDM)
            vecDI, vecDLogF = vecDI + dI_m, vecDLogF + dLogF_m
    # the sigmoid cell: m == 0 is a constant, m0 enters nothing
    scaDM0 = scaDM0 + dM0_m if cfg.max_state else jnp.zeros_like(scaDM0)
    return matDQ, matDK, matDV, vecDI, vecDLogF, matDC0, vecDN0, scaDM0


def _decay_terms(g, matDC_states, matC_states, vecDN_states, vecN_states, p) -> jax.Array:
    """(BH, NC): <dC_k, decay_k C_{k-1}> + <dn_k, decay_k n_{k-1}> for every chunk k (one XLA pass
    over the states)."""
    return gates.chunk_decays(g.vecDecay, p.chunk_size_intra, matDC_states.shape[1] - 1) * (
        jnp.einsum("bkij,bkij->bk", matDC_states[:, 1:].astype(_F32), matC_states[:, :-1].astype(_F32),
                   precision=jax.lax.Precision.HIGHEST)
        + jnp.einsum("bki,bki->bk", vecDN_states[:, 1:], vecN_states[:, :-1], precision=jax.lax.Precision.HIGHEST)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _core(matQ, matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg: CoreConfig):
    out = chunkwise_forward(matQ, matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg)
    return out.matH, out.matC_last, out.vecN_states[:, -1], out.scaM_borders[:, -1]


def forward_residuals(primals: tuple, out: ForwardOut, cfg: CoreConfig) -> tuple:
    """What the backward pass keeps of a forward pass: the eight ``primals`` (matQ ... scaM0),
    vecM, vecNq, h (``grad_mode="exact"`` only), unless ``recompute_states_in_bw`` the border
    states, and with ``save_gates`` the gate vectors (``out.gates``; None: recomputed); the residuals
    of ``backward_from_residuals`` (also used by the Mosaic GPU family)."""
    keep_states = not cfg.recompute_states_in_bw
    return tuple(primals) + (
        out.vecM, out.vecNq,
        out.matH if cfg.grad_mode == "exact" else None,
        out.matC_states if keep_states else None,
        out.vecN_states if keep_states else None,
        out.matC_last if keep_states else None,
        out.gates if keep_gates(cfg) else None,
    )


def keep_gates(cfg: CoreConfig) -> bool:
    """Whether the forward's gate vectors are residuals: with ``save_gates``, and with the gates
    computed in the recurrent kernel (``gates_impl="kernel"``, exponential cell: the backward pass
    would otherwise recompute them in XLA)."""
    p = cfg.params
    return p.save_gates or (p.gates_impl == "kernel" and cfg.max_state)


def backward_from_residuals(cfg: CoreConfig, res: tuple, cts: tuple, bw_fns: dict | None = None) -> tuple:
    """The custom-VJP backward: cotangents of (h, C_last, n_last, m_last) and the residuals of
    ``forward_residuals`` -> the cotangents of the eight primals, in their dtypes (``bw_fns`` as in
    ``chunkwise_backward``)."""
    matDH, matDC_last, vecDN_last, scaDM_last = cts
    grads = chunkwise_backward(*res[:-2], matDH, matDC_last, vecDN_last, scaDM_last, cfg,
                               matC_last_kept=res[-2], gates_kept=res[-1], bw_fns=bw_fns)
    primals = res[:8]
    return tuple(gr.astype(x.dtype) for gr, x in zip(grads, primals))


def _core_fwd(matQ, matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg: CoreConfig):
    out = chunkwise_forward(matQ, matK, matV, vecI, vecLogF, matC0, vecN0, scaM0, cfg)
    res = forward_residuals((matQ, matK, matV, vecI, vecLogF, matC0, vecN0, scaM0), out, cfg)
    prim = (out.matH, out.matC_last, out.vecN_states[:, -1], out.scaM_borders[:, -1])
    return prim, res


_core_bwd = backward_from_residuals


_core.defvjp(_core_fwd, _core_bwd)


class Prepared(NamedTuple):
    """Inputs cast, flattened and padded for the kernels, plus what is needed to undo it."""

    arrays: tuple  # (matQ, matK, matV, vecI, vecLogF, matC0, vecN0, scaM0)
    B: int
    NH: int
    S: int
    DHQK: int
    DHV: int
    kernel_dtype: jnp.dtype
    params: ChunkwiseKernelParams
    call: SequenceCall
    call_options: dict | None = None  # tunable keyword options (``tuning.CALL_OPTION_DEFAULTS``), resolved

    @property
    def qk_scale(self) -> float:
        """The effective query scale."""
        return self.call.qk_scale


def kernel_dtype_of(autocast_kernel_dtype, q_dtype) -> jnp.dtype:
    """The kernel dtype: ``autocast_kernel_dtype`` (a dtype or its name) or q's; float64 -> float32.

    ``ValueError`` unless it is float32, bfloat16 or float16 (or float64).
    """
    dt = floating_dtype("autocast_kernel_dtype", autocast_kernel_dtype)
    dt = jnp.dtype(q_dtype) if dt is None else dt
    if dt == jnp.float64:
        dt = jnp.dtype(jnp.float32)
    if dt not in KERNEL_DTYPES:
        raise ValueError(
            f"autocast_kernel_dtype must be one of float32, bfloat16, float16 (or float64, run in "
            f"float32); got {autocast_kernel_dtype!r} (inputs {jnp.dtype(q_dtype).name})"
        )
    return dt


def dtype_name(dtype) -> str | None:
    """The name of a dtype given as a name, a numpy/JAX dtype or scalar type; None if not a dtype."""
    if isinstance(dtype, str):
        return dtype
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[-1] = (0, size - x.shape[-1])
    return jnp.pad(x, pad)


def prepare(
    call: SequenceCall, matQ, matK, matV, *, chunk_size, autocast_kernel_dtype, tile_params: dict,
    call_options: dict | None = None, tuned: bool | None = False,
) -> Prepared:
    """Pick the kernel dtype and parameters, cast, flatten and pad (differentiable).

    ``call`` is the validated call (``validation.validate_sequence_call``) with B * NH > 0. The
    parameters come from ``tuning.resolve_kernel_params`` (explicit > tuned tables > heuristics;
    ``tuned=False``: explicit > heuristics).
    """
    vecI, vecF, state0 = call.vecI, call.vecF, call.state
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    kd = kernel_dtype_of(autocast_kernel_dtype, matQ.dtype)
    res = tuning.resolve_kernel_params(
        B=B, NH=NH, S=S, DHQK=DHQK, DHV=DHV, dtype=kd, grad_mode=call.options.grad_mode,
        chunk_size=chunk_size, tile_params=tile_params, call_options=call_options, tuned=tuned,
    )
    params = res.params
    L = params.chunk_size_intra
    S_pad = -(-S // L) * L
    DHQKp, DHVp = padded_head_dim(DHQK), padded_head_dim(DHV)
    BH = B * NH

    def seq(x, D, Dp):
        x = x.astype(kd).reshape(BH, S, D)
        return _pad_last(gates.pad_time(x, S_pad, 0.0), Dp)

    q, k = seq(matQ, DHQK, DHQKp), seq(matK, DHQK, DHQKp)
    v = seq(matV, DHV, DHVp)
    i = gates.pad_time(vecI.astype(_F32).reshape(BH, S), S_pad, gates.CLOSED_INPUT_GATE)
    logf = gates.pad_time(gates.log_forget_gate(vecF).astype(_F32).reshape(BH, S), S_pad, 0.0)
    if state0 is None:
        C0 = jnp.zeros((BH, DHQKp, DHVp), _F32)
        n0 = jnp.zeros((BH, DHQKp), _F32)
        m0 = jnp.zeros((BH,), _F32)
    else:
        C0 = state0.matC.astype(_F32).reshape(BH, DHQK, DHV)
        C0 = _pad_last(jnp.pad(C0, ((0, 0), (0, DHQKp - DHQK), (0, 0))), DHVp)
        n0 = _pad_last(state0.vecN.astype(_F32).reshape(BH, DHQK), DHQKp)
        m0 = state0.scaM.astype(_F32).reshape(BH)
    return Prepared((q, k, v, i, logf, C0, n0, m0), B, NH, S, DHQK, DHV, kd, params, call, res.call_options)


def resolve_interpret(interpret: bool | None) -> bool:
    """``None``: compile on an NVIDIA GPU, interpret elsewhere."""
    return _triton.default_interpret(interpret)


def h_kernel_dtype(output_dtype, q_dtype) -> jnp.dtype:
    """The dtype the kernel writes h in (the requested output dtype if the kernel can write it).

    ``ValueError`` unless ``output_dtype`` is None or a floating dtype.
    """
    dt = floating_dtype("output_dtype", output_dtype)
    dt = jnp.dtype(q_dtype) if dt is None else dt
    return dt if dt in KERNEL_DTYPES else jnp.dtype(_F32)


def core_config(prep: Prepared, *, h_dtype, recompute_states_in_bw: bool, interpret) -> CoreConfig:
    """The static configuration of ``_core`` from a prepared call and its cell options."""
    opts = prep.call.options
    return CoreConfig(
        params=prep.params, qk_scale=float(prep.qk_scale), eps=opts.eps, norm_val=opts.norm_val,
        stabilize_correctly=opts.stabilize_correctly, grad_mode=opts.grad_mode, h_dtype=jnp.dtype(h_dtype),
        recompute_states_in_bw=bool(recompute_states_in_bw), interpret=resolve_interpret(interpret),
        max_state=opts.max_state,
        zero_initial_state=prep.call.state is None,
    )


def mlstm_chunkwise_pallas(
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
    chunk_size: int | None = None,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    siz_b_DHQK_inter: int | None = None,
    siz_b_DHV_inter: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    autocast_kernel_dtype=None,
    output_dtype=None,
    recompute_states_in_bw: bool | None = None,
    tuned: bool | None = None,
    interpret: bool | None = None,
    m_scan: str | None = None,
    gates_impl: str | None = None,
    gate_grads_impl: str | None = None,
    states_bf16: bool | None = None,
    save_gates: bool | None = None,
    fuse_dkdv: bool | None = None,
):
    """Chunkwise mLSTM with the Pallas TFLA kernels, differentiable (``jax.custom_vjp``).

    The cell options come as the flat keywords or as ``cell_options`` (``CellOptions``); inputs are
    validated by ``validation.validate_sequence_call``; B == 0 or NH == 0 gives empty outputs.

    Any S (padded internally), DHQK != DHV, head dims padded to powers of two >= 16. Returns ``h``
    (B, NH, S, DHV) in ``output_dtype`` (default: the dtype of q); with ``return_last_states`` also
    ``MLSTMState(matC, vecN, scaM)`` in float32 (m0 = 0 convention without initial states).
    Gradients flow to q, k, v, i, f and the initial states: exact by default, the TFLA convention
    (denominator and m constant) with ``grad_mode="tfla"``. ``chunk_size`` is the target intra
    chunk (``chunk_size_intra`` wins if both are given); tile and launch parameters default to
    ``heuristics.chunkwise_kernel_params``. ``recompute_states_in_bw`` recomputes the chunk-border
    states in the backward pass instead of keeping them from the forward pass (None: the tuned
    table's choice, else True). Parameters not given come from the tuned tables of ``tuning`` for
    this device and shape, else the heuristics; ``tuned=False`` (or ``XLSTM_JAX_TUNING=off``) skips
    the tables (lookup at trace time, pure Python; see ``tuning``). ``interpret``:
    None compiles on an NVIDIA GPU and interprets elsewhere. ``m_scan``, ``gates_impl``,
    ``gate_grads_impl``, ``states_bf16``, ``save_gates``, ``fuse_dkdv`` select the variant paths of
    ``heuristics.VARIANT_CHOICES`` (None: the tuned table's choice, else the default, today's path).
    """
    tile_params = dict(
        chunk_size_inter=chunk_size_inter, chunk_size_intra=chunk_size_intra,
        siz_b_L_parallel=siz_b_L_parallel, siz_b_L_loop=siz_b_L_loop,
        siz_b_DH_parallel=siz_b_DH_parallel, siz_b_DH_loop=siz_b_DH_loop,
        siz_b_DHQK_inter=siz_b_DHQK_inter, siz_b_DHV_inter=siz_b_DHV_inter,
        num_warps_intra=num_warps_intra, num_warps_inter=num_warps_inter,
        num_stages_intra=num_stages_intra, num_stages_inter=num_stages_inter,
        m_scan=m_scan, gates_impl=gates_impl, gate_grads_impl=gate_grads_impl, states_bf16=states_bf16,
        save_gates=save_gates, fuse_dkdv=fuse_dkdv,
    )
    call = validate_sequence_call(
        "chunkwise_pallas", matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial,
        segment_ids=segment_ids, cell_options=cell_options, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    h_dtype = h_kernel_dtype(output_dtype, matQ.dtype)
    out_dtype = jnp.dtype(matQ.dtype if output_dtype is None else output_dtype)
    kernel_dtype_of(autocast_kernel_dtype, matQ.dtype)  # validated even for empty calls
    if call.empty:
        return empty_sequence_outputs(
            call, h_dtype=out_dtype, state_dtype=_F32, return_last_states=return_last_states
        )
    prep = prepare(
        call, matQ, matK, matV, chunk_size=chunk_size, autocast_kernel_dtype=autocast_kernel_dtype,
        tile_params=tile_params, call_options=dict(recompute_states_in_bw=recompute_states_in_bw),
        tuned=tuning.tuning_enabled(tuned),
    )
    cfg = core_config(prep, h_dtype=h_dtype, recompute_states_in_bw=prep.call_options["recompute_states_in_bw"],
                      interpret=interpret)
    matH, matC_last, vecN_last, scaM_last = _core(*prep.arrays, cfg)
    B, NH, S, DHQK, DHV = prep.B, prep.NH, prep.S, prep.DHQK, prep.DHV
    h = matH[:, :S, :DHV].reshape(B, NH, S, DHV).astype(out_dtype)
    if not return_last_states:
        return h
    state = MLSTMState(
        matC_last[:, :DHQK, :DHV].reshape(B, NH, DHQK, DHV),
        vecN_last[:, :DHQK].reshape(B, NH, DHQK),
        scaM_last.reshape(B, NH),
    )
    return h, state
