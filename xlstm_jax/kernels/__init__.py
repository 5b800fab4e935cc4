"""mLSTM kernels: pure-JAX references, the XLA chunkwise fallback and Pallas kernels.

Use the registry: ``get_mlstm_kernel(name, **options)`` and ``available_mlstm_kernels()``.
"""

from ._common import MLSTMState
from .registry import (
    available_mlstm_kernels,
    available_mlstm_step_kernels,
    get_mlstm_kernel,
    get_mlstm_kernel_spec,
    get_mlstm_step_kernel,
    register_mlstm_kernel,
    register_mlstm_step_kernel,
)

__all__ = [
    "MLSTMState",
    "available_mlstm_kernels",
    "available_mlstm_step_kernels",
    "get_mlstm_step_kernel",
    "register_mlstm_step_kernel",
    "get_mlstm_kernel",
    "get_mlstm_kernel_spec",
    "register_mlstm_kernel",
]
