"""Backward parallel kernel stage for dV (thin over ``..seed_compat.parallel_bw_stage``,
the one implementation of the dQ, dK and dV stages; notation there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..seed_compat import parallel_bw_stage


def mlstm_chunkwise__parallel_bw_dV(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, NC, L)
    vecA: jax.Array,  # (B, NH, NC, L)
    vecB: jax.Array,  # (B, NH, NC, L)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    vecN_out: jax.Array,  # (B, NH, S)
    vecM_out: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHHV)
    matDeltaC_states: jax.Array,  # (B, NH, (NC+1) * DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    output_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:  # matDeltaV (B, NH, S, DHHV)
    """Computes only the deltaV gradients for the backward pass (the seed's docstring says "deltaK";
    this function computes dV, shape (B, NH, S, DHHV)). The other gradients are computed in the
    other (kernel) functions.

    This function defines the grid and block sizes for the kernel launch and calls the kernel.
    chunk parallel size:        siz_b_LKV
    chunk loop size:            siz_b_LQ
    head dim parallel size:     siz_b_DHHV
    head dim loop size:         siz_b_DHQK

    V enters neither the normalizer nor m: dV is the same in both gradient conventions.

    Args:
        matQ: Tensor containing the query vectors. Shape (B, NH, S, DHQK).
        matK: Tensor containing the key vectors. Shape (B, NH, S, DHQK).
        matV: Tensor containing the value vectors. Shape (B, NH, S, DHHV).
        vecI: Tensor containing the input gate pre-activations. Shape (B, NH, NC, L).
        vecA: Tensor containing the summed input and cumulative forget gate pre-activations. Shape (B, NH, NC, L).
        vecB: Tensor containing the cumulative forget gate pre-activations. Shape (B, NH, NC, L).
        matC_all: Tensor containing the C states at the chunk borders. Shape (B, NH, (NC+1) * DHQK, DHHV).
        vecN_all: Tensor containing the N states at the chunk borders. Shape (B, NH, (NC+1) * DHQK).
        scaM_all: Tensor containing the M states at the chunk borders. Shape (B, NH, (NC+1)).
        vecN_out: Tensor containing the normalizer output N. Shape (B, NH, S).
        vecM_out: Tensor containing the max state M. Shape (B, NH, S).
        matDeltaH: Tensor containing the incoming H gradients. Shape (B, NH, S, DHHV).
        matDeltaC_states: Tensor containing the incoming C gradients. Shape (B, NH, (NC+1) * DHQK, DHHV).
        qk_scale: Scaling factor for the QK matrix. Defaults to None (DHQK**-0.5).
        chunk_size: Chunk size. Defaults to 64.
        siz_b_LQ: Block size for the chunk dimension LQ. Defaults to 32.
        siz_b_LKV: Block size for the chunk dimension LKV. Defaults to 32.
        siz_b_DHQK: Block size for the head dimension DHQK. Defaults to None.
        siz_b_DHHV: Block size for the head dimension DHHV. Defaults to None.
        num_warps: Number of warps. Defaults to None.
        num_stages: Number of stages. Defaults to None.
        eps: Epsilon value. Defaults to 0.0.
        output_dtype: Output data type. Defaults to jnp.float32.

    Returns:
        Tensor containing the V gradients. Shape (B, NH, S, DHHV).
    """
    return parallel_bw_stage(
        "dV", matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out,
        matDeltaH, matDeltaC_states, qk_scale=qk_scale, chunk_size=chunk_size, siz_b_LQ=siz_b_LQ,
        siz_b_LKV=siz_b_LKV, siz_b_DHQK=siz_b_DHQK, siz_b_DHHV=siz_b_DHHV, num_warps=num_warps,
        num_stages=num_stages, eps=eps, output_dtype=output_dtype,
    )
