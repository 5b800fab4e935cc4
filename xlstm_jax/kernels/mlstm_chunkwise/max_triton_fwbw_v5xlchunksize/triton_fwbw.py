"""The differentiable chunkwise (TFLA, "xl chunk size") mLSTM and its generator (seed family v5).

Notation: see ``xlstm_jax.kernels._common``. Thin over the Pallas kernel family
``xlstm_jax.kernels.mlstm_chunkwise.pallas`` (through ``..seed_compat``, the same factory as seed
000): ``chunk_size`` is the step of the recurrent kernel (chunk_size_inter); the intra chunk of the
parallel kernels is max(chunk_size, 128), the "xl" layout of ``xlstm_jax.kernels.chunking`` (the
TFLA choice of large intra chunks). Gradients are exact (through the normalizer and its lower
bound); the TFLA convention is offered by the registry kernel ``chunkwise_pallas`` with
``grad_mode="tfla"``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..seed_compat import get_fwbw_kernel, make_fwbw, sequence_fwbw

_GENERATOR_OPTIONS = ("return_last_states", "recompute_states_in_bw", "chunk_size", "eps")


def _mlstm_chunkwise_fwbw_generator(
    autocast_kernel_dtype: jnp.dtype = jnp.bfloat16,
    return_last_states: bool = False,
    recompute_states_in_bw: bool = True,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]]:
    """Generate a forward and backward pass function for the mLSTM kernels with chunkwise formulation.

    Args:
        autocast_kernel_dtype: The dtype to use for the kernel computation. All inputs arguments up to vecF
            are cast to this dtype. vecF is automatically casted to float32 in the kernels.
        return_last_states: Whether to return the last states of the mLSTM.
        recompute_states_in_bw: Whether to recompute the mLSTM states in the backward pass.
        chunk_size: The chunk size of the recurrent (inter-chunk) kernel.
        eps: The epsilon value to use for numerical stability.

    Returns:
        ``forward(matQ, matK, matV, vecI, vecF, matC_initial=None, vecN_initial=None,
        scaM_initial=None) -> (h, C_last, n_last, m_last)`` with exact custom gradients; h in the
        dtype of matQ, the last states in float32 (three None without ``return_last_states``).
    """
    return make_fwbw(
        layout="xl", autocast_kernel_dtype=autocast_kernel_dtype, return_last_states=return_last_states,
        recompute_states_in_bw=recompute_states_in_bw, chunk_size=chunk_size, eps=eps,
    )


def _get_chunkwise_fwbw_kernel(autocast_kernel_dtype: jnp.dtype, **kwargs) -> Callable:
    """Get the forward and backward pass function for the mLSTM kernels with chunkwise formulation.

    Args:
        autocast_kernel_dtype: The dtype to use for the kernel computation (float32, float16,
            bfloat16, as a dtype or its name; anything else raises ``ValueError``).
        **kwargs: The other parameters of ``_mlstm_chunkwise_fwbw_generator`` (anything else
            raises ``ValueError``).

    Returns:
        See ``_mlstm_chunkwise_fwbw_generator``.
    """
    return get_fwbw_kernel(_mlstm_chunkwise_fwbw_generator, _GENERATOR_OPTIONS, autocast_kernel_dtype, kwargs)


def mlstm_chunkwise_max_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    c_initial: jax.Array | None = None,
    n_initial: jax.Array | None = None,
    m_initial: jax.Array | None = None,
    return_last_states: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    autocast_kernel_dtype: jnp.dtype = jnp.float32,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Apply the mLSTM chunkwise formulation with the TFLA kernels (differentiable).

    Shapes: q, k (B, NH, S, DHQK); v (B, NH, S, DHV); i, f (B, NH, S); initial states
    (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH). Returns h (B, NH, S, DHV) in the dtype of q and,
    with ``return_last_states``, the last states (C, n, m) in float32.
    """
    fwbw = _get_chunkwise_fwbw_kernel(
        autocast_kernel_dtype, return_last_states=return_last_states, recompute_states_in_bw=True,
        chunk_size=chunk_size, eps=eps,
    )
    return sequence_fwbw(fwbw, return_last_states, q, k, v, i, f, c_initial, n_initial, m_initial)
