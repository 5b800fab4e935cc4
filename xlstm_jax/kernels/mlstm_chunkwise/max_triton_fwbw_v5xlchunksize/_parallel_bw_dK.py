"""Backward parallel kernel stage for dK (thin over ``..seed_compat.parallel_bw_stage``,
the one implementation of the dQ, dK and dV stages; notation there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..seed_compat import parallel_bw_stage


def mlstm_chunkwise__parallel_bw_dK(
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
    *,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    vecDeltaN_states: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK)
) -> jax.Array:  # matDeltaK (B, NH, S, DHQK)
    """Computes only the deltaK gradients for the backward pass (dK, shape (B, NH, S, DHQK)).

    chunk parallel size: siz_b_LKV; chunk loop size: siz_b_LQ; head dim parallel size: siz_b_DHQK;
    head dim loop size: siz_b_DHHV. TFLA convention unless ``vecDeltaNq`` (the cotangent of q.n,
    (B, NH, S)) and ``vecDeltaN_states`` (the n-state cotangents, (B, NH, (NC+1)*DHQK)) are given.
    """
    return parallel_bw_stage(
        "dK", matQ, matK, matV, vecI, vecA, vecB, matC_all, vecN_all, scaM_all, vecN_out, vecM_out,
        matDeltaH, matDeltaC_states, qk_scale=qk_scale, chunk_size=chunk_size, siz_b_LQ=siz_b_LQ,
        siz_b_LKV=siz_b_LKV, siz_b_DHQK=siz_b_DHQK, siz_b_DHHV=siz_b_DHHV, num_warps=num_warps,
        num_stages=num_stages, eps=eps, output_dtype=output_dtype, vecDeltaNq=vecDeltaNq, vecDeltaN_states=vecDeltaN_states,
    )
