"""The Mosaic GPU chunkwise family: the forward intra-chunk kernel and (``bw_kernels="mosaic"``,
the default) the parallel backward kernels on Mosaic GPU (``bw_parallel_dv``, ``bw_parallel_dk``,
``bw_parallel_dq``); the state recurrences, forward and backward, are the Triton family's kernels
(with ``bw_kernels="triton"`` the whole backward is).

``mlstm_chunkwise_mosaic`` has the signature and options of ``mlstm_chunkwise_pallas``
(``xlstm_jax.kernels.mlstm_chunkwise.pallas``) and computes the same function with the same
gradients. Forward pass:

1. validation (once: ``segment_ids`` become f = -inf at document starts, the sigmoid input gate
   becomes log_sigmoid(i) with the initial state folded to m = 0), casting, flattening and
   padding (the Triton family's ``autodiff.prepare``), with the sequence padded further to a
   multiple of 64 (open forget gates, closed input gates, zero q/k/v: the state carries through
   unchanged, exact) and the head dims to multiples of 64 (zero columns, exact): the Mosaic
   kernel's tiles are 64 rows and 64-element swizzled columns;
2. the m scan (m == 0 for the sigmoid cell), the gate vectors and the chunk-border states C_k,
   n_k: the Triton family's ``autodiff.forward_states`` (XLA or Pallas gates, the Triton
   recurrent kernel ``fw_recurrent``; ``m_scan``, ``gates_impl``, ``states_bf16`` as there);
3. O(S) per-query vectors in XLA: the state weight W_t, the lower bound lam_t (norm_val exp(-m_t),
   i.e. norm_val for the sigmoid cell), the chunk-relative reset starts, and the entering states
   cast to the kernel dtype (the wgmma operand type; the Triton kernel casts the same tile in
   registers);
4. h and the signed normaliser nq_t = qs_t . n_t from the Mosaic GPU kernel
   ``fw_parallel.parallel_fw_h_mosaic``, which also computes the inter-chunk normaliser term
   W_t qs_t . n_{k-1} from its q tile and the float32 border state n_{k-1}.

Backward pass (``jax.custom_vjp``): the residuals and the backward of the Triton family
(``autodiff.forward_residuals`` / ``backward_from_residuals``: the recurrent backward kernel, the
dQ, dK, dV kernels, the gate-gradient sums and, in exact mode, the m pull-back; with
``bw_kernels="mosaic"``, the default, the parallel kernels of ``mosaic_bw_fns``), so
``grad_mode``, ``recompute_states_in_bw``, ``states_bf16`` and ``gate_grads_impl`` act as in
``chunkwise_pallas``. The residual nq_t is written by the Mosaic kernel (its programs of DHV tile
0 store the 64 values they hold anyway: BH * S * 4 bytes, under 1% of h's traffic) rather than
recomputed in XLA: the intra-chunk part sum_s P_ts needs the (L, L) products q k^T of every chunk
again (a third of the forward kernel's FLOPs, and an (BH, NC, L, L) f32 array), and a running
per-step n_t would need exp(i_s - b_s) and exp(b_t - m_t) separately, which overflow where their
product does not.

Kernel dtypes: bfloat16 and float16 (wgmma operands). float32 inputs need
``autocast_kernel_dtype="bfloat16"`` (or float16); a float32 kernel (tf32 wgmma) is not written
yet and raises ``NotImplementedError``. h is written in the kernel dtype and cast to
``output_dtype``. Mosaic GPU runs on Hopper GPUs only; elsewhere a call raises ``RuntimeError``
unless ``interpret=True`` (Mosaic GPU's CPU interpret mode, the Triton kernels interpreted; tiny
shapes only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..._common import MLSTMState
from ...options import CellOptions
from ...validation import empty_sequence_outputs, validate_sequence_call
from ..pallas import gates, tuning
from ..pallas.heuristics import padded_head_dim
from ..pallas.autodiff import (
    CoreConfig,
    ForwardOut,
    backward_from_residuals,
    core_config,
    forward_residuals,
    forward_states,
    h_kernel_dtype,
    kernel_dtype_of,
    prepare,
)
from . import bw_parallel_dk, bw_parallel_dq, bw_parallel_split
from .bw_parallel_dv import parallel_bw_dv_mosaic
from .fw_parallel import BLOCK, _mosaic, block_rows, block_starts, check_slots, parallel_fw_h_mosaic, smem_bytes

KERNEL_NAME = "chunkwise_mosaic"
_F32 = jnp.float32

MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
DEFAULT_BV = 128
"""DHV tile of one program (register budget: two 64 x bV f32 accumulators in one warpgroup)."""

BW_KERNELS = tuning.MOSAIC_BW_KERNELS
"""The values of ``bw_kernels`` (defined beside the tuned tables, which record it): the parallel
backward kernels on Mosaic GPU (``mosaic_bw_fns``; the recurrent backward stays Triton), the
backward pass's kernels all Triton, or the Mosaic kernels with dQ and dK split around one
score-gradient kernel (``bw_parallel_split``). Without one the call takes ``default_bw_kernels``:
the Mosaic kernels were faster than the Triton ones at every row of the first GPU run
(2026-12-02, H200: fwbw 4-15% at the standard and 7B heads, 18% at the small heads), the split
ones where DHQK is tiled."""
SMEM_PER_SM = 227 * 1024
"""Shared memory one SM gives its resident programs (H100 / H200)."""


def default_pipeline_slots(DQ: int, bV: int) -> int:
    """``pipeline_slots`` when a call gives none, at the padded DHQK ``DQ`` and the DHV tile ``bV``:
    1 where one slot lets two programs share an SM and two slots do not
    (``fw_parallel.smem_bytes``: the standard heads, DQ 128 and bV 128), else 2. Measured on an
    H200 (2026-12-02, 8 x 8192, docs/benchmarks.md): at the standard heads the forward kernel
    0.994 -> 0.794 ms and dV 1.021 -> 0.822 ms with one slot; at the 7B heads (one program per SM
    either way) one slot was slower (fw 3.01 -> 3.42 ms, fwbw 9.67 -> 10.04)."""
    two = smem_bytes(DQ, bV, 2) <= SMEM_PER_SM // 2
    one = smem_bytes(DQ, bV, 1) <= SMEM_PER_SM // 2
    return 1 if one and not two else 2


def default_pipeline_slots_for(DHQK: int, DHV: int, siz_b_DH_parallel: int | None = None) -> int:
    """``default_pipeline_slots`` of a call with head dims DHQK, DHV (padded as the call pads them)
    and the DHV tile ``siz_b_DH_parallel`` (None: ``DEFAULT_BV``)."""
    DQ = _round_up(padded_head_dim(DHQK), 64)
    DV = _round_up(padded_head_dim(DHV), 64)
    return default_pipeline_slots(DQ, min(siz_b_DH_parallel or DEFAULT_BV, DV))

_OPEN_FORGET_GATE = 1e30  # log_sigmoid(1e30) == 0 exactly: the state carries through


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x: jax.Array, axis: int, size: int, value: float) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def default_bw_kernels(DQ: int, DV: int, *, fuse_dkdv: bool) -> str:
    """``bw_kernels`` when the call gives none, at the padded head dims DQ, DV: ``"triton"`` with
    ``fuse_dkdv`` (the fused Triton dK-dV kernel); ``"mosaic_split"`` where the Mosaic dK and dQ
    kernels would split DHQK into several tiles, each recomputing the DHV-deep score gradient (the
    7B heads: fwbw 10.16 -> 9.36 ms at 8 x 8192, H200, 2026-12-02), or do not fit; else
    ``"mosaic"`` (one DHQK tile, nothing recomputed: at the standard heads the split kernels were
    slower, 6.08 -> 6.31 ms, and equal at the small heads)."""
    if fuse_dkdv:
        return "triton"
    one_tile = bw_parallel_dk.fits(DQ, DV) and bw_parallel_dk.default_bK(DQ, DV) == DQ
    return "mosaic_split" if not one_tile and bw_parallel_split.fits(DQ, DV) else "mosaic"


def _fixed_options(options: dict) -> None:
    """``ValueError`` for Triton intra-kernel options the one-warpgroup Mosaic kernel fixes."""
    fixed = {"siz_b_L_parallel": BLOCK, "siz_b_L_loop": BLOCK}
    for name, value in options.items():
        if value is None:
            continue
        if name in fixed and value != fixed[name]:
            raise ValueError(
                f"{KERNEL_NAME}: {name} must be {fixed[name]} or None (64-row query and key blocks); "
                f"got {value!r}"
            )
        if name in ("siz_b_DH_loop", "num_warps_intra", "num_stages_intra"):
            raise ValueError(
                f"{KERNEL_NAME}: {name} is a Triton launch option of chunkwise_pallas' intra kernel; "
                f"the Mosaic kernel (one warpgroup, whole DHQK per wgmma) takes none; got {value!r}"
            )


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Static (hashable) options of one call: the Triton family's ``CoreConfig`` (gates, states,
    the backward pass) plus the Mosaic kernel's DHV tile and interpret flag."""

    core: CoreConfig
    bV: int
    interpret_mosaic: bool
    bw_kernels: str = BW_KERNELS[0]
    """``"mosaic"`` / ``"mosaic_split"``: the Mosaic parallel backward kernels of
    ``mosaic_bw_fns``; ``"triton"``: every backward kernel the Triton family's."""
    slots: int = 2
    """Shared-memory buffers of the streamed tiles of the forward and dV kernels
    (``fw_parallel.PIPELINE_SLOTS``; the ``pipeline_slots`` option, ``default_pipeline_slots``)."""


