"""Small helpers shared by the kernel bodies and launchers of the Pallas chunkwise family.

Matrix products take operands in the kernel dtype (bf16 / fp16 / fp32) and accumulate in float32;
fp32 operands ask for full precision (Triton would otherwise use TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ...pallas import _triton

_F32 = jnp.float32


def _precision(a):
    return jax.lax.Precision.HIGHEST if a.dtype == _F32 else None


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b, (m, k) x (k, n) -> (m, n) float32."""
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=_F32
    )


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T @ b, (k, m) x (k, n) -> (m, n) float32."""
    return jax.lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=_F32
    )


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b^T, (m, k) x (n, k) -> (m, n) float32."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=_precision(a), preferred_element_type=_F32
    )


def cdiv(a, b: int):
    """Ceil division of a traced int32 by a static int (``//`` does not lower for traced ints)."""
    return jax.lax.div(a + jnp.int32(b - 1), jnp.int32(b))


def launch(kernel, *, grid, in_specs, out_specs, out_shape, num_warps, num_stages, interpret, name):
    """``pl.pallas_call`` with the Triton compiler parameters; ``interpret`` already resolved."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton.compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )
