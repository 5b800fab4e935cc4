"""Wrapper of the fused mLSTM step: validation, dtypes, flattening (B, NH) and padding of head dims.

Notation: see ``xlstm_jax.kernels._common``. The wrapper flattens (B, NH) into BNH, pads a head dim
that no usable power-of-two tile divides (see ``_launch.padded_dim``: 96 and 192 are *not* padded,
100 is padded to 112) with zeros, which leave h, n.q and C unchanged, calls the launcher and undoes
both. Padding copies the state, so it costs bandwidth: choose head dims with a power-of-two factor
of at least 16 for speed.

The step is forward-only (decoding): it defines no VJP, and ``jax.grad`` through it raises JAX's
``NotImplementedError`` ("JVP with aliasing not supported"); train with the sequence kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..._common import MLSTMState
from ...options import CellOptions
from ...pallas import _triton
from ...validation import StepCall, empty_step_outputs, validate_step_call
from ._launch import choose_tiling, launch_step

_STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float64))


def validate_step_inputs(
    matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF, *, cell_options: CellOptions | None = None, **flat_options
) -> StepCall:
    """The shared step validation (``validation.validate_step_call``: shapes, floating dtypes, cell
    options) plus this kernel's own rule: C and n share one of float32, bfloat16, float16, float64.
    Raises ``ValueError``; returns the validated ``StepCall``."""
    call = validate_step_call(
        "recurrent_pallas", matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF,
        cell_options=cell_options, **flat_options,
    )
    if jnp.dtype(matC.dtype) not in _STATE_DTYPES or vecN.dtype != matC.dtype:
        raise ValueError(
            f"recurrent_pallas: C and n must share one float dtype of {[str(d) for d in _STATE_DTYPES]}; "
            f"got C {matC.dtype}, n {vecN.dtype}"
        )
    return call


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def mlstm_recurrent_step_pallas(
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
    block_dhqk: int | None = None,
    block_dhv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, MLSTMState]:
    """One mLSTM step as one fused Pallas kernel (docs/design.md, section 1).

    The states keep their dtypes (float32 by default, bfloat16 to halve the bytes per step; C and n
    share one dtype, m may differ); all arithmetic runs in float32 (float64 for float64 states). The
    new C is written in place of the old one: inside a jitted loop, or with the old C donated, the
    step allocates no new C. Returns ``h`` (B, NH, DHV) in the states' dtype (as the pure-JAX step)
    and ``MLSTMState(matC, vecN, scaM)``.

    ``block_dhqk``/``block_dhv`` (powers of two), ``num_warps`` and ``num_stages`` override the tile
    heuristic of ``_launch.choose_tiling``; ``interpret=None`` compiles on an NVIDIA GPU and
    interprets elsewhere. The cell options come as the flat keywords or as ``cell_options``;
    ``grad_mode`` is accepted for the common signature and has no effect (no gradients). Bad shapes,
    dtypes or options raise ``ValueError``; B == 0 or NH == 0 gives empty outputs.
    """
    call = validate_step_inputs(
        matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF, cell_options=cell_options, qk_scale=qk_scale,
        eps=eps, norm_val=norm_val, stabilize_correctly=stabilize_correctly, grad_mode=grad_mode, input_gate=input_gate,
    )
    B, NH, DHQK, DHV = call.B, call.NH, call.DHQK, call.DHV
    opts = call.options
    qk_scale, eps, norm_val, stabilize_correctly = (
        opts.effective_qk_scale(DHQK), opts.eps, opts.norm_val, opts.stabilize_correctly
    )
    BNH = B * NH
    tiling = choose_tiling(
        max(BNH, 1), DHQK, DHV, block_dhqk=block_dhqk, block_dhv=block_dhv, num_warps=num_warps,
        num_stages=num_stages,
    )
    if call.empty:
        return empty_step_outputs(matC, vecN, scaM, vecV, matC.dtype)
    DHQK_p, DHV_p = tiling.DHQK_p, tiling.DHV_p
    if BNH * DHQK_p * DHV_p >= 2**31:
        raise ValueError(
            f"C {tuple(matC.shape)} (padded to {(BNH, DHQK_p, DHV_p)}) has 2**31 elements or more: the "
            "kernel indexes with int32; split the batch into smaller calls"
        )
    padded = (DHQK_p, DHV_p) != (DHQK, DHV)
    C = matC.reshape(BNH, DHQK, DHV)
    if padded:
        C = jnp.pad(C, ((0, 0), (0, DHQK_p - DHQK), (0, DHV_p - DHV)))
    n, q, k = (_pad_last(x.reshape(BNH, DHQK), DHQK_p) for x in (vecN, vecQ, vecK))
    v = _pad_last(vecV.reshape(BNH, DHV), DHV_p)
    m, i, f = (x.reshape(BNH) for x in (scaM, scaI, scaF))
    h, C, n, m = launch_step(
        C, n, m, q, k, v, i, f,
        tiling=tiling, h_dtype=matC.dtype, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, interpret=_triton.default_interpret(interpret),
        max_state=opts.max_state,
    )
    if padded:
        C = C[:, :DHQK, :DHV]
    h = h[:, :DHV].reshape(B, NH, DHV)
    return h, MLSTMState(C.reshape(B, NH, DHQK, DHV), n[:, :DHQK].reshape(B, NH, DHQK), m.reshape(B, NH))