def forward_padded(q, k, v, i, logf, C0, n0, m0, cfg: MosaicConfig) -> ForwardOut:
    """The forward pass on padded, flattened arrays: the Triton family's ``ForwardOut``.

    q, k (BH, S, DQ), v (BH, S, DV) in the kernel dtype with S a multiple of the chunk L and DQ,
    DV multiples of 64; i, logf (BH, S), C0 (BH, DQ, DV), n0 (BH, DQ), m0 (BH,) float32. h is in
    the kernel dtype; vecNq (the backward pass's residual) comes from the Mosaic kernel.
    """
    c = cfg.core
    L = c.params.chunk_size_intra
    BH, S, DQ = q.shape
    nQB = S // BLOCK
    # the m scan (m == 0 for the sigmoid cell), gate vectors and border states: the Triton family's
    vecM, g, matC_states, vecN_states, matC_last = forward_states(k, v, i, logf, C0, n0, m0, c)
    # per-query vectors (XLA, O(S)): the state weight and the normaliser's lower bound; the state
    # term of the normaliser, W_t qs_t . n_{k-1}, is the kernel's (it has the q tile; an XLA einsum
    # here read all of q once more: 0.073 ms at the standard heads, 8 x 8192, H200)
    vecW = g.vecWinter * c.qk_scale
    vecLam = gates.normalizer_lower_bound(
        vecM, norm_val=c.norm_val, stabilize_correctly=c.stabilize_correctly
    )
    rows = block_rows(g.vecQlog, vecW, vecLam)  # (BH, nQB, 3, 64)
    start = block_starts(g.vecStart, L)
    klog = g.vecKlog.reshape(BH, nQB, BLOCK)
    # the kernel reads C_{k-1} of chunk k from the (BH, NC + 1, DQ, DV) border states directly
    # (row k of k = 0..NC-1; the last row is never read): slicing [:, :NC] first cost an XLA copy
    # of the whole state array (0.32 ms at the standard heads, 8 x 8192)
    matC_enter = matC_states.astype(q.dtype)  # a no-op with states_bf16
    matH, vecNq = parallel_fw_h_mosaic(
        q, k, v, rows.astype(_F32), start, klog.astype(_F32), matC_enter, vecN_states,
        L=L, bV=cfg.bV, qk_scale=c.qk_scale, eps=c.eps, interpret=cfg.interpret_mosaic, slots=cfg.slots,
    )
    return ForwardOut(matH, vecNq, vecM, matC_states, vecN_states, g.scaM_borders, matC_last, g)


