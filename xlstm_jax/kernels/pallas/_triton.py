"""The only module that imports Pallas' Triton backend (``jax.experimental.pallas.triton``).

JAX 0.11 deprecates the Triton backend of Pallas in favour of Mosaic GPU; keeping every Triton-specific
name here means a Mosaic GPU path can be added beside this module without touching kernel bodies.
Passing these compiler params selects the Triton lowering explicitly on GPU; in interpret mode
(CPU, CI) they are ignored.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as _pl_triton


def compiler_params(num_warps: int | None = None, num_stages: int | None = None):
    """Triton compiler parameters for ``pl.pallas_call(..., compiler_params=...)``."""
    return _pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_interpret(interpret: bool | None) -> bool:
    """``interpret=None`` means: compile on an NVIDIA GPU, interpret everywhere else (CPU CI)."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)
