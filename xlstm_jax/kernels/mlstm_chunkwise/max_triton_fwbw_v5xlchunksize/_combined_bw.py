"""The whole backward pass of the chunkwise (TFLA) mLSTM: gradients of every input.

Thin over ``xlstm_jax.kernels.mlstm_chunkwise.seed_compat`` (notation there).
"""

from __future__ import annotations

import jax

from ...chunking import validate_chunk_size
from ..seed_compat import backward_outputs


def mlstm_chunkwise_bw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    matC_all: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array | None = None,  # (B, NH, NC+1)
    vecN_out: jax.Array | None = None,  # (B, NH, S)
    vecM_out: jax.Array | None = None,  # (B, NH, S)
    matDeltaH: jax.Array | None = None,  # (B, NH, S, DHV)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    qk_scale: float | None = None,
    chunk_size: int = 128,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    eps: float = 0.0,
    *,
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
    scaDeltaM_last: jax.Array | None = None,  # (B, NH)
    grad_mode: str = "exact",
):
    """Execute the backward pass of the mLSTM chunkwise formulation.

    Returns (matDeltaQ, matDeltaK, matDeltaV, vecDeltaI, vecDeltaF, matDeltaC_initial,
    vecDeltaN_initial, scaDeltaM_initial) in the dtypes of the inputs; the initial-state gradients
    are None without initial states. ``grad_mode="exact"`` (default) is the exact gradient of the
    cell (through the normalizer and its lower bound), ``"tfla"`` the TFLA convention (denominator
    and m held constant). The forward quantities this needs (states, h, the signed normalizer, m)
    are recomputed by the kernels, so ``matC_all``, ``vecN_all``, ``scaM_all``, ``vecN_out`` and
    ``vecM_out`` are accepted for the seed's signature but not used (their shapes are checked). ``chunk_size`` is the intra chunk unless ``chunk_size_intra`` is given.
    """
    if chunk_size_intra is None:
        validate_chunk_size("chunk_size", chunk_size, pallas=True)
    return backward_outputs(
        matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
        matDeltaH=matDeltaH, matDeltaC_last=matDeltaC_last, vecDeltaN_last=vecDeltaN_last,
        scaDeltaM_last=scaDeltaM_last, qk_scale=qk_scale,
        unused_forward=dict(matC_all=matC_all, vecN_all=vecN_all, scaM_all=scaM_all, vecN_out=vecN_out,
                            vecM_out=vecM_out),
        tile_params=dict(
            chunk_size_inter=chunk_size_inter,
            chunk_size_intra=chunk_size if chunk_size_intra is None else chunk_size_intra,
            siz_b_L_parallel=siz_b_L_parallel, siz_b_L_loop=siz_b_L_loop,
            siz_b_DH_parallel=siz_b_DH_parallel, siz_b_DH_loop=siz_b_DH_loop,
            num_warps_intra=num_warps_intra, num_warps_inter=num_warps_inter,
            num_stages_intra=num_stages_intra, num_stages_inter=num_stages_inter,
        ),
        eps=eps, grad_mode=grad_mode,
    )
