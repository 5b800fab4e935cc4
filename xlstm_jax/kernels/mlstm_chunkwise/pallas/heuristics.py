"""Default kernel parameters of the Pallas chunkwise (TFLA) kernels: one documented function.

Notation (see ``xlstm_jax.kernels._common``): S sequence length, DHQK / DHV head dims, L chunk size.

Every parameter has a default from ``chunkwise_kernel_params`` (by head dims, S and dtype) and every
one can be overridden from the public API (``mlstm_chunkwise_pallas(..., siz_b_L_loop=32)``, the
``chunkwise_pallas`` registry options, the seed entry points). ``mlstm_chunkwise_pallas`` first
looks for a tuned entry of this device and shape (``tuning``; explicit > tuned > these defaults).

Parameters and what they tile:

    chunk_size_intra   L, the chunk of the parallel (intra-chunk) kernels; states are kept at its borders
    chunk_size_inter   the step (in time) of the recurrent kernels: each loop iteration folds
                       chunk_size_inter steps into the state with one matrix product; a divisor of L
    siz_b_L_parallel   query rows per program of the parallel kernels (fw h, bw dQ); key rows per
                       program of the bw dK/dV kernels
    siz_b_L_loop       rows per iteration of the parallel kernels' loop (keys in fw/dQ, queries in dK/dV)
    siz_b_DH_parallel  output head-dim tile per program: DHV for h and dV, DHQK for dQ and dK
    siz_b_DH_loop      tile of the contracted head dim inside the loops (DHQK for q.k, DHV for dh.v)
    siz_b_DHQK_inter,  head-dim tiles of one program of the recurrent kernels (the state tile it owns)
    siz_b_DHV_inter
    num_warps_*, num_stages_*   Triton launch parameters of the intra (parallel) and inter
                       (recurrent) kernels

All sizes are powers of two and at least 16 (Triton's dot needs every dimension >= 16); head-dim
tiles larger than the (padded) head dim are clamped to it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ...chunking import MIN_PALLAS_CHUNK, default_intra_chunk, fit_chunk_size, next_power_of_two
from ...chunking import is_power_of_two as _is_pow2
from ...chunking import validate_chunk_size

MIN_BLOCK = MIN_PALLAS_CHUNK


def padded_head_dim(d: int) -> int:
    """Head dims are padded with zeros to a power of two >= 16 inside the kernels."""
    return max(MIN_BLOCK, next_power_of_two(d))


@dataclasses.dataclass(frozen=True)
class ChunkwiseKernelParams:
    """Every tile / launch parameter of the kernel family (hashable: a static jit argument)."""

    chunk_size_intra: int
    chunk_size_inter: int
    siz_b_L_parallel: int
    siz_b_L_loop: int
    siz_b_DH_parallel: int
    siz_b_DH_loop: int
    siz_b_DHQK_inter: int
    siz_b_DHV_inter: int
    num_warps_intra: int
    num_warps_inter: int
    num_stages_intra: int
    num_stages_inter: int
    # variant options (issue 9, "a backward that does less"); the defaults are the original paths
    m_scan: str = "associative"
    gates_impl: str = "xla"
    gate_grads_impl: str = "xla"
    states_bf16: bool = False
    save_gates: bool = False
    fuse_dkdv: bool = False

    def tile(self, name: str, dim: int) -> int:
        """Head-dim tile ``name`` clamped to the (padded) head dim ``dim``."""
        return min(getattr(self, name), dim)


OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ChunkwiseKernelParams))

VARIANT_CHOICES = {
    "m_scan": ("associative", "linear"),
    "gates_impl": ("xla", "pallas", "fused", "kernel"),
    "gate_grads_impl": ("xla", "pallas", "fused", "kernel"),
    "states_bf16": (False, True),
    "save_gates": (False, True),
    "fuse_dkdv": (False, True),
}
"""The variant options and their values (the first is the default).

* m_scan: the max-state scan over the sequence, ``"associative"`` (one associative scan over S)
  or ``"linear"`` (associative inside each chunk, a sequential ``lax.scan`` over the chunk borders).
* gates_impl: the forward gate vectors from m (``gates.kernel_gates``) in XLA or in one Pallas
  kernel per (batch, head) row (``gate_kernels.py``); ``"fused"``: the m scan and the gate vectors
  together in one Pallas launch, one program per row walking its chunks (``gate_kernels.
  fused_gate_vectors``; ``m_scan`` is then unused in the forward pass; the backward pass, which has
  m, recomputes the vectors with the ``"pallas"`` kernel).
  ``"kernel"``: the m recurrence and every gate vector inside the recurrent forward kernel, chunk by
  chunk with associative scans on the chunk's vectors (``gate_kernels.chunk_gates_scanned``,
  ``fw_recurrent.recurrent_fw_gated_kernel``; ``chunk_size_inter`` = ``chunk_size_intra``): the
  forward pass has no XLA gate preparation (two kernel launches), and the vectors are residuals for
  the backward pass. Meant for short sequences of small heads, where the forward is launch-bound;
  it adds the gate arithmetic to the recurrent kernel's serial walk over the chunks. The sigmoid
  cell (m == 0) keeps the XLA gates.
