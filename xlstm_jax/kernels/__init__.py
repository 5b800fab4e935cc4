"""mLSTM kernels: pure-JAX references, the XLA chunkwise fallback and Pallas kernels.

Use the registry: ``get_mlstm_kernel(name, **options)`` and ``available_mlstm_kernels()`` (sequence
kernels), ``get_mlstm_step_kernel(name, **options)`` (decode steps). The cell's options are one type,
``CellOptions``; every kernel validates its inputs through ``xlstm_jax.kernels.validation``; chunk
sizes follow ``xlstm_jax.kernels.chunking``. The design is described in ``docs/design.md``.
"""

from ._common import MLSTMState
from .chunking import chunk_layout, fit_chunk_size, validate_chunk_size
from .options import GRAD_MODES, INPUT_GATES, CellOptions, resolve_cell_options
from .registry import (
    available_mlstm_kernels,
    available_mlstm_step_kernels,
    get_mlstm_kernel,
    get_mlstm_kernel_spec,
    get_mlstm_step_kernel,
    register_mlstm_kernel,
    register_mlstm_step_kernel,
)
from .validation import (
    check_floating,
    floating_dtype,
    squeeze_gate,
    validate_sequence_call,
    validate_step_call,
)

__all__ = [
    "GRAD_MODES",
    "INPUT_GATES",
    "CellOptions",
    "MLSTMState",
    "available_mlstm_kernels",
    "available_mlstm_step_kernels",
    "check_floating",
    "chunk_layout",
    "fit_chunk_size",
    "floating_dtype",
    "get_mlstm_kernel",
    "get_mlstm_kernel_spec",
    "get_mlstm_step_kernel",
    "register_mlstm_kernel",
    "register_mlstm_step_kernel",
    "resolve_cell_options",
    "squeeze_gate",
    "validate_chunk_size",
    "validate_sequence_call",
    "validate_step_call",
]
