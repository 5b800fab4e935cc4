"""Forward parallel (intra-chunk) kernel in Mosaic GPU: h of one 64-row query block per program.

Notation (see ``xlstm_jax.kernels.mlstm_chunkwise.pallas.gates``): BH = B * NH, L the intra chunk
(a multiple of 64), BLOCK = 64 query rows per program = key rows per loop step, bV the DHV tile of
a program. For query t in chunk k (entering state C_{k-1}, n_{k-1} from the recurrent kernel):

    h_t = (W_t qs_t^T C_{k-1} + sum_{z_t <= s <= t} P_ts v_s) / (max(|nq_t|, lam_t) + eps)
    P_ts = (qs_t . k_s) exp2(vecQlog_t + vecKlog_s),   nq_t = nqInter_t + sum_s P_ts

with W_t = vecWinter_t (qs = q * qk_scale), nqInter_t = W_t qs_t . n_{k-1} (in the kernel, from the
q tile in shared memory and n_{k-1} in float32) and lam_t = norm_val exp(-m_t) (or norm_val)
computed in XLA (O(S), ``forward.py``); z_t the
latest reset <= t in the chunk (``vecStart``, passed chunk-relative).

Design (v1: simple and correct first; one warpgroup of 128 threads, no warp specialisation):

* Grid (DHV / bV, S / 64, BH), one CTA per (DHV tile, query block, batch*head). A program of query
  block b (block iq = b mod (L/64) inside chunk c) loops over the iq + 1 key blocks of its chunk
  up to the diagonal, so its work is the causal triangle of the chunk, like the Triton kernel.
* Shared memory (bf16/f16; every 2-D tile in the (8, 64) tiling with the 128-byte swizzle that
  wgmma reads without bank conflicts): the q block (64, DHQK) and the state tile C_{k-1}
  (DHQK, bV) loaded once by TMA; k (64, DHQK), v (64, bV) and the key gate vector in ``slots``
  buffers (``PIPELINE_SLOTS``): with 2 the TMA load of key block j + 1 overlaps the two wgmmas and
  the gate math of block j; with 1 it follows them; the output tile (64, bV); small f32/int32
  vectors and n_{k-1}. At DHQK = 128, bV = 128: 16 + 32 + 2 * (16 + 16) + 16 KB = 128 KB with two
  slots (one CTA per SM), 96 KB with one (two CTAs per SM: one's loads under the other's wgmmas;
  the default there, ``forward.default_pipeline_slots``); at DHQK = 256 (7B heads): 32 + 64 + 2 *
  (32 + 16) + 16 = 208 KB of the H200's 227 KB (one CTA per SM either way; 2 at DHQK = 64).
* The normaliser's inter-chunk term W_t qs_t . n_{k-1}: q from shared memory into registers (the
  wgmma layout, 64 columns at a time) times n_{k-1} (float32, one small TMA tile), row sums.
* First the inter-chunk term: acc = W_t * (q C_{k-1}) (wgmma from two shared-memory operands,
  64 x bV f32 accumulator = 64 registers per thread at bV = 128), the Triton kernel's order. Then
  per key block: S = q k^T (wgmma, 64 x 64 f32, 32 registers), the gate matrix
  exp2(Qlog_t + Klog_s) with the causal and reset masks, nq += row sums, and acc += P v (wgmma with
  P as a register operand in bf16/f16, 16 registers; ``pl.run_state`` over the carried
  accumulator, the idiom of JAX's FlashAttention-3 kernel, which also awaits the wgmma before the
  slot is refilled). Peak about 64 + 32 + 16 registers plus the broadcast gate/iota tiles and
  addresses: well inside one warpgroup's 255 at bV = 128 (bV = 256 would double acc to 128).
* Outputs: the h tile (64, bV) and the signed normaliser nq_t (64 f32 values, the residual the
  backward pass needs; every DHV tile computes it, the programs of tile 0 store it).
* The stabiliser m_t is an input (no online max, no rescaling), so blocks need no re-scaling
  and the loop has no dependency except the accumulator.
* Left for later (the Triton kernel's role model: FlashAttention 3): a producer warpgroup for TMA
  with consumer warpgroups (``emit_pipeline_warp_specialized``), two query blocks per CTA sharing
  each k/v tile, bV = DHV with two consumer warpgroups, the inter-chunk wgmma left in flight
  while the first key block's S is computed.

Everything Mosaic-specific comes from ``xlstm_jax.kernels.pallas._mosaic`` (imported lazily).
``interpret=True`` runs the kernel in Mosaic GPU's interpret mode on CPU (a simulation of TMA,
barriers and wgmma: checks the arithmetic and the synchronisation, not layouts or resources).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..pallas.tuning import MOSAIC_PIPELINE_SLOTS


BLOCK = 64
"""Query rows per program and key rows per loop step: one wgmma M tile of one warpgroup."""
N_ROWVECS = 3
"""Per-query vectors packed into one (3, 64) TMA tile: vecQlog, W * qk_scale, lam."""
_F32 = jnp.float32


def block_rows(*vectors: jax.Array) -> jax.Array:
    """(BH, S) vectors packed per 64-step block for one TMA tile each: (BH, S / 64, n, 64) f32."""
    BH, S = vectors[0].shape
    x = jnp.stack(vectors, axis=1).astype(_F32)  # (BH, n, S)
    return x.reshape(BH, len(vectors), S // BLOCK, BLOCK).transpose(0, 2, 1, 3)


def block_starts(vecStart: jax.Array, L: int) -> jax.Array:
    """The reset starts z_t (absolute step indices, (BH, S)) relative to their chunk's first step,
    per 64-step block: (BH, S / 64, 64) int32."""
    BH, S = vecStart.shape
    chunk_start = (jnp.arange(S, dtype=jnp.int32) // L) * L
    return (vecStart.astype(jnp.int32) - chunk_start[None, :]).reshape(BH, S // BLOCK, BLOCK)


def query_block_mask(idx_r, idx_c, j, iq, start_rows):
    """The (64, 64) mask of query block ``iq`` (rows t) against key block ``j`` (columns s) of one
    chunk: causal t >= s (only the diagonal block j == iq cuts) and the reset s >= z_t
    (``start_rows``: z_t chunk-relative, broadcast over the columns). ``idx_r``, ``idx_c``:
    block-local row and column iotas."""
    return (idx_r + (iq - j) * BLOCK >= idx_c) & (idx_c + j * BLOCK >= start_rows)


def key_block_mask(idx_r, idx_c, j, ik, start_cols):
    """The (64, 64) mask of key block ``ik`` (rows s) against query block ``ik + j`` (columns t)
    of one chunk, the transpose of ``query_block_mask``: t >= s (only j == 0 cuts) and s >= z_t
    (``start_cols``: z_t chunk-relative, broadcast over the rows)."""
    return (idx_c + j * BLOCK >= idx_r) & (idx_r + ik * BLOCK >= start_cols)


PIPELINE_SLOTS = MOSAIC_PIPELINE_SLOTS
"""(Defined beside the tuned tables, which record it.) Shared-memory buffers of the tiles a forward or dV program streams over its loop (k, v and the
key gates; q, dh and the query vectors in dV): 2 double-buffers them (the TMA load of block j + 1
overlaps the wgmmas of block j), 1 loads block j + 1 after block j's wgmmas and frees one tile of
each, which at the standard heads (DHQK 128, DHV tile 128) brings a program's shared memory from
~130 KB to ~98 KB, so that two programs share an SM (227 KB) and one's loads overlap the other's
products (``smem_bytes``)."""


def check_slots(name: str, slots) -> None:
    """``ValueError`` unless ``slots`` is one of ``PIPELINE_SLOTS``."""
    if isinstance(slots, bool) or slots not in PIPELINE_SLOTS:
        raise ValueError(f"{name}: slots (pipeline_slots) must be one of {list(PIPELINE_SLOTS)}; got {slots!r}")


def streamed_loop(n_iter, slots: int, fetch, body, init):
    """``lax.fori_loop`` over the ``n_iter`` blocks a program streams, with ``slots`` buffers per
    streamed tile: ``fetch(j, slot)`` issues block j's TMA loads (the caller issues block 0 into slot
    0 before the loop); ``body(j, slot, carry) -> carry`` waits for and uses block j, and must have
    awaited every read of its slot when it returns. With 2 slots block j + 1 is fetched into the
    other slot before block j is used (that slot was last read by block j - 1); with 1 after."""

    def step(j, carry):
        slot = lax.rem(j, jnp.int32(slots))
        if slots == 2:

            @pl.when(j + 1 < n_iter)
            def _prefetch():
                fetch(j + 1, 1 - slot)

        carry = body(j, slot, carry)
        if slots == 1:

            @pl.when(j + 1 < n_iter)
            def _refill():
                fetch(j + 1, 0)

        return carry

    return lax.fori_loop(jnp.int32(0), n_iter, step, init)


def smem_bytes(DHQK: int, bV: int, slots: int, itemsize: int = 2) -> int:
    """Shared memory of one forward program (the dV program's is the same up to ~1 KB of vectors):
    q (64, DHQK), ``slots`` x (k (64, DHQK) + v (64, bV)), the state tile (DHQK, bV), the output
    tile (64, bV), plus the f32 / int32 vectors."""
    tiles = BLOCK * DHQK + slots * (BLOCK * DHQK + BLOCK * bV) + DHQK * bV + BLOCK * bV
    return tiles * itemsize + 4 * BLOCK * (N_ROWVECS + 1 + slots + 1) + 4 * DHQK


def _mosaic():
    """``xlstm_jax.kernels.pallas._mosaic``, imported on first use (never at package import)."""
    from ...pallas import _mosaic as mod

    return mod


def _kernel(
    q_ref,  # (BH, S, DHQK) gmem
    k_ref,  # (BH, S, DHQK)
    v_ref,  # (BH, S, DHV)
    rows_ref,  # (BH, S / 64, 3, 64) f32: vecQlog, W * qk_scale, lam
    start_ref,  # (BH, S / 64, 64) int32: z_t - chunk start
    klog_ref,  # (BH, S / 64, 64) f32
    c_ref,  # (BH, NC or NC + 1, DHQK, DHV) kernel dtype: row k is the state entering chunk k
    n_ref,  # (BH, NC or NC + 1, DHQK / 64, 64) f32: row k is n_{k-1}, the normaliser state entering chunk k
    h_ref,  # out (BH, S, DHV) kernel dtype
    nq_ref,  # out (BH, S) f32: the signed normaliser qs_t . n_t (a residual of the backward pass)
    smem,
    bars,
    *,
    L: int,
    bV: int,
    qk_scale: float,
    eps: float,
    slots: int,
    interpret: bool,
):
    plgpu = _mosaic().plgpu()
    q_smem, k_smem, v_smem, c_smem, h_smem, rows_smem, start_smem, klog_smem, nq_smem, n_smem = smem
    q_bar, c_bar, rows_bar, start_bar, k_bar, v_bar, klog_bar, n_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout, col_layout = wg.reduce(1), wg.reduce(0)
    load = functools.partial(_mosaic().load, interpret=interpret)
    dtype = q_smem.dtype
    DHQK = q_smem.shape[-1]

    iv = lax.axis_index("v")
    qb = lax.axis_index("q")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(qb, jnp.int32(nb))
    iq = lax.rem(qb, jnp.int32(nb))
    kb0 = chunk * nb
    vcols = pl.ds(iv * bV, bV)
    qrows = pl.ds(qb * BLOCK, BLOCK)

    def fetch_kv(j, slot):
        krows = pl.ds((kb0 + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(k_ref.at[bh, krows], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bh, krows, vcols], v_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(klog_ref.at[bh, kb0 + j], klog_smem.at[slot], klog_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[bh, qrows], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(rows_ref.at[bh, qb], rows_smem, rows_bar)
    plgpu.copy_gmem_to_smem(start_ref.at[bh, qb], start_smem, start_bar)
    fetch_kv(0, 0)
    plgpu.copy_gmem_to_smem(c_ref.at[bh, chunk, pl.ds(0, DHQK), vcols], c_smem, c_bar)
    plgpu.copy_gmem_to_smem(n_ref.at[bh, chunk], n_smem, n_bar)

    plgpu.barrier_wait(rows_bar)
    plgpu.barrier_wait(start_bar)
    vecQlog = load(rows_smem.at[0], row_layout)
    vecW = load(rows_smem.at[1], row_layout)
    vecLam = load(rows_smem.at[2], row_layout)
    vecStart = load(start_smem, row_layout)
    shape_s = (BLOCK, BLOCK)
    idx_r = _mosaic().iota(shape_s, 0, wg, interpret=interpret)
    idx_c = _mosaic().iota(shape_s, 1, wg, interpret=interpret)
    matQlog = lax.broadcast_in_dim(vecQlog, shape_s, [0])
    matStart = lax.broadcast_in_dim(vecStart, shape_s, [0])
    plgpu.barrier_wait(q_bar)

    # the state term of the normaliser, nqInter_t = W_t qs_t . n_{k-1}: q from shared memory in the
    # wgmma layout, 64 columns at a time (32 float32 registers), times n_{k-1} (float32), row sums
    plgpu.barrier_wait(n_bar)
    vecQn = _mosaic().layout_cast(jnp.zeros((BLOCK,), _F32), row_layout, interpret=interpret)
    for c in range(DHQK // BLOCK):
        matQc = load(q_smem.at[:, pl.ds(c * BLOCK, BLOCK)], wg).astype(_F32)
        vecNc = load(n_smem.at[c], col_layout)
        vecQn = vecQn + (matQc * lax.broadcast_in_dim(vecNc, (BLOCK, BLOCK), [1])).sum(axis=1)
    vecNqInter = vecW * vecQn

    n_iter = iq + 1
    shape_h = (BLOCK, bV)

    # inter-chunk term first (like the Triton kernel): acc = W_t qs_t^T C_{k-1}; the loop adds P v
    plgpu.barrier_wait(c_bar)

    matAcc0 = _mosaic().dot_nn(q_smem, c_smem) * lax.broadcast_in_dim(vecW, shape_h, [0])

    def step(j, slot, carry):
        """Key block j of the chunk: (nq, acc) -> (nq, acc) with this block's P added."""
        vecNq, matAcc = carry
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(klog_bar.at[slot])

        matS = _mosaic().dot_nt(q_smem, k_smem.at[slot], interpret=interpret)
        vecKlog = load(klog_smem.at[slot], col_layout)
        matLogD = matQlog + lax.broadcast_in_dim(vecKlog, shape_s, [1])
        # causal: t >= s in chunk-local rows (only the diagonal block j == iq cuts); reset: s >= z_t
        mask = query_block_mask(idx_r, idx_c, j, iq, matStart)
        matP = (matS * qk_scale) * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))
        vecNq = vecNq + matP.sum(axis=1)
        matP = matP.astype(dtype)
        plgpu.barrier_wait(v_bar.at[slot])
        # awaited: the slot may be refilled (``streamed_loop``)
        matAcc = _mosaic().dot_acc(matAcc, matP, v_smem.at[slot], interpret=interpret)
        return vecNq, matAcc

    vecNq0 = _mosaic().layout_cast(jnp.zeros((BLOCK,), _F32), row_layout, interpret=interpret)
    vecNqIntra, matAcc = streamed_loop(n_iter, slots, fetch_kv, step, (vecNq0, matAcc0))

    vecNq = vecNqInter + vecNqIntra
    vecDen = jnp.maximum(jnp.abs(vecNq), vecLam) + eps
    matH = matAcc / lax.broadcast_in_dim(vecDen, shape_h, [0])
    h_smem[...] = matH.astype(h_smem.dtype)
    nq_smem[...] = vecNq
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_smem, h_ref.at[bh, qrows, vcols])
    # nq is the same in every DHV tile: the programs of tile 0 write it (a 256-byte TMA store);
    # the interpreter takes no predicate, there every tile writes the same values
    plgpu.copy_smem_to_gmem(nq_smem, nq_ref.at[bh, qrows], predicate=None if interpret else iv == 0)
    plgpu.wait_smem_to_gmem(0)


