"""Fused Pallas kernel for one mLSTM step (decoding): gate update, state update and output in one launch.

Notation: see ``xlstm_jax.kernels._common``. One step takes the state (matC (B, NH, DHQK, DHV),
vecN (B, NH, DHQK), scaM (B, NH)), the inputs vecQ, vecK (B, NH, DHQK), vecV (B, NH, DHV) and the
gate pre-activations scaI, scaF (B, NH), and returns h (B, NH, DHV) and the new state, with the
semantics of ``xlstm_jax.kernels.mlstm_recurrent.native.mlstm_recurrent_step``.

Layers: ``_kernel`` (the body of one program), ``_launch`` (tiles, grid, BlockSpecs, compiler params,
in-place aliasing of C), ``_wrapper`` (validation, dtypes, flattening and padding). Registered as the
step kernel ``"recurrent_pallas"`` (options ``block_dhqk``, ``block_dhv``, ``num_warps``,
``num_stages``, ``interpret``). The seed-004-style step (m, i, f of shape (B, NH, 1)) over it is
``backend.recurrent.seed_step_fn("recurrent_pallas")`` (the ``recurrent_triton`` backend).
"""

from __future__ import annotations

from ...registry import register_mlstm_step_kernel
from ._launch import StepTiling, choose_tiling
from ._wrapper import mlstm_recurrent_step_pallas, validate_step_inputs


register_mlstm_step_kernel(
    "recurrent_pallas",
    mlstm_recurrent_step_pallas,
    options={"block_dhqk": None, "block_dhv": None, "num_warps": None, "num_stages": None, "interpret": None},
    description="fused Pallas step (gates, state update in place, output in one launch), tiled over DHQK x DHV",
)

__all__ = [
    "StepTiling",
    "choose_tiling",
    "mlstm_recurrent_step_pallas",
    "validate_step_inputs",
]
