"""Chunk sizes of the chunkwise kernels: the one place they are defaulted, fitted to S and validated.

Notation: S sequence length, L the intra chunk (the chunk of the parallel, intra-chunk part and the
spacing of the stored chunk-border states), ``chunk_size_inter`` the step of the recurrent kernel.

Rules (every kernel, backend and seed entry point uses these functions):

* ``chunkwise_native`` takes any positive int L and uses ``min(L, S)``.
* The Pallas kernels take powers of two >= ``MIN_PALLAS_CHUNK`` = 16 (Triton's dot needs every tile
  dimension >= 16) and use ``min(L, max(16, next_power_of_two(S)))``: never a chunk larger than the
  padded sequence needs. Without a chunk size they use ``default_intra_chunk(dtype)``: 128 for 16-bit
  kernels (the TFLA choice: fewer materialised states), 64 for float32 (float32 tiles take twice the
  shared memory; ``pallas.heuristics``).
* Two layouts of the seed entry points: ``"limit"`` (limit-chunk: intra chunk = recurrent step =
  chunk_size; seed 000 and the ``triton_stablef``/``max_triton``/``max_triton_noslice`` backends) and
  ``"xl"`` (TFLA "xl chunk size": recurrent step chunk_size, intra chunk
  ``max(chunk_size, XL_INTRA_CHUNK)`` = max(chunk_size, 128); seed family v5 and the
  ``max_triton_xlchunksize`` backend). The xl rule is the same for every dtype: the intra chunk only
  sets how many states are stored and how long the intra-chunk loops run, while the per-dtype
  shared-memory limits are met by the tile sizes (float32 tiles have 64 rows, ``pallas.heuristics``).
* ``reduce_slicing`` (seed 002): when S is not a multiple of the intra chunk, the largest power of
  two in [16, intra chunk] that divides S, so that no padding copies are made.
"""

from __future__ import annotations

import jax.numpy as jnp

MIN_PALLAS_CHUNK = 16
"""Smallest chunk / tile of the Pallas kernels (Triton's dot needs dimensions >= 16)."""
XL_INTRA_CHUNK = 128
"""Smallest intra chunk of the "xl" layout (TFLA: chunk 128 measured best)."""
LAYOUTS = ("limit", "xl")


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def is_power_of_two(x) -> bool:
    """Whether ``x`` is an int (not a bool) and a power of two."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and (x & (x - 1)) == 0


def validate_chunk_size(name: str, value, *, pallas: bool = False, S: int | None = None) -> int:
    """``value`` as a chunk size: a positive int, and for the Pallas kernels a power of two >= 16.

    Raises ``ValueError`` naming ``name`` (and S, if given).
    """
    where = "" if S is None else f" (sequence length S={S})"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}{where}")
    if pallas and (not is_power_of_two(value) or value < MIN_PALLAS_CHUNK):
        raise ValueError(f"{name} must be a power of two >= {MIN_PALLAS_CHUNK}; got {value!r}{where}")
    return value


def fit_chunk_size(L: int, S: int, *, pallas: bool = False) -> int:
    """The chunk actually used for sequence length S: never larger than the (padded) sequence."""
    if pallas:
        return min(L, max(MIN_PALLAS_CHUNK, next_power_of_two(S)))
    return min(L, S)


def default_intra_chunk(dtype) -> int:
    """The Pallas kernels' intra chunk when none is given: 64 for float32, else 128."""
    return 64 if jnp.dtype(dtype) == jnp.float32 else XL_INTRA_CHUNK


def dividing_chunk(chunk: int, S: int) -> int:
    """The largest power of two in [16, chunk] dividing S; ``chunk`` itself if there is none."""
    c = chunk
    while c >= MIN_PALLAS_CHUNK:
        if S % c == 0:
            return c
        c //= 2
    return chunk


def chunk_layout(chunk_size: int, layout: str, *, S: int | None = None, reduce_slicing: bool = False) -> tuple[int, int]:
    """(chunk_size_intra, chunk_size_inter) of a seed layout ("limit" or "xl", see module doc).

    With ``reduce_slicing`` and S not a multiple of the intra chunk, the intra chunk becomes
    ``dividing_chunk(intra, S)`` (and the recurrent step at most that).
    """
    validate_chunk_size("chunk_size", chunk_size, pallas=True)
    if layout not in LAYOUTS:
        raise ValueError(f"chunk layout must be one of {LAYOUTS}; got {layout!r}")
    inter = chunk_size
    intra = max(chunk_size, XL_INTRA_CHUNK) if layout == "xl" else chunk_size
    if reduce_slicing and S is not None and S % intra:
        intra = dividing_chunk(intra, S)
        inter = min(inter, intra)
    return intra, inter