* gate_grads_impl: the backward glue in XLA, or in Pallas: the state-decay inner products
  <dC_k, C_{k-1}> fused into the recurrent backward kernel and the per-chunk gate-gradient sums in a
  Pallas kernel (``gate_kernels.py``); ``"fused"``: as ``"pallas"``, and with exact gradients of the
  exponential cell the pull-back of the m cotangents through the m scan joins the gate-gradient
  kernel (``gate_kernels.fused_gate_gradients``: one launch instead of the XLA ``jax.vjp`` of the scan).
  ``"kernel"``: the gate gradients and (exact gradients, exponential cell) the m pull-back in one
  launch, one program per row walking its chunks in reverse with associative scans of the chunk's
  vectors (``gate_kernels.gate_gradients_scanned``); the decay terms stay the XLA reduction.
* save_gates: keep the forward pass's gate vectors (seven (B*NH, S) vectors, 28 bytes per step and
  head) for the backward pass instead of recomputing them there.
* fuse_dkdv: dK and dV from one kernel (``bw_parallel_dkdv``): the query tiles q, dh and the gate tile
  loaded / evaluated once for both; a program holds bLk x (DHQK + DHV) fp32 accumulators (meant for
  small heads).
* states_bf16: store the chunk-border states C and dC (not n) in the 16-bit kernel dtype that
  the parallel kernels' products take anyway (the recurrences still accumulate in float32; the last
  state and dC0 stay float32). No effect for float32 kernels.

