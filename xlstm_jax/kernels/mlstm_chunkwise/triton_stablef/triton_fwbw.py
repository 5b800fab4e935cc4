"""Triton backend for the backward pass of the mLSTM chunkwise formulation (seed 000).

The seed's Triton kernels are implemented here by the Pallas kernel family
``xlstm_jax.kernels.mlstm_chunkwise.pallas`` (compiled through Pallas' Triton lowering on NVIDIA
GPUs, interpreted elsewhere); this module only fixes the seed's signatures and defaults. "stablef":
log forget gates are summed per segment inside each chunk (no difference of global cumulative sums).

In this file, we use the following notation:

Dimensions:
    B: batch size
    H (NH): number of heads
    S: sequence length (K, V)
    T: sequence length (Q)
    K (DHQK): hidden dimension (Q, K)
    V (DHV): hidden dimension (H, V)
    NT: number of chunks
    BT: chunk size

``chunk_size`` is both the intra chunk of the parallel kernels and the step of the recurrent kernel
(the limit-chunk layout, ``xlstm_jax.kernels.chunking``). Gradients are exact (``jax.grad`` of the
cell, through the normalizer's lower bound too); the TFLA convention (denominator and m held
constant) is offered by the registry kernel ``chunkwise_pallas`` with ``grad_mode="tfla"``. The
functions here fix the seed's signatures; the implementation is ``..seed_compat``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..seed_compat import get_fwbw_kernel, make_fwbw, sequence_fwbw

_GENERATOR_OPTIONS = (
    "return_last_states", "recompute_states_in_bw", "chunk_size", "eps", "stabilize_correctly", "norm_val",
)


def _mlstm_chunkwise_fwbw_generator(
    autocast_kernel_dtype: jnp.dtype = jnp.bfloat16,
    return_last_states: bool = False,
    recompute_states_in_bw: bool = True,
    chunk_size: int = 64,
    eps: float = 1e-6,
    stabilize_correctly: bool = True,
    norm_val: float = 1.0,
) -> Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]]:
    """Generate a forward and backward pass function for the mLSTM kernels with chunkwise formulation.

    Args:
        autocast_kernel_dtype: The dtype to use for the kernel computation. All inputs arguments up to vecF
            are cast to this dtype. vecF is automatically casted to float32 in the kernels.
        return_last_states: Whether to return the last states of the mLSTM.
        recompute_states_in_bw: Whether to recompute the mLSTM states in the backward pass.
        chunk_size: The chunk size to use for the mLSTM computation.
        eps: The epsilon value to use for numerical stability.
        stabilize_correctly: Whether to stabilize with max(norm_val*e^-m, |nk|) instead of max(norm_val, |nk|)
        norm_val: Norm scale in the max formula above

    Returns:
        A function with custom gradients (exact) computing the chunkwise mLSTM::

            forward(
                matQ: jax.Array,  # (B, NH, S, DHQK)
                matK: jax.Array,  # (B, NH, S, DHQK)
                matV: jax.Array,  # (B, NH, S, DHV)
                vecI: jax.Array,  # (B, NH, S)
                vecF: jax.Array,  # (B, NH, S)
                matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
                vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
                scaM_initial: jax.Array | None = None,  # (B, NH)
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]

        It returns (h, C_last, n_last, m_last): h (B, NH, S, DHV) in the dtype of matQ and, with
        ``return_last_states``, the last states in float32 (otherwise three None).
    """

    return make_fwbw(
        layout="limit", autocast_kernel_dtype=autocast_kernel_dtype, return_last_states=return_last_states,
        recompute_states_in_bw=recompute_states_in_bw, chunk_size=chunk_size, eps=eps, norm_val=norm_val,
        stabilize_correctly=stabilize_correctly,
    )


def _get_chunkwise_fwbw_kernel(autocast_kernel_dtype: jnp.dtype, **kwargs) -> Callable:
    """Get the forward and backward pass function for the mLSTM kernels with chunkwise formulation.

    Args:
        autocast_kernel_dtype: The dtype to use for the kernel computation. All inputs arguments up to vecF and vecI
            are cast to this dtype. vecF is automatically casted to float32 in the kernels.
        **kwargs: Additional keyword arguments to pass to the kernel function: the other parameters
            of ``_mlstm_chunkwise_fwbw_generator`` (anything else raises ``ValueError``).

    Returns:
        A function that computes the forward pass of the mLSTM chunkwise formulation, which custom gradients for the
        backward pass. See _mlstm_chunkwise_fwbw_generator for the function signature.
    """
    return get_fwbw_kernel(_mlstm_chunkwise_fwbw_generator, _GENERATOR_OPTIONS, autocast_kernel_dtype, kwargs)


def mlstm_chunkwise_triton_stablef(
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
    stabilize_correctly: bool = True,
    norm_val: float = 1.0,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Apply the mLSTM chunkwise formulation with Triton kernels.

    Supports autograd application.

    Args:
        q: The query tensor of shape (B, NH, S, DHQK).
        k: The key tensor of shape (B, NH, S, DHQK).
        v: The value tensor of shape (B, NH, S, DHV).
        i: The input gate preactivation tensor of shape (B, NH, S).
        f: The forget gate preactivation tensor of shape (B, NH, S).
        c_initial: The initial chunk state tensor of shape (B, NH, DHQK, DHV).
        n_initial: The initial chunk state tensor of shape (B, NH, DHQK).
        m_initial: The initial chunk state tensor of shape (B, NH).
        return_last_states: Whether to return the last states of the mLSTM.
        eps: The epsilon value to use for numerical stability.
        chunk_size: The chunk size to use for the mLSTM computation.
        autocast_kernel_dtype: The dtype to use for the kernel computation. All inputs arguments up
            to vecF are cast to this dtype. vecF is automatically casted to float32 in the kernels.
        stabilize_correctly: Whether to stabilize with max(norm_val*e^-m, |nk|) instead of max(norm_val, |nk|)
        norm_val: Norm scale in the max formula above

    Returns:
        The output of the mLSTM computation (B, NH, S, DHV), dtype of q. If return_last_states is
        True, also the last states (C, n, m) of the mLSTM in float32.
    """
    fwbw = _get_chunkwise_fwbw_kernel(
        autocast_kernel_dtype,
        return_last_states=return_last_states,
        recompute_states_in_bw=True,
        chunk_size=chunk_size,
        norm_val=norm_val,
        stabilize_correctly=stabilize_correctly,
        eps=eps,
    )
    return sequence_fwbw(fwbw, return_last_states, q, k, v, i, f, c_initial, n_initial, m_initial)
