"""Backward recurrent kernel stage: cotangents of the chunk-border states (thin over
``..seed_compat``, which calls ``pallas.bw_recurrent``)."""

from __future__ import annotations

import jax

from ..seed_compat import recurrent_bw_dC


def mlstm_chunkwise__recurrent_bw_dC(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    vecF: jax.Array,  # (B, NH, S)
    scaM_inter: jax.Array,  # (B, NH, NC+1)
    vecM_combine: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHHV)
    vecN_out: jax.Array,  # (B, NH, S)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    save_states_every_nth_chunk: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    *,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV): the cotangents of the border C states.

    The TFLA convention (dnum = dH / (vecN_out + eps), the normalizer constant) unless
    ``vecDeltaNq`` (the cotangent of q.n) or ``vecDeltaN_last`` are given; then the n-state
    cotangents (B, NH, (NC+1)*DHQK) are returned as well.
    """
    return recurrent_bw_dC(
        matQ, vecF, scaM_inter, vecM_combine, matDeltaH, vecN_out, matDeltaC_last,
        qk_scale=qk_scale, chunk_size=chunk_size,
        save_states_every_nth_chunk=save_states_every_nth_chunk, num_warps=num_warps,
        num_stages=num_stages, eps=eps, vecDeltaNq=vecDeltaNq, vecDeltaN_last=vecDeltaN_last,
    )