Measured (2026-12-02, one H200, bf16, exact; docs/benchmarks.md): every ``gates_impl``,
``gate_grads_impl`` and ``fuse_dkdv`` value other than the default is slower at the small, standard
and 7B rows (the row kernels walk their chunks serially: 0.29 / 1.12 ms for the fused gate
vectors at the small / standard row; the decay products add 0.04 / 0.42 ms to the recurrent
backward kernel against the 0.04 / 0.24 ms XLA reduction they replace), and ``save_gates`` gains
nothing measurable. They stay selectable and last in the tuner's search; the defaults are XLA.
The ``"kernel"`` values (2026-12-02, sixth session, same GPU): at the small row fw 0.665 -> 0.424 ms
(``gates_impl``) and fwbw 1.333 -> 1.192 ms (both), with ``states_bf16`` 0.361 / 1.209: the shipped
table uses them there; they are unmeasured at the standard and 7B heads (whose rows keep the XLA
gates).
"""


def variant_options(ov: dict) -> dict:
    """The values of the variant options in ``ov`` (defaults for those not given), each checked
    against ``VARIANT_CHOICES``: ``ValueError`` naming the option otherwise."""
    out = {}
    for name, choices in VARIANT_CHOICES.items():
        value = ov.get(name, choices[0])
        if isinstance(choices[0], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool; got {value!r}")
        elif value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
        out[name] = value
    return out


def chunkwise_kernel_params(
    *,
    S: int,
    DHQK: int,
    DHV: int,
    dtype,
    chunk_size: int | None = None,
    **overrides: int | None,
) -> ChunkwiseKernelParams:
    """The kernel parameters for sequence length ``S``, head dims ``DHQK``/``DHV``, kernel ``dtype``.

    ``chunk_size`` (if given) is the target intra chunk; ``overrides`` (names of
    ``ChunkwiseKernelParams`` fields; ``None`` means "use the default") replace single defaults.
    Raises ``ValueError`` for an unknown name or a size that is not a power of two >= 16 or does
    not divide what it tiles.

    Defaults (head dims are first padded to powers of two >= 16):

    * chunk_size_intra: ``chunk_size`` or ``chunking.default_intra_chunk(dtype)`` (128 for 16-bit
      kernels, the TFLA choice: bigger chunks mean fewer materialised states; 64 for float32),
      fitted to S by ``chunking.fit_chunk_size`` (never more than the padded sequence needs).
    * chunk_size_inter: min(chunk_size_intra, 128).
    * siz_b_L_parallel = min(128, chunk_size_intra) for 16-bit kernels with DHQK <= 256 and
      DHV <= 512 (one program per intra chunk and head tile: the chunk's state is read once;
      measured 30% faster backward kernels than 64 on an H200 at the standard workload; at the
      7B heads (8, 256, 512), B x S = 8 x 8192, bf16, exact: 4.37 / 14.90 ms fw / fwbw against
      5.22 / 18.44 ms with 64, H200, JAX 0.11.2, 2026-12-01, a one-option sweep),
      min(64, ...) otherwise (float32, and head dims above the measured ones: unmeasured, chosen
      for shared memory);
      siz_b_L_loop = min(64, chunk_size_intra).
    * siz_b_DH_parallel = 128, siz_b_DH_loop = 128 (clamped per kernel to the head dim they tile).
    * siz_b_DHQK_inter = 128 for 16-bit kernels up to S = 8192 (bigger products per step: the
      recurrent kernels ran 35% faster than with 64 at S = 8192), else 64 (more programs for the
      few (batch, head) pairs of long sequences, and smaller fp32 tiles); siz_b_DHV_inter = 128.
    * num_warps_intra: 8 when a program's output tile has >= 64*128 elements, else 4;
      num_warps_inter: 8 for a >= 64*128 state tile, else 4; num_stages: 2, but 1 for float32
      and for the intra kernels with DHQK > 128 or DHV > 256 (Triton double-buffers the loop's
      loads in shared memory: 2 stages of 128-row tiles at DHQK = 256 asked for 320 KB on an H200,
      which has 227 KB).
    """
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown kernel parameter(s) {unknown}; valid: {list(OVERRIDABLE)}")
    if S < 1 or DHQK < 1 or DHV < 1:
        raise ValueError(f"need S, DHQK, DHV >= 1; got S={S}, DHQK={DHQK}, DHV={DHV}")
    DHQK, DHV = padded_head_dim(DHQK), padded_head_dim(DHV)
    is_fp32 = jnp.dtype(dtype) == jnp.float32
    ov = {k: v for k, v in overrides.items() if v is not None}

    if "chunk_size_intra" in ov:
        L = validate_chunk_size("chunk_size_intra", ov["chunk_size_intra"], pallas=True, S=S)
    elif chunk_size is not None:
        L = validate_chunk_size("chunk size (chunk_size_intra)", chunk_size, pallas=True, S=S)
    else:
        L = default_intra_chunk(dtype)
    L = fit_chunk_size(L, S, pallas=True)
    variants = variant_options(ov)
    # gates_impl="kernel": the recurrent kernel folds each chunk in with one product (its weights
    # stay in registers), so the inter chunk is the intra chunk
    in_kernel_gates = variants["gates_impl"] == "kernel"
    L_inter = ov.get("chunk_size_inter", L if in_kernel_gates else min(L, 128))
    L_inter = min(L_inter, L) if _is_pow2(L_inter) else L_inter
    if in_kernel_gates and L_inter != L:
        raise ValueError(f"gates_impl='kernel' needs chunk_size_inter == chunk_size_intra ({L}); got {L_inter}")
    big_heads = DHQK > 128 or DHV > 256  # larger tiles than the standard heads
    huge_heads = DHQK > 256 or DHV > 512  # larger than the 7B heads: unmeasured
    b_par = ov.get("siz_b_L_parallel", min(64 if (is_fp32 or huge_heads) else 128, L))
    b_loop = ov.get("siz_b_L_loop", min(64, L))
    b_par = min(b_par, L) if _is_pow2(b_par) else b_par
    b_loop = min(b_loop, L) if _is_pow2(b_loop) else b_loop
    dh_par = ov.get("siz_b_DH_parallel", 128)
    dh_loop = ov.get("siz_b_DH_loop", 128)
    dqk_inter = ov.get("siz_b_DHQK_inter", 128 if (S <= 8192 and not is_fp32) else 64)
    dv_inter = ov.get("siz_b_DHV_inter", 128)

    sizes = dict(
        chunk_size_inter=L_inter, siz_b_L_parallel=b_par, siz_b_L_loop=b_loop,
        siz_b_DH_parallel=dh_par, siz_b_DH_loop=dh_loop,
        siz_b_DHQK_inter=dqk_inter, siz_b_DHV_inter=dv_inter,
    )
    for name, value in sizes.items():
        if not _is_pow2(value) or value < MIN_BLOCK:
            raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}; got {value!r}")
    for name in ("chunk_size_inter", "siz_b_L_parallel", "siz_b_L_loop"):
        if L % sizes[name]:
            raise ValueError(f"{name}={sizes[name]} must divide chunk_size_intra={L}")

    out_tile = b_par * min(dh_par, DHV)
    state_tile = min(dqk_inter, DHQK) * min(dv_inter, DHV)
    launch = dict(
        num_warps_intra=ov.get("num_warps_intra", 8 if out_tile >= 64 * 128 else 4),
        num_warps_inter=ov.get("num_warps_inter", 8 if state_tile >= 64 * 128 else 4),
        num_stages_intra=ov.get("num_stages_intra", 1 if (is_fp32 or big_heads) else 2),
        num_stages_inter=ov.get("num_stages_inter", 1 if is_fp32 else 2),
    )
    for name, value in launch.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if not _is_pow2(launch["num_warps_intra"]) or not _is_pow2(launch["num_warps_inter"]):
        raise ValueError(f"num_warps must be a power of two; got {launch}")
    return ChunkwiseKernelParams(chunk_size_intra=L, **sizes, **launch, **variants)
