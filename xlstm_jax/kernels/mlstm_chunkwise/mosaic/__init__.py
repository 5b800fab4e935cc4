"""Mosaic GPU (Hopper-native Pallas) chunkwise mLSTM kernels, issue 14.

The forward intra-chunk kernel and the parallel backward kernels are on Mosaic GPU (``bw_kernels``
"mosaic" or "mosaic_split", chosen by ``forward.default_bw_kernels`` unless given); the state
recurrences are the Triton family's kernels.
Modules: ``fw_parallel`` (the intra-chunk kernel: h and the normaliser from the chunk-border state
and the attention-like part, wgmma + TMA; its docstring has the design), ``bw_parallel_dv`` (dV of
a key block, the forward kernel transposed), ``bw_parallel_dk`` and ``bw_parallel_dq`` (dK of a
key block, dQ of a query block, with the row sums of the gate gradients), ``bw_parallel_split``
(dQ and dK around one kernel computing each block pair's score gradient once: the 7B heads),
``forward`` (preparation, the Triton family's gates and recurrent state kernel, the launch, the
``jax.custom_vjp`` over the Triton family's backward with the Mosaic kernels in place).
Registered as ``chunkwise_mosaic`` with the options of ``chunkwise_pallas`` (``needs_gpu``: an
NVIDIA Hopper GPU); differentiable. ``auto`` registers ``chunkwise_auto``: the family (Mosaic or
Triton) the tuned table chose for the call's shape, Triton where Mosaic GPU cannot run.

Importing this package imports no Mosaic GPU module: ``jax.experimental.pallas.mosaic_gpu`` is
imported by ``xlstm_jax.kernels.pallas._mosaic`` when a kernel is first traced, so the package
imports on any JAX and machine; on a machine without Mosaic GPU a call raises ``RuntimeError``.
"""

from __future__ import annotations

from ...registry import register_mlstm_kernel
from ..pallas import KERNEL_OPTIONS as _PALLAS_OPTIONS
from .auto import FamilyChoice, choose_family, mlstm_chunkwise_auto
from .forward import mlstm_chunkwise_mosaic

KERNEL_OPTIONS = {**_PALLAS_OPTIONS, "bw_kernels": None, "pipeline_slots": None}
"""The options of ``chunkwise_pallas`` (same names and defaults), ``bw_kernels`` (the Mosaic
backward kernels) and ``pipeline_slots`` (the buffers of the forward and dV kernels' streamed
tiles); see ``mlstm_chunkwise_mosaic``."""


def _chunkwise_mosaic_kernel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, **kw):
    return mlstm_chunkwise_mosaic(q, k, v, i, f, c_initial, n_initial, m_initial, **kw)


register_mlstm_kernel(
    "chunkwise_mosaic",
    _chunkwise_mosaic_kernel,
    options=KERNEL_OPTIONS,
    description=(
        "chunkwise (TFLA): forward intra-chunk and backward dV, dK, dQ kernels on Mosaic GPU (wgmma, TMA; "
        "bw_kernels='triton': the Triton family's backward); state recurrences are the Triton family's kernels; "
        "needs an NVIDIA Hopper GPU (interpret=True: CPU simulation)"
    ),
    needs_gpu=True,
    differentiable=True,
    tool_default=False,  # check / bench run it when named (scripts/gpu_mosaic.sh, gpu_speed.sh BENCH_KERNELS): keeps the default GPU suite in its time limits
)

AUTO_OPTIONS = {"chunk_size": None, "autocast_kernel_dtype": None, "output_dtype": None, "tuned": None,
                "interpret": None}
"""The options of ``chunkwise_auto`` (see ``auto.mlstm_chunkwise_auto``)."""


def _chunkwise_auto_kernel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, **kw):
    return mlstm_chunkwise_auto(q, k, v, i, f, c_initial, n_initial, m_initial, **kw)


register_mlstm_kernel(
    "chunkwise_auto",
    _chunkwise_auto_kernel,
    options=AUTO_OPTIONS,
    description=(
        "chunkwise (TFLA): chunkwise_mosaic where the tuned table's entry for the shape chose it "
        "(xlstm-jax tune --families triton mosaic) and Mosaic GPU can run (Hopper), else "
        "chunkwise_pallas (Triton; interpreted without a GPU)"
    ),
    tool_default=False,  # it runs one of the two families, which the tools time by name
)

__all__ = [
    "AUTO_OPTIONS", "FamilyChoice", "KERNEL_OPTIONS", "choose_family", "mlstm_chunkwise_auto",
    "mlstm_chunkwise_mosaic",
]
