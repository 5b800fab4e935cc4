"""Fused Pallas kernel for one mLSTM step (decoding): gate update, state update and output in one launch.

Notation: see ``xlstm_jax.kernels._common``. One step takes the state (matC (B, NH, DHQK, DHV),
vecN (B, NH, DHQK), scaM (B, NH)), the inputs vecQ, vecK (B, NH, DHQK), vecV (B, NH, DHV) and the
gate pre-activations scaI, scaF (B, NH), and returns h (B, NH, DHV) and the new state, with the
semantics of ``xlstm_jax.kernels.mlstm_recurrent.native.mlstm_recurrent_step``.

Layers: ``_kernel`` (the body of one program), ``_launch`` (tiles, grid, BlockSpecs, compiler params,
in-place aliasing of C), ``_wrapper`` (validation, dtypes, flattening and padding). Registered as the
step kernel ``"recurrent_pallas"`` (options ``block_dhqk``, ``block_dhv``, ``num_warps``,
``num_stages``, ``interpret``). ``recurrent_step_fw_pallas`` is the seed-004-style adapter (m, i, f
of shape (B, NH, 1)) for ``recurrent_sequence_fw(..., mlstm_step_fn=recurrent_step_fw_pallas)``.
"""

from __future__ import annotations

import jax

from ...registry import register_mlstm_step_kernel
from ._launch import StepTiling, choose_tiling
from ._wrapper import mlstm_recurrent_step_pallas, validate_step_inputs


def _squeeze_trailing_one(name: str, x: jax.Array, want: tuple[int, ...]) -> jax.Array:
    if tuple(getattr(x, "shape", ())) != want + (1,):
        raise ValueError(f"{name} must have shape {want + (1,)}; got {tuple(getattr(x, 'shape', ()))}")
    return x[..., 0]


def recurrent_step_fw_pallas(
    c: jax.Array,  # (B, NH, DHQK, DHV)
    n: jax.Array,  # (B, NH, DHQK)
    m: jax.Array,  # (B, NH, 1)
    q: jax.Array,  # (B, NH, DHQK)
    k: jax.Array,  # (B, NH, DHQK)
    v: jax.Array,  # (B, NH, DHV)
    i: jax.Array,  # (B, NH, 1)
    f: jax.Array,  # (B, NH, 1)
    eps: float = 1e-6,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Seed-004 signature (``recurrent_step_fw``) over the fused Pallas step.

    Returns h (B, NH, DHV) and the new states (c, n, m) with m of shape (B, NH, 1), in the states'
    dtypes. Shapes that do not match raise ``ValueError``.
    """
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape (B, NH, DHQK); got {tuple(getattr(q, 'shape', ()))}")
    BH = tuple(q.shape[:2])
    m2, i2, f2 = (_squeeze_trailing_one(name, x, BH) for name, x in (("m", m), ("i", i), ("f", f)))
    h, (c_new, n_new, m_new) = mlstm_recurrent_step_pallas(c, n, m2, q, k, v, i2, f2, eps=eps)
    return h, (c_new, n_new, m_new[..., None])


def _registered_step(
    matC, vecN, scaM, q, k, v, i, f, *, qk_scale=None, eps=1e-6, norm_val=1.0, stabilize_correctly=True,
    block_dhqk=None, block_dhv=None, num_warps=None, num_stages=None, interpret=None,
):
    return mlstm_recurrent_step_pallas(
        matC, vecN, scaM, q, k, v, i, f, qk_scale=qk_scale, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly, block_dhqk=block_dhqk, block_dhv=block_dhv,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret,
    )


register_mlstm_step_kernel(
    "recurrent_pallas",
    _registered_step,
    options={"block_dhqk": None, "block_dhv": None, "num_warps": None, "num_stages": None, "interpret": None},
    description="fused Pallas step (gates, state update in place, output in one launch), tiled over DHQK x DHV",
)

__all__ = [
    "StepTiling",
    "choose_tiling",
    "mlstm_recurrent_step_pallas",
    "recurrent_step_fw_pallas",
    "validate_step_inputs",
]
