"""Pallas chunkwise mLSTM kernels with the TFLA structure (forward and backward), one kernel family.

Modules (one thing each): ``gates`` (log-sigmoid, m scan, per-chunk gate vectors, gate gradients),
``gate_kernels`` (the same gate vectors and gate gradients as Pallas row kernels),
``heuristics`` (every default kernel parameter), ``tuning`` (tuned parameter tables, looked up
at trace time; ``xlstm-jax tune`` fills them), ``fw_recurrent`` / ``fw_parallel`` (forward
kernels), ``bw_recurrent`` / ``bw_parallel_dq`` / ``bw_parallel_dk`` / ``bw_parallel_dv`` /
``bw_parallel_dkdv`` (backward kernels), ``autodiff`` (casting, padding, ``jax.custom_vjp``).
Registered in the kernel registry as ``chunkwise_pallas``; the seed entry points
(``triton_stablef``, ``max_triton_fwbw_v5xlchunksize``) are thin layers over this package through
``xlstm_jax.kernels.mlstm_chunkwise.seed_compat``.

Notation: see ``xlstm_jax.kernels._common`` and ``gates``.
"""

from __future__ import annotations

from ...registry import register_mlstm_kernel
from .autodiff import mlstm_chunkwise_pallas
from .heuristics import ChunkwiseKernelParams, chunkwise_kernel_params

KERNEL_OPTIONS = {
    "chunk_size": None,
    "chunk_size_inter": None,
    "chunk_size_intra": None,
    "siz_b_L_parallel": None,
    "siz_b_L_loop": None,
    "siz_b_DH_parallel": None,
    "siz_b_DH_loop": None,
    "siz_b_DHQK_inter": None,
    "siz_b_DHV_inter": None,
    "num_warps_intra": None,
    "num_warps_inter": None,
    "num_stages_intra": None,
    "num_stages_inter": None,
    "autocast_kernel_dtype": None,
    "output_dtype": None,
    "recompute_states_in_bw": None,
    "tuned": None,
    "interpret": None,
    "m_scan": None,
    "gates_impl": None,
    "gate_grads_impl": None,
    "states_bf16": None,
    "save_gates": None,
    "fuse_dkdv": None,
}


def _chunkwise_pallas_kernel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, **kw):
    return mlstm_chunkwise_pallas(q, k, v, i, f, c_initial, n_initial, m_initial, **kw)


register_mlstm_kernel(
    "chunkwise_pallas",
    _chunkwise_pallas_kernel,
    options=KERNEL_OPTIONS,
    description=(
        "chunkwise (TFLA) Pallas kernels, forward and backward: states every chunk border, tiled "
        "intra-chunk kernels; compiled on NVIDIA GPUs (Triton), interpreted elsewhere"
    ),
)

__all__ = ["ChunkwiseKernelParams", "chunkwise_kernel_params", "mlstm_chunkwise_pallas"]
