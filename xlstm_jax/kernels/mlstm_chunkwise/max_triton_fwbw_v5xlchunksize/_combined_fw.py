"""The whole forward pass of the chunkwise (TFLA) mLSTM: recurrent kernel, then parallel kernel.

Thin over ``xlstm_jax.kernels.mlstm_chunkwise.seed_compat`` (notation there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..seed_compat import forward_outputs


def mlstm_chunkwise_fw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    qk_scale: float | None = None,
    return_last_states: bool = False,
    return_all_states: bool = False,
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
    output_dtype: jnp.dtype = jnp.float32,
    eps: float = 0.0,
):
    """Execute the forward pass of the mLSTM chunkwise formulation.

    The kernels compute in the dtype of matQ (cast by the caller; gates, states and accumulation
    in float32); any sequence length (padded internally). Parameters left at None take the
    defaults of ``pallas.heuristics.chunkwise_kernel_params``.

    Args:
        matQ: Tensor containing the queries. Shape (B, NH, S, DHQK).
        matK: Tensor containing the keys. Shape (B, NH, S, DHQK).
        matV: Tensor containing the values. Shape (B, NH, S, DHV).
        vecI: Tensor containing the input gate. Shape (B, NH, S).
        vecF: Tensor containing the forget gate. Shape (B, NH, S).
        matC_initial: Initial state of the C matrix. Shape (B, NH, DHQK, DHV). Defaults to None.
        vecN_initial: Initial state of the N vector. Shape (B, NH, DHQK). Defaults to None.
        scaM_initial: Initial state of the M scalar. Shape (B, NH). Defaults to None.
        qk_scale: Scaling factor for the QK matrix. Defaults to None and will be inferred (DHQK**-0.5).
        return_last_states: Whether to return the last states. Defaults to False.
        return_all_states: Whether to return all states. Defaults to False.
        chunk_size_inter: Chunk size for the kernel inter chunk (recurrent) kernel. Defaults to None.
        chunk_size_intra: Chunk size for the kernel intra chunk (parallel) kernel. Defaults to None.
        siz_b_L_parallel: Size of the parallel L dimension for the parallel kernel. Defaults to None.
        siz_b_L_loop: Size of the loop L dimension for the parallel kernel. Defaults to None.
        siz_b_DH_parallel: Size of the parallel DH dimension for the parallel kernel. Defaults to None.
        siz_b_DH_loop: Size of the loop DH dimension for the parallel kernel. Defaults to None.
        num_warps_intra: Number of warps for the intra chunk kernel. Defaults to None.
        num_warps_inter: Number of warps for the inter chunk kernel. Defaults to None.
        num_stages_intra: Number of stages for the intra chunk kernel. Defaults to None.
        num_stages_inter: Number of stages for the inter chunk kernel. Defaults to None.
        output_dtype: Data type for the output. Defaults to jnp.float32.
        eps: Small value to avoid division by zero. Defaults to 0.0.

    Returns:
        (matH_out (B, NH, S, DHV), vecN_out (B, NH, S) the normalizer max(|q.n|, exp(-m)),
        vecM_out (B, NH, S) the max state, last states (matC (B, NH, DHQK, DHV), vecN (B, NH, DHQK),
        scaM (B, NH)) or None, all states (matC_states (B, NH, (NC+1)*DHQK, DHV), vecN_states
        (B, NH, (NC+1)*DHQK), scaMinter_states (B, NH, NC+1)) or None).
    """
    return forward_outputs(
        matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
        qk_scale=qk_scale, return_last_states=return_last_states, return_all_states=return_all_states,
        tile_params=dict(
            chunk_size_inter=chunk_size_inter, chunk_size_intra=chunk_size_intra,
            siz_b_L_parallel=siz_b_L_parallel, siz_b_L_loop=siz_b_L_loop,
            siz_b_DH_parallel=siz_b_DH_parallel, siz_b_DH_loop=siz_b_DH_loop,
            num_warps_intra=num_warps_intra, num_warps_inter=num_warps_inter,
            num_stages_intra=num_stages_intra, num_stages_inter=num_stages_inter,
        ),
        output_dtype=output_dtype, eps=eps,
    )
