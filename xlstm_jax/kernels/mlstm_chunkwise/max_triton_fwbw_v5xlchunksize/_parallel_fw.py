"""Forward parallel kernel stage: h from the chunk-border states (thin over ``..seed_compat``, which
calls ``pallas.fw_parallel``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..seed_compat import parallel_fw_H


def mlstm_chunkwise__parallel_fw_Hintra(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 1e-6,
    output_dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h (B, NH, S, DHHV), vecN_out (B, NH, S) and vecM_out (B, NH, S) of every step.

    chunk parallel size: siz_b_LQ; chunk loop size: siz_b_LKV; head dim parallel size: siz_b_DHHV;
    head dim loop size: siz_b_DHQK. The per-step m is recomputed from the border m's and the gates.
    """
    return parallel_fw_H(
        matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all, qk_scale=qk_scale,
        chunk_size=chunk_size, siz_b_LQ=siz_b_LQ, siz_b_LKV=siz_b_LKV, siz_b_DHQK=siz_b_DHQK,
        siz_b_DHHV=siz_b_DHHV, num_warps=num_warps, num_stages=num_stages, eps=eps,
        output_dtype=output_dtype,
    )
