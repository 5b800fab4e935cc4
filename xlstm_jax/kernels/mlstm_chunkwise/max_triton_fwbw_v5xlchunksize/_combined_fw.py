"""The whole forward pass of the chunkwise (TFLA) mLSTM: recurrent _KERNEL, then parallel kernel.

The seed's signature over ``pallas.autodiff.chunkwise_forward`` (layouts from ``..seed_compat``,
notation there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...validation import floating_dtype, validate_sequence_call
from ..pallas import gates
from ..pallas.autodiff import chunkwise_forward, core_config, h_kernel_dtype, kernel_dtype_of, prepare
from ..pallas.heuristics import chunkwise_kernel_params
from ..seed_compat import empty, states_out, unflat_seq, unflat_vec

_KERNEL = "mlstm_chunkwise_fw"
_F32 = jnp.float32


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
    call = validate_sequence_call(
        _KERNEL, matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial, qk_scale=qk_scale, eps=eps
    )
    tile_params = dict(
        chunk_size_inter=chunk_size_inter, chunk_size_intra=chunk_size_intra,
        siz_b_L_parallel=siz_b_L_parallel, siz_b_L_loop=siz_b_L_loop,
        siz_b_DH_parallel=siz_b_DH_parallel, siz_b_DH_loop=siz_b_DH_loop,
        num_warps_intra=num_warps_intra, num_warps_inter=num_warps_inter,
        num_stages_intra=num_stages_intra, num_stages_inter=num_stages_inter,
    )
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    out_dtype = floating_dtype("output_dtype", output_dtype, allow_none=False)
    h_dtype = h_kernel_dtype(out_dtype, matQ.dtype)
    if call.empty:
        L = chunkwise_kernel_params(S=S, DHQK=DHQK, DHV=DHV, dtype=kernel_dtype_of(None, matQ.dtype),
                                    **tile_params).chunk_size_intra
        NC = -(-S // L)
        last = (empty((B, NH, DHQK, DHV)), empty((B, NH, DHQK)), empty((B, NH)))
        all_ = (empty((B, NH, (NC + 1) * DHQK, DHV)), empty((B, NH, (NC + 1) * DHQK)), empty((B, NH, NC + 1)))
        return (empty((B, NH, S, DHV), out_dtype), empty((B, NH, S)), empty((B, NH, S)),
                last if return_last_states else None, all_ if return_all_states else None)
    prep = prepare(call, matQ, matK, matV, chunk_size=None, autocast_kernel_dtype=matQ.dtype,
                   tile_params=tile_params)
    cfg = core_config(prep, h_dtype=h_dtype, recompute_states_in_bw=True, interpret=None)
    out = chunkwise_forward(*prep.arrays, cfg)
    opts = call.options
    lam = gates.normalizer_lower_bound(out.vecM, norm_val=opts.norm_val, stabilize_correctly=opts.stabilize_correctly)
    vecN_out = jnp.maximum(jnp.abs(out.vecNq), lam)
    matC_all, vecN_all = states_out(out.matC_states, out.vecN_states, B, NH, DHQK, DHV)
    scaM_all = out.scaM_borders.reshape(B, NH, -1)
    last = None
    if return_last_states:
        last = (matC_all[:, :, -DHQK:, :], vecN_all[:, :, -DHQK:], scaM_all[:, :, -1])
    return (
        unflat_seq(out.matH, B, NH, S, DHV).astype(out_dtype),
        unflat_vec(vecN_out, B, NH, S),
        unflat_vec(out.vecM, B, NH, S),
        last,
        (matC_all, vecN_all, scaM_all) if return_all_states else None,
    )