def parallel_fw_h_mosaic(
    matQ: jax.Array,  # (BH, S, DHQK) bf16/f16, S a multiple of L, DHQK a multiple of 64
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV), DHV a multiple of bV
    rows: jax.Array,  # (BH, S / 64, 4, 64) f32
    start: jax.Array,  # (BH, S / 64, 64) int32
    klog: jax.Array,  # (BH, S / 64, 64) f32
    matC_enter: jax.Array,  # (BH, NC or NC + 1, DHQK, DHV) dtype of q: row k enters chunk k
    vecN_enter: jax.Array,  # (BH, NC or NC + 1, DHQK) f32: row k is n_{k-1}, entering chunk k
    *,
    L: int,
    bV: int,
    qk_scale: float,
    eps: float,
    interpret: bool,
    slots: int = 2,
) -> jax.Array:
    """Launch the kernel: (h (BH, S, DHV) in the dtype of q, nq (BH, S) f32, the signed normaliser
    qs_t . n_t of the backward pass). Inputs are prepared by ``forward.py``. ``slots``: shared-memory
    buffers of the streamed k, v and key-gate tiles (``check_slots``)."""
    plgpu = _mosaic().plgpu()
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    dtype = matQ.dtype
    NC = S // L
    if S % L or L % BLOCK or DHQK % 64 or DHV % bV or bV % 64:
        raise ValueError(
            f"parallel_fw_h_mosaic needs S % L == 0, L % 64 == 0, DHQK % 64 == 0, DHV % bV == 0, "
            f"bV % 64 == 0; got S={S}, L={L}, DHQK={DHQK}, DHV={DHV}, bV={bV}"
        )
    if (
        matC_enter.shape not in ((BH, NC, DHQK, DHV), (BH, NC + 1, DHQK, DHV))
        or matC_enter.dtype != dtype
    ):
        raise ValueError(
            f"matC_enter must be {(BH, NC, DHQK, DHV)} or {(BH, NC + 1, DHQK, DHV)} "
            f"{jnp.dtype(dtype).name}; got "
            f"{matC_enter.shape} {matC_enter.dtype}"
        )
    if vecN_enter.shape != matC_enter.shape[:3]:
        raise ValueError(f"vecN_enter must be {matC_enter.shape[:3]} (the rows of matC_enter); got {vecN_enter.shape}")
    check_slots("parallel_fw_h_mosaic", slots)
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((BLOCK, DHQK), dtype, transforms=tr),  # q
        plgpu.SMEM((slots, BLOCK, DHQK), dtype, transforms=tr),  # k, one tile per slot
        plgpu.SMEM((slots, BLOCK, bV), dtype, transforms=tr),  # v
        plgpu.SMEM((DHQK, bV), dtype, transforms=tr),  # C_{k-1} tile
        plgpu.SMEM((BLOCK, bV), dtype, transforms=tr),  # h tile
        plgpu.SMEM((N_ROWVECS, BLOCK), _F32),
        plgpu.SMEM((BLOCK,), jnp.int32),
        plgpu.SMEM((slots, BLOCK), _F32),  # key gate vector
        plgpu.SMEM((BLOCK,), _F32),  # nq of the query block
        plgpu.SMEM((DHQK // BLOCK, BLOCK), _F32),  # n_{k-1}, 64 values per row
    )
    bars = (
        plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(),
        plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots), plgpu.Barrier(),
    )
    body = _mosaic().named_body(
        functools.partial(_kernel, L=L, bV=bV, qk_scale=float(qk_scale), eps=float(eps), slots=int(slots),
                          interpret=bool(interpret)),
        "mlstm_mosaic_parallel_fw",
    )
    call = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((BH, S, DHV), dtype), jax.ShapeDtypeStruct((BH, S), _F32)),
        scratch_types=[smem, bars],
        grid=(DHV // bV, S // BLOCK, BH),
        grid_names=("v", "q", "bh"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_mosaic().interpret_params(interpret),
    )
    vecN_blocks = vecN_enter.astype(_F32).reshape(*vecN_enter.shape[:2], DHQK // BLOCK, BLOCK)
    return call(matQ, matK, matV, rows, start, klog, matC_enter, vecN_blocks)
