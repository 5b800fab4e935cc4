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


# ----------------------------------------------------------------------------- associative scans
# Pallas' Triton lowering has no associative scan except ``jnp.cumsum`` (forward, one operand).
# ``associative_scan`` below is a primitive with a Triton lowering to ``tt.scan`` (any number of
# operands, either direction: the scan Triton itself offers as ``tl.associative_scan``) and, for
# interpret mode and every other backend, the implementation ``jax.lax.associative_scan``. The
# lowering uses the Triton lowering's internal helpers (``jax._src.pallas.triton.lowering``: the
# same ones its cumsum rule uses; present with these signatures in JAX 0.10.2 and 0.11.2), so it
# lives in this module with the other Triton-specific names.
from jax._src.lib.mlir import ir as _ir  # noqa: E402
from jax._src.lib.triton import dialect as _tt  # noqa: E402
from jax._src.pallas.triton import lowering as _tl  # noqa: E402
from jax.extend import core as _jex_core  # noqa: E402
from jax.interpreters import mlir as _mlir  # noqa: E402

_scan_p = _jex_core.Primitive("xlstm_associative_scan")
_scan_p.multiple_results = True


def _scan_impl(*operands, combine, reverse):
    return list(jax.lax.associative_scan(combine, tuple(operands), reverse=reverse, axis=operands[0].ndim - 1))


def _scan_abstract_eval(*avals, combine, reverse):
    del combine, reverse
    return [jax.core.ShapedArray(a.shape, a.dtype) for a in avals]


def _scan_triton_lowering(ctx, *operands, combine, reverse):
    n = len(operands)
    scalars = [jax.ShapeDtypeStruct((), a.dtype) for a in ctx.avals_in]
    closed = jax.make_jaxpr(lambda *xs: tuple(combine(tuple(xs[:n]), tuple(xs[n:]))))(*scalars, *scalars)
    if closed.consts:
        raise NotImplementedError("associative_scan: the combine function must not close over arrays")
    scan_op = _tt.ScanOp(list(operands), ctx.avals_in[0].ndim - 1, bool(reverse))
    element_types = [_tl._element_type(x.type) for x in operands]
    entry = scan_op.regions[0].blocks.append(*(element_types * 2))
    with _ir.InsertionPoint.at_block_begin(entry):
        results = _tl.lower_jaxpr_to_triton_ir(ctx.context, closed.jaxpr, None, *entry.arguments)
        _tt.scan_return(results)
    scan_op.verify()
    return list(scan_op.result)


_scan_p.def_impl(_scan_impl)
_scan_p.def_abstract_eval(_scan_abstract_eval)
_mlir.register_lowering(_scan_p, _mlir.lower_fun(_scan_impl, multiple_results=True))
_tl.triton_lowering_rules[_scan_p] = _scan_triton_lowering


def associative_scan(combine, operands: tuple, *, reverse: bool = False) -> tuple:
    """Inclusive scan of ``operands`` (arrays of one shape) along their last axis with ``combine``
    (``combine(earlier, later)`` on tuples of scalars, associative, no captured arrays), usable inside
    a Pallas Triton kernel (``tt.scan``) and everywhere else (``jax.lax.associative_scan``).
    ``reverse=True`` scans from the end: element t combines t..end, ``combine(later-part, t)`` ordered
    as ``jax.lax.associative_scan`` orders it."""
    operands = tuple(operands)
    if not operands:
        raise ValueError("associative_scan: operands must hold at least one array")
    shapes = {tuple(x.shape) for x in operands}
    if len(shapes) != 1 or not operands[0].shape:
        raise ValueError(f"associative_scan: operands must be arrays of one non-scalar shape; got {sorted(shapes)}")
    return tuple(_scan_p.bind(*operands, combine=combine, reverse=bool(reverse)))
