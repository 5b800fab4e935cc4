"""Seed 002: the ``triton_kernels`` backend, one parametrised Pallas chunkwise kernel behind four names.

Every ``backend_name`` calls the registry kernel ``chunkwise_pallas`` (the Pallas TFLA kernels of
``xlstm_jax.kernels.mlstm_chunkwise.pallas``, compiled through Pallas' Triton lowering on NVIDIA
GPUs, interpreted elsewhere) with different defaults; with ``chunk_size=None`` and
``kernel_family="auto"`` (the language model's defaults) it calls ``chunkwise_auto`` instead, which
runs the kernel family the tuned table chose for the device and shape (the Mosaic GPU kernels of
``xlstm_jax.kernels.mlstm_chunkwise.mosaic`` on Hopper where they were measured faster, else
``chunkwise_pallas``: the same function and gradients):

    triton_stablef, max_triton, max_triton_noslice   limit-chunk layout: intra chunk = recurrent
                                                      step = chunk_size
    max_triton_xlchunksize                           TFLA xl chunks: recurrent step chunk_size,
                                                      intra chunk max(chunk_size, 128)

(the layouts and ``reduce_slicing`` are ``xlstm_jax.kernels.chunking.chunk_layout``). With
``chunk_size=None`` (the default) no chunk is passed: the kernel's own rule picks it (the tuned
table of ``xlstm_jax.kernels.mlstm_chunkwise.pallas.tuning`` for this device and shape, else the
heuristics: intra chunk 128 for 16-bit kernels, 64 for float32), the same for every name; with
``reduce_slicing`` and S not a multiple of 128, the target chunk is the largest power of two <= 64
dividing S (``chunking.dividing_chunk``; none if no power of two >= 16 divides S). All honour
eps, norm_val and stabilize_correctly, and give exact gradients by default; ``grad_mode="tfla"``
(the one field added to the seed's config) gives the TFLA kernels' convention. Shapes (the seeds'):
q, k (B, NH, S, DHQK); v (B, NH, S, DHV); i, f (B, NH, S) or (B, NH, S, 1); initial states
(B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from xlstm_jax.kernels import chunk_layout, floating_dtype, validate_chunk_size
from xlstm_jax.kernels.chunking import XL_INTRA_CHUNK, dividing_chunk

from .config import mLSTMBackend, mLSTMBackendConfig

BackendNameType = Literal["max_triton_xlchunksize", "max_triton_noslice", "max_triton", "triton_stablef"]

_LAYOUTS = {
    "max_triton_xlchunksize": "xl", "max_triton_noslice": "limit", "max_triton": "limit", "triton_stablef": "limit",
}
_KERNEL_DTYPES = ("float32", "bfloat16", "float16")
KERNEL_FAMILIES = ("auto", "triton")
"""Values of ``kernel_family`` (the first is the default)."""


@dataclasses.dataclass
class mLSTMBackendTritonConfig(mLSTMBackendConfig):
    """Config of the Triton-kernel backends (seed 002)."""

    autocast_dtype: str | None = None
    """Dtype to use for the kernel computation. If None, uses the query dtype."""
    chunk_size: int | None = 64
    """Chunk size for the kernel computation (the seed's default, 64). None: the kernel's own rule
    (the tuned table, else 128 for 16-bit kernels and 64 for float32), which is what the language
    model passes unless its ``mlstm_backend_kwargs`` name a chunk size (``xLSTMLMConfig.backend_kwargs``):
    measured on an H200 (2026-12-01) the kernel's rule is faster than 64 at every benchmark row."""
    reduce_slicing: bool = True
    """Whether to reduce slicing operations before the kernel computation.
    Speeds up computation during training, but may limit initial states and
    forwarding states during inference.

    Here: when S is not a multiple of the (intra) chunk size, use the largest power-of-two chunk
    >= 16 below it that divides S, so no padding and slicing copies are made (results are equal up
    to rounding). Initial and forwarded states work either way."""
    backend_name: BackendNameType = "max_triton_noslice"
    """Backend name for the kernel type used"""
    eps: float = 1e-6
    """Epsilon value used in the kernel"""
    norm_val: float = 1.0
    """Normalizer upper bound value - max(norm_val e^-m, |n q|)"""
    stabilize_correctly: bool = True
    """Whether to stabilize correctly, i.e. scale norm_val with the maximizer state - see above"""
    grad_mode: str = "exact"
    """Gradient convention: "exact" (the gradient of the cell) or "tfla" (denominator and m held
    constant in the backward pass, as the TFLA kernels; not a seed field)."""
    input_gate: str = "exp"
    """Input gate: "exp" (the exponential gate with max state) or "sigmoid" (mLSTMsig, no max state)."""
    kernel_family: str = "auto"
    """With ``chunk_size=None``: "auto" runs the kernel family of the tuned table for this device and
    shape (``chunkwise_auto``: the Mosaic GPU family where the table chose it, else the Triton one);
    "triton" always the Triton family (``chunkwise_pallas``). An explicit ``chunk_size`` always runs
    the Triton family (its intra / recurrent chunk layouts are the Triton kernels'). Not a seed field."""

    def __post_init__(self):
        names = get_args(BackendNameType)
        if self.backend_name not in names:
            raise ValueError(f"backend_name must be one of {names}; got {self.backend_name!r}")
        if self.chunk_size is not None:
            validate_chunk_size("chunk_size", self.chunk_size, pallas=True)
        dt = floating_dtype("autocast_dtype", self.autocast_dtype)
        if dt is not None and dt.name not in _KERNEL_DTYPES:
            raise ValueError(f"autocast_dtype must be None or one of {_KERNEL_DTYPES}; got {self.autocast_dtype!r}")
        if self.kernel_family not in KERNEL_FAMILIES:
            raise ValueError(f"kernel_family must be one of {KERNEL_FAMILIES}; got {self.kernel_family!r}")
        if not isinstance(self.reduce_slicing, bool):
            raise ValueError(f"reduce_slicing must be a bool; got {self.reduce_slicing!r}")
        super().__post_init__()

    def assign_model_config_params(self, model_config: Any) -> None:
        """Nothing to take from the model config (the seed's behaviour)."""
        del model_config


class mLSTMBackendTriton(mLSTMBackend):
    """mLSTM backend on the Pallas chunkwise (TFLA) kernels; see the module doc for the names."""

    config: mLSTMBackendTritonConfig
    config_class = mLSTMBackendTritonConfig

    def kernel_call(self, seq_len: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(kernel name, kernel options, call options) for this config and ``seq_len``:
        ``chunkwise_auto`` for ``chunk_size=None`` with ``kernel_family="auto"``, else
        ``chunkwise_pallas``."""
        c = self.config
        if c.chunk_size is None:  # the kernel's own rule (tuned table / heuristics)
            options = dict(autocast_kernel_dtype=c.autocast_dtype)
            if c.reduce_slicing and seq_len % XL_INTRA_CHUNK:
                chunk = dividing_chunk(XL_INTRA_CHUNK // 2, seq_len)
                if seq_len % chunk == 0:  # else no power of two >= 16 divides S: the kernel pads
                    options["chunk_size"] = chunk
            name = "chunkwise_auto" if c.kernel_family == "auto" else "chunkwise_pallas"
            return name, options, {"cell_options": c.cell_options}
        intra, inter = chunk_layout(
            c.chunk_size, _LAYOUTS[c.backend_name], S=seq_len, reduce_slicing=c.reduce_slicing
        )
        options = dict(
            autocast_kernel_dtype=c.autocast_dtype, chunk_size_intra=intra, chunk_size_inter=inter
        )
        return "chunkwise_pallas", options, {"cell_options": c.cell_options}

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmaped over the heads dimension.

        Triton kernels already handle the head dimension, hence not to be vmaped over.

        Returns:
            bool: False
        """
        return False
