"""The one registry of mLSTM sequence kernels: names -> functions of one call signature.

Every registered kernel is called as::

    kernel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *,
           return_last_states=False, segment_ids=None, qk_scale=None, eps=1e-6, norm_val=1.0,
           stabilize_correctly=True, grad_mode="exact", input_gate="exp", cell_options=None)
      -> h                                  # (B, NH, S, DHV), dtype of q
      or (h, (matC, vecN, scaM))            # with return_last_states, states in float32

with q, k (B, NH, S, DHQK), v (B, NH, S, DHV), i, f (B, NH, S) or (B, NH, S, 1), and the initial
states (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH); ``segment_ids`` (B, S) integers pack documents
(each starts from the empty state, docs/design.md). The cell options come either as the flat keywords
or as one ``cell_options=CellOptions(...)`` (``xlstm_jax.kernels.options``). Every kernel validates its
call with ``xlstm_jax.kernels.validation.validate_sequence_call`` (shapes, floating dtypes, options;
B == 0 or NH == 0 gives empty outputs). Kernel-specific options (a chunk size, tile sizes,
``interpret``) are bound once by ``get_mlstm_kernel(name, **options)``; unknown names and unknown
options raise ``ValueError`` listing the valid ones.

Step (decode) kernels have their own registry with the signature documented at
``register_mlstm_step_kernel``.

Where the kernels come from: ``_load_builtin_kernels`` below imports, on first use of the registry
(so that ``import xlstm_jax`` stays cheap), the modules that define and register them:

    parallel_native     mlstm_parallel/native.py          mlstm_parallel
    recurrent_native    mlstm_recurrent/native.py         mlstm_recurrent_sequence (+ step kernel)
    chunkwise_native    mlstm_chunkwise/native.py         mlstm_chunkwise
    chunkwise_pallas    mlstm_chunkwise/pallas/           mlstm_chunkwise_pallas
    chunkwise_mosaic    mlstm_chunkwise/mosaic/           mlstm_chunkwise_mosaic (Mosaic GPU fw, Triton bw)
    chunkwise_auto      mlstm_chunkwise/mosaic/auto.py    mlstm_chunkwise_auto (the tuned family: Mosaic or Triton)
    recurrent_pallas    mlstm_recurrent/pallas_step/      step kernel mlstm_recurrent_step_pallas
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

COMMON_OPTIONS = (
    "return_last_states", "segment_ids", "qk_scale", "eps", "norm_val", "stabilize_correctly", "grad_mode",
    "input_gate", "cell_options",
)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A registered kernel: its function, the extra options it takes (with defaults), a summary."""

    name: str
    fn: Callable[..., Any]
    options: dict[str, Any]
    description: str
    supports_initial_states: bool = True
    needs_gpu: bool = False
    differentiable: bool = True
    tool_default: bool = True
    """False: ``check`` / ``bench`` run it only when named (``--kernels``), e.g. a kernel not yet
    verified on a GPU, or one that only dispatches to others."""


def default_tool_kernels() -> list[str]:
    """The kernels the tools (``check``, ``bench``) run when none are named: every registered one
    that runs on this backend (``needs_gpu`` ones only on a GPU), has a backward pass and is not
    marked ``tool_default=False``."""
    import jax

    on_gpu = jax.default_backend() == "gpu"
    return [n for n in available_mlstm_kernels()
            if _REGISTRY[n].differentiable and _REGISTRY[n].tool_default
            and (on_gpu or not _REGISTRY[n].needs_gpu)]


_REGISTRY: dict[str, KernelSpec] = {}
_loaded = False


