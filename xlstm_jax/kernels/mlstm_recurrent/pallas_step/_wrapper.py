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

from ..._common import MLSTMState, validate_options
from ...pallas import _triton
from ._launch import choose_tiling, launch_step

_STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float64))


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else repr(x)


def validate_step_inputs(matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF) -> tuple[int, int, int, int]:
    """Check the shapes and dtypes of one step; return (B, NH, DHQK, DHV). Raises ``ValueError``."""
    shapes = (
        f"C {_shape(matC)}, n {_shape(vecN)}, m {_shape(scaM)}, q {_shape(vecQ)}, k {_shape(vecK)}, "
        f"v {_shape(vecV)}, i {_shape(scaI)}, f {_shape(scaF)}"
    )
    if getattr(vecQ, "ndim", None) != 3 or getattr(vecV, "ndim", None) != 3:
        raise ValueError(f"q must have shape (B, NH, DHQK) and v (B, NH, DHV); got {shapes}")
    B, NH, DHQK = vecQ.shape
    DHV = vecV.shape[2]
    want = {
        "C": (matC, (B, NH, DHQK, DHV)), "n": (vecN, (B, NH, DHQK)), "m": (scaM, (B, NH)),
        "k": (vecK, (B, NH, DHQK)), "v": (vecV, (B, NH, DHV)), "i": (scaI, (B, NH)), "f": (scaF, (B, NH)),
    }
    bad = [f"{name} {_shape(x)} (expected {shape})" for name, (x, shape) in want.items()
           if tuple(getattr(x, "shape", ())) != shape]
    if bad:
        raise ValueError(f"mLSTM step shape mismatch: {', '.join(bad)}; got {shapes}")
    if min(B, NH, DHQK, DHV) < 1:
        raise ValueError(f"empty batch, head or head dimension; got {shapes}")
    if jnp.dtype(matC.dtype) not in _STATE_DTYPES or vecN.dtype != matC.dtype:
        raise ValueError(
            f"C and n must share one float dtype of {[str(d) for d in _STATE_DTYPES]}; "
            f"got C {matC.dtype}, n {vecN.dtype}"
        )
    for name, x in (("m", scaM), ("q", vecQ), ("k", vecK), ("v", vecV), ("i", scaI), ("f", scaF)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array; got {x.dtype}")
    return B, NH, DHQK, DHV


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
    block_dhqk: int | None = None,
    block_dhv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, MLSTMState]:
    """One mLSTM step as one fused Pallas kernel (DESIGN.md section 1).

    The states keep their dtypes (float32 by default, bfloat16 to halve the bytes per step; C and n
    share one dtype, m may differ); all arithmetic runs in float32 (float64 for float64 states). The
    new C is written in place of the old one: inside a jitted loop, or with the old C donated, the
    step allocates no new C. Returns ``h`` (B, NH, DHV) in the states' dtype (as the pure-JAX step)
    and ``MLSTMState(matC, vecN, scaM)``.

    ``block_dhqk``/``block_dhv`` (powers of two), ``num_warps`` and ``num_stages`` override the tile
    heuristic of ``_launch.choose_tiling``; ``interpret=None`` compiles on an NVIDIA GPU and
    interprets elsewhere. Bad shapes, dtypes or options raise ``ValueError``.
    """
    B, NH, DHQK, DHV = validate_step_inputs(matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF)
    qk_scale = validate_options(eps=eps, norm_val=norm_val, grad_mode="exact", qk_scale=qk_scale, DHQK=DHQK)
    BNH = B * NH
    tiling = choose_tiling(
        BNH, DHQK, DHV, block_dhqk=block_dhqk, block_dhv=block_dhv, num_warps=num_warps, num_stages=num_stages
    )
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
    )
    if padded:
        C = C[:, :DHQK, :DHV]
    h = h[:, :DHV].reshape(B, NH, DHV)
    return h, MLSTMState(C.reshape(B, NH, DHQK, DHV), n[:, :DHQK].reshape(B, NH, DHQK), m.reshape(B, NH))
