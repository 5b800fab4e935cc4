"""Seeds 001 and 003: the ``max_triton_fwbw_v5xlchunksize`` (TFLA, "xl chunk size") entry points.

Thin over the Pallas kernel family ``xlstm_jax.kernels.mlstm_chunkwise.pallas``; one module per
stage as in the seed: ``_combined_fw`` / ``_combined_bw`` (the whole forward / backward),
``_recurrent_fw`` / ``_parallel_fw`` (forward kernels), ``_recurrent_bw`` / ``_parallel_bw_dQ`` /
``_parallel_bw_dK`` / ``_parallel_bw_dV`` (backward kernels), ``_chunkwise_gates`` (gate
pre/post-processing), ``triton_fwbw`` (the differentiable function and its generator).
"""

from ._combined_fw import mlstm_chunkwise_fw
from .triton_fwbw import mlstm_chunkwise_max_triton

__all__ = ["mlstm_chunkwise_fw", "mlstm_chunkwise_max_triton"]