def _primal_outputs(out: ForwardOut):
    return out.matH, out.matC_last, out.vecN_states[:, -1], out.scaM_borders[:, -1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _forward(q, k, v, i, logf, C0, n0, m0, cfg: MosaicConfig):
    return _primal_outputs(forward_padded(q, k, v, i, logf, C0, n0, m0, cfg))


def _forward_fwd(q, k, v, i, logf, C0, n0, m0, cfg: MosaicConfig):
    out = forward_padded(q, k, v, i, logf, C0, n0, m0, cfg)
    return _primal_outputs(out), forward_residuals((q, k, v, i, logf, C0, n0, m0), out, cfg.core)


def _forward_bwd(cfg: MosaicConfig, res, cts):
    """The Triton family's backward pass (kernels and gate pull-backs) on the Mosaic residuals,
    with ``bw_kernels="mosaic"`` the Mosaic parallel kernels of ``mosaic_bw_fns`` in place of the
    Triton ones (residuals 0 and 2 are the padded q and v)."""
    bw_fns = mosaic_bw_fns(cfg, res[0].shape[-1], res[2].shape[-1])
    return backward_from_residuals(cfg.core, res, cts, bw_fns=bw_fns)


def mosaic_bw_fns(cfg: MosaicConfig, DQ: int, DV: int) -> dict:
    """The Mosaic backward kernels that replace Triton ones (``chunkwise_backward``'s ``bw_fns``)
    for ``cfg.bw_kernels`` at the padded head dims DQ, DV: dV always with ``"mosaic"`` and
    ``"mosaic_split"``; dK and dQ where their tiles fit in shared memory (``bw_parallel_dk.fits``,
    ``bw_parallel_dq.fits``: at the standard, 7B and small heads), else the Triton ones; with
    ``"mosaic_split"`` dQ and dK from one score-gradient kernel and two thin product kernels
    (``bw_parallel_split``) where they fit, else as ``"mosaic"``."""
    if cfg.bw_kernels not in ("mosaic", "mosaic_split"):
        return {}
    c = cfg.core
    L = c.params.chunk_size_intra
    fns = {"dv": functools.partial(parallel_bw_dv_mosaic, L=L, bV=cfg.bV, qk_scale=c.qk_scale,
                                   interpret=cfg.interpret_mosaic, slots=cfg.slots)}
    if cfg.bw_kernels == "mosaic_split" and bw_parallel_split.fits(DQ, DV):
        fns["dqdk"] = functools.partial(bw_parallel_split.parallel_bw_dqdk_split_mosaic, L=L,
                                        qk_scale=c.qk_scale, interpret=cfg.interpret_mosaic)
        return fns
    if bw_parallel_dk.fits(DQ, DV):
        fns["dk"] = functools.partial(bw_parallel_dk.parallel_bw_dk_mosaic, L=L, qk_scale=c.qk_scale,
                                      interpret=cfg.interpret_mosaic)
    if bw_parallel_dq.fits(DQ, DV):
        fns["dq"] = functools.partial(bw_parallel_dq.parallel_bw_dq_mosaic, L=L, qk_scale=c.qk_scale,
                                      interpret=cfg.interpret_mosaic)
    return fns


_forward.defvjp(_forward_fwd, _forward_bwd)


def mlstm_chunkwise_mosaic(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    vecF: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    *,
    return_last_states: bool = False,
    qk_scale: float | None = None,
    eps: float = 1e-6,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
    input_gate: str = "exp",
    segment_ids: jax.Array | None = None,  # (B, S) integers: packed documents
    cell_options: CellOptions | None = None,
    chunk_size: int | None = None,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    siz_b_DHQK_inter: int | None = None,
    siz_b_DHV_inter: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    autocast_kernel_dtype=None,
    output_dtype=None,
    recompute_states_in_bw: bool | None = None,
    tuned: bool | None = None,
    interpret: bool | None = None,
    m_scan: str | None = None,
    gates_impl: str | None = None,
    gate_grads_impl: str | None = None,
    states_bf16: bool | None = None,
    save_gates: bool | None = None,
    fuse_dkdv: bool | None = None,
    bw_kernels: str | None = None,
    pipeline_slots: int | None = None,
):
    """Chunkwise mLSTM with the Mosaic GPU intra-chunk forward kernel, differentiable.

    Same arguments, options and outputs as ``mlstm_chunkwise_pallas``: ``h`` (B, NH, S, DHV) in
    ``output_dtype`` (default: the dtype of q), with ``return_last_states`` also
    ``MLSTMState(matC, vecN, scaM)`` in float32; ``segment_ids`` (packed documents) and
    ``input_gate="sigmoid"`` are applied by the validation layer like in every kernel (the sigmoid
    cell runs with m held at 0). Gradients (``jax.custom_vjp``) flow to q, k, v, i, f and the
    initial states through the Triton family's backward kernels, ``grad_mode`` exact or tfla.

    Differences from ``chunkwise_pallas``: the chunk (``chunk_size`` / ``chunk_size_intra``,
    default 128) must be a multiple of 64; ``siz_b_L_parallel`` and ``siz_b_L_loop`` are fixed at
    64 (the forward kernel's query and key blocks); ``siz_b_DH_parallel`` (default 128) is the DHV
    tile of a forward program, a multiple of 64 dividing the padded DHV; ``siz_b_DH_loop``,
    ``num_warps_intra`` and ``num_stages_intra`` are Triton launch options of the intra kernels
    (``ValueError`` if given): the Triton backward kernels take their intra tiles from the tuned
    tables (``tuned``) or the heuristics. The recurrent (``*_inter``) options and the variant
    options (``m_scan``, ``gates_impl``, ``gate_grads_impl``, ``states_bf16``) and
    ``recompute_states_in_bw`` act as in ``chunkwise_pallas`` (the recurrence and the backward
    are its kernels). ``bw_kernels`` (this family only): ``"mosaic"`` runs the parallel backward
    kernels on Mosaic GPU (dV always; dK and dQ where their
    tiles fit in shared memory, up to DHV 512 with DHQK tiles of 64; designs in the kernels'
    docstrings), the recurrent backward still Triton; ``"triton"`` runs every backward kernel of
    the Triton family; ``"mosaic_split"`` computes the gated score gradient of each block pair once
    for both dQ and dK (``bw_parallel_split``: an extra (B*NH, S, chunk) 16-bit array). None (the
    default): ``default_bw_kernels`` ("mosaic_split" at the 7B heads, "mosaic" at the standard and
    small heads, "triton" with ``fuse_dkdv``). ``bw_kernels="mosaic"`` or ``"mosaic_split"`` with
    ``fuse_dkdv`` is a ``ValueError``. ``save_gates`` and
    ``fuse_dkdv`` act as in ``chunkwise_pallas``. The kernel dtype must be bfloat16 or float16
    (``NotImplementedError`` for float32: no tf32 kernel yet). ``interpret``: None or False compile (an NVIDIA Hopper GPU,
    else ``RuntimeError``); True runs Mosaic GPU's interpret mode and the Triton kernels
    interpreted (CPU).
    """
    call = validate_sequence_call(
        KERNEL_NAME, matQ, matK, matV, vecI, vecF, c_initial, n_initial, m_initial,
        segment_ids=segment_ids, cell_options=cell_options, qk_scale=qk_scale, eps=eps,
        norm_val=norm_val, stabilize_correctly=stabilize_correctly, grad_mode=grad_mode,
        input_gate=input_gate,
    )
    _fixed_options(dict(
        siz_b_L_parallel=siz_b_L_parallel, siz_b_L_loop=siz_b_L_loop, siz_b_DH_loop=siz_b_DH_loop,
        num_warps_intra=num_warps_intra, num_stages_intra=num_stages_intra,
    ))
    kd = kernel_dtype_of(autocast_kernel_dtype, matQ.dtype)
    h_kernel_dtype(output_dtype, matQ.dtype)  # validates output_dtype
    out_dtype = jnp.dtype(matQ.dtype if output_dtype is None else output_dtype)
    if call.empty:  # B == 0 or NH == 0: empty outputs on every machine, like every kernel
        return empty_sequence_outputs(
            call, h_dtype=out_dtype, state_dtype=_F32, return_last_states=return_last_states
        )
    if kd not in MOSAIC_DTYPES:
        raise NotImplementedError(
            f"{KERNEL_NAME}: kernel dtype {kd.name} is not implemented (wgmma on bfloat16/float16 "
            f"only; a tf32 kernel is not written yet); pass autocast_kernel_dtype='bfloat16'"
        )
    L_req = chunk_size_intra if chunk_size_intra is not None else chunk_size
    if L_req is not None and (isinstance(L_req, bool) or not isinstance(L_req, int) or L_req < BLOCK
                              or L_req % BLOCK):
        raise ValueError(
            f"{KERNEL_NAME}: the chunk (chunk_size_intra or chunk_size) must be a multiple of {BLOCK}; "
            f"got {L_req!r}"
        )
    if siz_b_DH_parallel is not None and (
        isinstance(siz_b_DH_parallel, bool) or not isinstance(siz_b_DH_parallel, int)
        or siz_b_DH_parallel < 64 or siz_b_DH_parallel % 64
    ):
        raise ValueError(
            f"{KERNEL_NAME}: siz_b_DH_parallel (the DHV tile) must be a positive multiple of 64; "
            f"got {siz_b_DH_parallel!r}"
        )
    if pipeline_slots is not None:
        check_slots(KERNEL_NAME, pipeline_slots)
    if bw_kernels not in (None,) + BW_KERNELS:
        raise ValueError(f"{KERNEL_NAME}: bw_kernels must be one of {list(BW_KERNELS)} or None; got {bw_kernels!r}")
    interpret_mosaic = bool(interpret)
    _mosaic().check_backend(KERNEL_NAME, interpret_mosaic)

    # 1. pad S to a multiple of 64 with neutral steps (on the validated gates: log_sigmoid of a
    #    sigmoid input gate and the segment resets are applied once, by the validation above),
    #    then the Triton family's preparation
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    S64 = _round_up(S, BLOCK)
    pad_s = lambda x, val: _pad_axis(x, 2, S64, val)  # noqa: E731
    call64 = call._replace(
        vecI=pad_s(call.vecI, gates.CLOSED_INPUT_GATE), vecF=pad_s(call.vecF, _OPEN_FORGET_GATE),
        S=S64,
    )
    prep = prepare(
        call64, pad_s(matQ, 0.0), pad_s(matK, 0.0), pad_s(matV, 0.0), chunk_size=L_req,
        autocast_kernel_dtype=kd,
        tile_params=dict(
            chunk_size_inter=chunk_size_inter, siz_b_DHQK_inter=siz_b_DHQK_inter,
            siz_b_DHV_inter=siz_b_DHV_inter, num_warps_inter=num_warps_inter,
            num_stages_inter=num_stages_inter, m_scan=m_scan, gates_impl=gates_impl,
            gate_grads_impl=gate_grads_impl, states_bf16=states_bf16, save_gates=save_gates,
            fuse_dkdv=fuse_dkdv,
        ),
        call_options=dict(recompute_states_in_bw=recompute_states_in_bw),
        tuned=tuning.tuning_enabled(tuned),
    )
    L = prep.params.chunk_size_intra
    if L % BLOCK:  # only a tuned entry can give this (explicit chunks are checked above)
        raise ValueError(
            f"{KERNEL_NAME}: the resolved chunk {L} (from the tuned tables) is not a multiple of "
            f"{BLOCK}; pass chunk_size explicitly or tuned=False"
        )
    q, k, v, i, logf, C0, n0, m0 = prep.arrays
    DQ, DV = _round_up(q.shape[-1], 64), _round_up(v.shape[-1], 64)
    q, k = _pad_axis(q, 2, DQ, 0.0), _pad_axis(k, 2, DQ, 0.0)
    v = _pad_axis(v, 2, DV, 0.0)
    C0 = _pad_axis(_pad_axis(C0, 1, DQ, 0.0), 2, DV, 0.0)
    n0 = _pad_axis(n0, 1, DQ, 0.0)
    bV = min(siz_b_DH_parallel or DEFAULT_BV, DV)
    if DV % bV:
        raise ValueError(
            f"{KERNEL_NAME}: siz_b_DH_parallel={bV} must divide the padded DHV={DV} (DHV={DHV})"
        )
    if bw_kernels is None:
        bw_kernels = default_bw_kernels(DQ, DV, fuse_dkdv=prep.params.fuse_dkdv)
    if bw_kernels != "triton" and prep.params.fuse_dkdv:
        raise ValueError(
            f"{KERNEL_NAME}: bw_kernels={bw_kernels!r} (the Mosaic dK and dV kernels) and fuse_dkdv (dK and dV "
            f"from one Triton kernel) exclude each other; got fuse_dkdv=True (explicit or from the tuned table)"
        )
    cfg = MosaicConfig(
        core=core_config(
            prep, h_dtype=kd, recompute_states_in_bw=prep.call_options["recompute_states_in_bw"],
            interpret=True if interpret_mosaic else None,
        ),
        bV=bV, interpret_mosaic=interpret_mosaic, bw_kernels=bw_kernels,
        slots=default_pipeline_slots(DQ, bV) if pipeline_slots is None else pipeline_slots,
    )
    matH, matC_last, vecN_last, scaM_last = _forward(q, k, v, i, logf, C0, n0, m0, cfg)
    h = matH[:, :S, :DHV].reshape(B, NH, S, DHV).astype(out_dtype)
    if not return_last_states:
        return h
    return h, MLSTMState(
        matC_last[:, :DHQK, :DHV].reshape(B, NH, DHQK, DHV),
        vecN_last[:, :DHQK].reshape(B, NH, DHQK),
        scaM_last.reshape(B, NH),
    )