def register_mlstm_kernel(
    name: str,
    fn: Callable[..., Any],
    *,
    options: dict[str, Any] | None = None,
    description: str = "",
    supports_initial_states: bool = True,
    needs_gpu: bool = False,
    differentiable: bool = True,
    tool_default: bool = True,
) -> None:
    """Register ``fn`` (the common signature above, plus keyword ``options``) under ``name``."""
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
        raise ValueError(f"an mLSTM kernel named {name!r} is already registered")
    _REGISTRY[name] = KernelSpec(
        name, fn, dict(options or {}), description, supports_initial_states, needs_gpu, differentiable,
        tool_default,
    )


def _load_builtin_kernels() -> None:
    """Import the modules of the built-in kernels (each registers its kernels at import)."""
    from .mlstm_chunkwise import native as _chunkwise_native  # noqa: F401
    from .mlstm_chunkwise import mosaic as _chunkwise_mosaic  # noqa: F401
    from .mlstm_chunkwise import pallas as _chunkwise_pallas  # noqa: F401
    from .mlstm_parallel import native as _parallel_native  # noqa: F401
    from .mlstm_recurrent import native as _recurrent_native  # noqa: F401
    from .mlstm_recurrent import pallas_step as _recurrent_pallas  # noqa: F401


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _load_builtin_kernels()
    _loaded = True


_STEP_REGISTRY: dict[str, KernelSpec] = {}


def register_mlstm_step_kernel(
    name: str, fn: Callable[..., Any], *, options: dict[str, Any] | None = None, description: str = ""
) -> None:
    """Register a single-step kernel (decode). Signature::

        step(matC, vecN, scaM, q, k, v, i, f, *, qk_scale=None, eps=1e-6, norm_val=1.0,
             stabilize_correctly=True, grad_mode="exact", cell_options=None)
          -> (h, (matC, vecN, scaM))

    with matC (B, NH, DHQK, DHV), vecN (B, NH, DHQK), scaM (B, NH), q, k (B, NH, DHQK),
    v (B, NH, DHV), i, f (B, NH); h (B, NH, DHV). Every step kernel validates its call with
    ``xlstm_jax.kernels.validation.validate_step_call``.
    """
    if name in _STEP_REGISTRY and _STEP_REGISTRY[name].fn is not fn:
        raise ValueError(f"an mLSTM step kernel named {name!r} is already registered")
    _STEP_REGISTRY[name] = KernelSpec(name, fn, dict(options or {}), description)


def available_mlstm_step_kernels() -> list[str]:
    """Names of all registered single-step (decode) kernels, sorted."""
    _load()
    return sorted(_STEP_REGISTRY)


def get_mlstm_step_kernel(name: str, **options) -> Callable[..., Any]:
    """The step kernel ``name`` with its options bound; ``ValueError`` for unknown names/options."""
    _load()
    if name not in _STEP_REGISTRY:
        raise ValueError(
            f"unknown mLSTM step kernel {name!r}; available: {', '.join(sorted(_STEP_REGISTRY))}"
        )
    spec = _STEP_REGISTRY[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"mLSTM step kernel {name!r} takes no option(s) {unknown}; its options are {sorted(spec.options) or 'none'}")
    return functools.partial(spec.fn, **options) if options else spec.fn


def available_mlstm_kernels() -> list[str]:
    """Names of all registered mLSTM sequence kernels, sorted."""
    _load()
    return sorted(_REGISTRY)


def get_mlstm_kernel_spec(name: str) -> KernelSpec:
    """The ``KernelSpec`` of ``name``; ``ValueError`` listing the valid names if unknown."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown mLSTM kernel {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_mlstm_kernel(name: str, **options) -> Callable[..., Any]:
    """The kernel ``name`` with its kernel-specific ``options`` bound.

    Raises ``ValueError`` for an unknown name or an option the kernel does not take.
    """
    spec = get_mlstm_kernel_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"mLSTM kernel {name!r} takes no option(s) {unknown}; its options are "
            f"{sorted(spec.options) or 'none'} (common arguments {list(COMMON_OPTIONS)} go to the call)"
        )
    if not options:
        return spec.fn
    return functools.partial(spec.fn, **options)
