"""Launcher of the fused mLSTM step kernel: tile choice, grid, BlockSpecs, compiler params, aliasing.

Notation: see ``xlstm_jax.kernels._common`` and ``_kernel.py``; ``BNH = B * NH`` (batch and heads
flattened). The launcher sees padded, flattened arrays:

    matC (BNH, DHQK_p, DHV_p)   vecN, vecQ, vecK (BNH, DHQK_p)   vecV (BNH, DHV_p)
    scaM, scaI, scaF (BNH,)

Grid: (BNH, DHV_p // siz_b_DHV). Program (b, j) owns C[b, :, j-tile] and h[b, j-tile]; it reads the
whole of n[b], q[b], k[b] (small) and writes n[b], m[b] only when j == 0. C is updated in place
(``input_output_aliases``: input 0 -> output 1): every C tile is read and written by the same program,
so the aliasing is race free. n and m are *not* aliased: the programs j > 0 read the old n and m
while the program j == 0 writes the new ones, so aliasing them would be a race (they are
DHQK + 1 numbers per head, against DHQK * DHV for C).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ...pallas import _triton
from ._kernel import mlstm_step_kernel

MIN_TILE = 16
"""Smallest tile the launcher chooses by itself for a head dimension (smaller dims are padded)."""

_TARGET_PROGRAMS = 132
"""About one program per streaming multiprocessor of an H100/H200 (132 SMs). Measured on an H200
(2026-11-21, docs/benchmarks.md): at B=1, NH=8, DHQK=256, DHV=512, tiles (128, 32) beat (256, 16)."""

_TILE_ELEMENTS = 4096
"""Elements of C per loop iteration and program: 16 KiB of float32, 32 values per thread at 4 warps."""


@dataclasses.dataclass(frozen=True)
class StepTiling:
    """Tile sizes, padded head dims and launch parameters of one step call."""

    DHQK_p: int
    DHV_p: int
    siz_b_DHQK: int
    siz_b_DHV: int
    num_warps: int
    num_stages: int

    @property
    def num_tiles_DHV(self) -> int:
        """Programs per (batch, head): the second grid dimension."""
        return self.DHV_p // self.siz_b_DHV


def _pow2_divisor(n: int) -> int:
    """The largest power of two dividing ``n`` (n >= 1)."""
    return n & -n


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_block(name: str, value: int | None, dim: int, dim_name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two (Triton tiles); got {value!r}")
    if value > _next_pow2(dim):
        raise ValueError(f"{name}={value} exceeds {dim_name}={dim} rounded up to a power of two")


def padded_dim(dim: int, block: int | None) -> int:
    """The head dim the kernel sees: ``dim`` itself if a usable tile divides it, else zero-padded.

    With an explicit ``block`` the dim is padded to a multiple of it. Without one, a dim whose
    largest power-of-two divisor is at least ``MIN_TILE`` (or the dim itself, if smaller than
    ``MIN_TILE`` and a power of two) is kept, e.g. 96 = 3 * 32 or 192 = 3 * 64; others are padded to
    a multiple of ``MIN_TILE`` (or the next power of two below it).
    """
    if block is not None:
        return -(-dim // block) * block
    if _pow2_divisor(dim) >= min(MIN_TILE, _next_pow2(dim)):
        return dim
    step = min(MIN_TILE, _next_pow2(dim))
    return -(-dim // step) * step


def choose_tiling(
    BNH: int,
    DHQK: int,
    DHV: int,
    *,
    block_dhqk: int | None = None,
    block_dhv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> StepTiling:
    """Tile sizes for a step over ``BNH`` heads; explicit blocks must be powers of two.

    Default heuristic: split DHV into enough tiles that about ``_TARGET_PROGRAMS`` programs run
    (small batches need the parallelism; each tile at least ``MIN_TILE`` wide and at most 128), then
    take DHQK tiles of about ``_TILE_ELEMENTS / siz_b_DHV`` rows.
    """
    _check_block("block_dhqk", block_dhqk, DHQK, "DHQK")
    _check_block("block_dhv", block_dhv, DHV, "DHV")
    for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    DHQK_p = padded_dim(DHQK, block_dhqk)
    DHV_p = padded_dim(DHV, block_dhv)
    if block_dhv is None:
        max_dhv = min(_pow2_divisor(DHV_p), 128)
        min_dhv = min(MIN_TILE, max_dhv)
        want_tiles = max(1, -(-_TARGET_PROGRAMS // BNH))
        block_dhv = max(min_dhv, min(max_dhv, _next_pow2(-(-DHV_p // want_tiles))))
    if block_dhqk is None:
        block_dhqk = min(_pow2_divisor(DHQK_p), max(MIN_TILE, _TILE_ELEMENTS // block_dhv))
    if num_warps is None:
        num_warps = 4 if block_dhqk * block_dhv <= _TILE_ELEMENTS else 8
    if num_stages is None:
        num_stages = 1  # no loop for Triton to pipeline: the DHQK loop is unrolled
    return StepTiling(DHQK_p, DHV_p, block_dhqk, block_dhv, num_warps, num_stages)


def launch_step(
    matC: jax.Array,  # (BNH, DHQK_p, DHV_p)
    vecN: jax.Array,  # (BNH, DHQK_p)
    scaM: jax.Array,  # (BNH,)
    vecQ: jax.Array,  # (BNH, DHQK_p)
    vecK: jax.Array,  # (BNH, DHQK_p)
    vecV: jax.Array,  # (BNH, DHV_p)
    scaI: jax.Array,  # (BNH,)
    scaF: jax.Array,  # (BNH,)
    *,
    tiling: StepTiling,
    h_dtype,
    qk_scale: float,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
    interpret: bool,
    max_state: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One ``pallas_call``: returns h (BNH, DHV_p) and the new matC (in place), vecN, scaM."""
    BNH, DHQK_p, DHV_p = matC.shape
    bV = tiling.siz_b_DHV
    acc_dtype = jnp.promote_types(matC.dtype, jnp.float32)
    kernel = functools.partial(
        mlstm_step_kernel,
        siz_b_DHQK=tiling.siz_b_DHQK,
        qk_scale=float(qk_scale),
        eps=float(eps),
        norm_val=float(norm_val),
        stabilize_correctly=bool(stabilize_correctly),
        acc_dtype=acc_dtype,
        max_state=bool(max_state),
    )
    spec_C = pl.BlockSpec((None, DHQK_p, bV), lambda b, j: (b, 0, j))
    spec_QK = pl.BlockSpec((None, DHQK_p), lambda b, j: (b, 0))
    spec_V = pl.BlockSpec((None, bV), lambda b, j: (b, j))
    spec_scalar = pl.BlockSpec((None,), lambda b, j: (b,))
    return pl.pallas_call(
        kernel,
        grid=(BNH, tiling.num_tiles_DHV),
        in_specs=[spec_C, spec_QK, spec_scalar, spec_QK, spec_QK, spec_V, spec_scalar, spec_scalar],
        out_specs=[spec_V, spec_C, spec_QK, spec_scalar],
        out_shape=[
            jax.ShapeDtypeStruct((BNH, DHV_p), h_dtype),
            jax.ShapeDtypeStruct(matC.shape, matC.dtype),
            jax.ShapeDtypeStruct(vecN.shape, vecN.dtype),
            jax.ShapeDtypeStruct(scaM.shape, scaM.dtype),
        ],
        input_output_aliases={0: 1},
        compiler_params=_triton.compiler_params(tiling.num_warps, tiling.num_stages),
        interpret=interpret,
        name="mlstm_recurrent_step",
    )(matC, vecN, scaM, vecQ, vecK, vecV, scaI, scaF)
