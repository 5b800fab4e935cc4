"""Seed 000: the ``triton_stablef`` chunkwise entry points, thin over the Pallas TFLA kernels
(``xlstm_jax.kernels.mlstm_chunkwise.pallas``)."""

from .triton_fwbw import (
    _get_chunkwise_fwbw_kernel,
    _mlstm_chunkwise_fwbw_generator,
    mlstm_chunkwise_triton_stablef,
)

__all__ = ["_get_chunkwise_fwbw_kernel", "_mlstm_chunkwise_fwbw_generator", "mlstm_chunkwise_triton_stablef"]
