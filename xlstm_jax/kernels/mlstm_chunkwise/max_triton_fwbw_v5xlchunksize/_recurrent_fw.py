"""Forward recurrent kernel stage: the chunk-border states (thin over ``..seed_compat``, which calls
``pallas.fw_recurrent``)."""

from __future__ import annotations

import jax

from ..seed_compat import recurrent_fw_C


def mlstm_chunkwise__recurrent_fw_C(
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecF: jax.Array,  # (B, NH, S)
    vecI: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaMinter_initial: jax.Array | None = None,  # (B, NH)
    chunk_size: int = 64,
    num_stages: int | None = None,
    num_warps: int | None = None,
    save_states_every_nth_chunk: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The states (C, n, m) at every ``chunk_size * save_states_every_nth_chunk`` steps.

    Returns matC_states (B, NH, (NC+1)*DHQK, DHV), vecN_states (B, NH, (NC+1)*DHQK) and
    scaMinter_states (B, NH, NC+1), float32, index 0 the initial state (zeros, m = 0 if None).
    The kernel folds ``chunk_size`` steps into the state per matrix product.
    """
    return recurrent_fw_C(
        matK, matV, vecF, vecI, matC_initial, vecN_initial, scaMinter_initial,
        chunk_size=chunk_size, save_states_every_nth_chunk=save_states_every_nth_chunk,
        num_warps=num_warps, num_stages=num_stages,
    )
