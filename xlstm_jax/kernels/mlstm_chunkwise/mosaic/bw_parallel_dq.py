"""Backward parallel kernel for dQ in Mosaic GPU: dQ of one 64-row query block and one DHQK tile
per program, with the row sums <dq_t, q_t> the gate gradients need.

Notation (see ``bw_parallel_dk.py`` and the Triton kernel ``pallas/bw_parallel_dq.py``, which
computes the same). For query t in chunk k (entering state C_{k-1}, n_{k-1}), with
dP[t, s] = dh_t . v_s / den_t + dnq_t:

    dq_t = qk_scale ( sum_{z_t <= s <= t} dP[t, s] exp2(vecQlog_t + vecKlog_s) k_s
                      + Winter_t (C_{k-1} dh_t / den_t + dnq_t n_{k-1}) )

Design (the forward kernel's loop, ``fw_parallel.py``, with the products of the Triton dQ kernel):

* Grid (DHQK / bK, S / 64, BH). A program of query block b (block iq inside chunk c) loops over the
  iq + 1 key blocks of its chunk up to the diagonal.
* Shared memory (16-bit tiles, (8, 64) tiling, 128-byte swizzle): dh (64, DHV) and the q tile
  (64, bK) loaded once; v (64, DHV), the k tile (64, bK) and the key gate vector double-buffered;
  the entering-state tile C_{c-1} (bK, DHV) in a buffer of its own at bK = 128, at bK = 64 in the
  v slot the last loop step leaves free (as the dK kernel's dC tile). The q tile is read into
  registers for the row sum at the end and its buffer then holds the dQ tile for the TMA store.
  The same bytes as the dK kernel (``bw_parallel_dk.smem_bytes``): 208 KB at the standard heads
  (bK 128), 216 KB at the 7B heads (bK 64).
* Per key block: dP = dh v^T (wgmma over DHV), scaled per query row, the gate matrix with the
  causal and reset masks, acc += dS k (dS as a 16-bit register operand). After the loop the
  inter-chunk term Winter_t (dh_t C^T / den_t + dnq_t n) (wgmma with the state tile transposed in
  shared memory) is added.
* Outputs: the dQ tile (64, bK) in the kernel dtype and the fp32 row sums of dq * q per DHQK tile
  ((DHQK / bK, BH, S), summed over the tiles by the launcher).

``interpret=True``: Mosaic GPU's interpret mode on CPU (see ``fw_parallel.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .bw_parallel_dk import SMEM_LIMIT, default_bK, reuses_slot, smem_bytes
from .fw_parallel import BLOCK, _mosaic, block_rows, block_starts, query_block_mask

N_QVECS = 4
"""Per-query vectors packed into one (4, 64) TMA tile: vecQlog, vecWinter, 1 / den, dnq."""
_F32 = jnp.float32


def fits(DHQK: int, DHV: int) -> bool:
    """Whether the kernel's tiles fit in shared memory at these (padded) head dims (the dK
    kernel's footprint, ``bw_parallel_dk.smem_bytes``)."""
    return DHQK % 64 == 0 and smem_bytes(DHQK, DHV, default_bK(DHQK, DHV)) <= SMEM_LIMIT


def _kernel(
    q_ref,  # (BH, S, DHQK) gmem
    k_ref,  # (BH, S, DHQK)
    v_ref,  # (BH, S, DHV)
    dh_ref,  # (BH, S, DHV)
    qvec_ref,  # (BH, S / 64, 4, 64) f32: vecQlog, vecWinter, 1 / den, dnq
    start_ref,  # (BH, S / 64, 64) int32: z_t - chunk start
    klog_ref,  # (BH, S / 64, 64) f32
    c_ref,  # (BH, NC + 1, DHQK, DHV) kernel dtype: row k is the state entering chunk k
    n_ref,  # (BH, NC + 1, DHQK) f32
    dq_ref,  # out (BH, S, DHQK) kernel dtype
    dqq_ref,  # out (DHQK / bK, BH, S) f32: <dq_t, q_t> over this tile's columns
    smem,
    bars,
    *,
    L: int,
    bK: int,
    qk_scale: float,
    interpret: bool,
):
    plgpu = _mosaic().plgpu()
    reuse = reuses_slot(bK)
    if reuse:  # the state tile goes into a freed v slot in the last loop step
        (dh_smem, q_smem, v_smem, k_smem, qvec_smem, start_smem, klog_smem, n_smem, dqq_smem) = smem
        c_smem = None
    else:
        (dh_smem, q_smem, c_smem, v_smem, k_smem, qvec_smem, start_smem, klog_smem, n_smem,
         dqq_smem) = smem
    dh_bar, q_bar, c_bar, qvec_bar, start_bar, n_bar, v_bar, k_bar, klog_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout, col_layout = wg.reduce(1), wg.reduce(0)
    load = functools.partial(_mosaic().load, interpret=interpret)
    dtype = q_smem.dtype

    idk = lax.axis_index("d")
    qb = lax.axis_index("q")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(qb, jnp.int32(nb))
    iq = lax.rem(qb, jnp.int32(nb))
    kb0 = chunk * nb
    dcols = pl.ds(idk * bK, bK)
    qrows = pl.ds(qb * BLOCK, BLOCK)

    def fetch_kv(j, slot):  # key block j of the chunk
        krows = pl.ds((kb0 + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(v_ref.at[bh, krows], v_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[bh, krows, dcols], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(klog_ref.at[bh, kb0 + j], klog_smem.at[slot], klog_bar.at[slot])

    plgpu.copy_gmem_to_smem(dh_ref.at[bh, qrows], dh_smem, dh_bar)
    plgpu.copy_gmem_to_smem(qvec_ref.at[bh, qb], qvec_smem, qvec_bar)
    plgpu.copy_gmem_to_smem(start_ref.at[bh, qb], start_smem, start_bar)
    plgpu.copy_gmem_to_smem(n_ref.at[bh, chunk, dcols], n_smem, n_bar)
    c_tile = c_ref.at[bh, chunk, dcols]  # (bK, DHV)
    if not reuse:
        plgpu.copy_gmem_to_smem(c_tile, c_smem, c_bar)
    fetch_kv(0, 0)
    plgpu.copy_gmem_to_smem(q_ref.at[bh, qrows, dcols], q_smem, q_bar)

    plgpu.barrier_wait(qvec_bar)
    plgpu.barrier_wait(start_bar)
    vecQlog = load(qvec_smem.at[0], row_layout)
    vecWinter = load(qvec_smem.at[1], row_layout)
    vecDenInv = load(qvec_smem.at[2], row_layout)
    vecDnq = load(qvec_smem.at[3], row_layout)
    vecStart = load(start_smem, row_layout)
    shape_s = (BLOCK, BLOCK)
    idx_r = _mosaic().iota(shape_s, 0, wg, interpret=interpret)  # query row t (block-local)
    idx_c = _mosaic().iota(shape_s, 1, wg, interpret=interpret)  # key column s (block-local)

    def row(x):  # a per-query vector over the (64, 64) tile, formed in the loop (no tiles live across it)
        return lax.broadcast_in_dim(x, shape_s, [0])

    shape_dq = (BLOCK, bK)

    plgpu.barrier_wait(dh_bar)
    n_iter = iq + 1

    def step(j, matAcc):
        """Key block j of the chunk: acc -> acc + dS k of this block."""
        slot = lax.rem(j, jnp.int32(2))

        @pl.when(j + 1 < n_iter)
        def _prefetch():  # the other slot was last read by block j - 1, whose wgmmas are done
            fetch_kv(j + 1, 1 - slot)

        if reuse:

            @pl.when(j + 1 == n_iter)
            def _prefetch_state():  # the last step: the other v slot is free for the state tile
                plgpu.copy_gmem_to_smem(c_tile, v_smem.at[1 - slot], c_bar)

        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(klog_bar.at[slot])

        matDP = _mosaic().dot_nt(dh_smem, v_smem.at[slot], interpret=interpret)
        vecKlog = load(klog_smem.at[slot], col_layout)
        matDP = matDP * row(vecDenInv) + row(vecDnq)
        matLogD = row(vecQlog) + lax.broadcast_in_dim(vecKlog, shape_s, [1])
        mask = query_block_mask(idx_r, idx_c, j, iq, row(vecStart))
        matDS = (matDP * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))).astype(dtype)
        plgpu.barrier_wait(k_bar.at[slot])
        return _mosaic().dot_acc(matAcc, matDS, k_smem.at[slot], interpret=interpret)

    matAcc0 = _mosaic().layout_cast(jnp.zeros(shape_dq, _F32), wg, interpret=interpret)
    matAcc = lax.fori_loop(jnp.int32(0), n_iter, step, matAcc0)

    c_buf = v_smem.at[lax.rem(n_iter, jnp.int32(2))] if reuse else c_smem  # the last step's other slot
    finish_dq(
        matAcc, dh_smem=dh_smem, c_buf=c_buf, c_bar=c_bar, n_smem=n_smem, n_bar=n_bar, q_smem=q_smem,
        q_bar=q_bar, dqq_smem=dqq_smem, vecWinter=vecWinter, vecDenInv=vecDenInv, vecDnq=vecDnq,
        dq_dst=dq_ref.at[bh, qrows, dcols], dqq_dst=dqq_ref.at[idk, bh, qrows], qk_scale=qk_scale,
        interpret=interpret,
    )


def finish_dq(matAcc, *, dh_smem, c_buf, c_bar, n_smem, n_bar, q_smem, q_bar, dqq_smem, vecWinter,
              vecDenInv, vecDnq, dq_dst, dqq_dst, qk_scale: float, interpret: bool):
    """The end of a dQ program (also the split kernel's, ``bw_parallel_split``), after its loop
    over the key blocks has summed ``matAcc`` (64, bK): the inter-chunk term
    Winter_t (C_{c-1} dh_t / den_t + dnq_t n_{c-1}) (after the loop, so that its accumulator is not
    live across it; the state tile ``c_buf``), dQ = (acc + inter) qk_scale, the row sum <dq, q>, and
    the TMA stores of both to ``dq_dst`` / ``dqq_dst`` (the q buffer holds the dQ tile)."""
    plgpu = _mosaic().plgpu()
    wg = plgpu.Layout.WGMMA
    load = functools.partial(_mosaic().load, interpret=interpret)
    shape_dq = matAcc.shape
    plgpu.barrier_wait(c_bar)
    plgpu.barrier_wait(n_bar)
    matInter = _mosaic().dot_nt(dh_smem, c_buf, interpret=interpret)
    vecN = load(n_smem, wg.reduce(0))
    matInter = (
        matInter * lax.broadcast_in_dim(vecDenInv, shape_dq, [0])
        + lax.broadcast_in_dim(vecDnq, shape_dq, [0]) * lax.broadcast_in_dim(vecN, shape_dq, [1])
    ) * lax.broadcast_in_dim(vecWinter, shape_dq, [0])

    matDQ = (matAcc + matInter) * qk_scale

    plgpu.barrier_wait(q_bar)
    matQ = load(q_smem, wg).astype(_F32)
    dqq_smem[...] = jnp.sum(matDQ * matQ, axis=1)
    q_smem[...] = matDQ.astype(q_smem.dtype)  # q has been read: its buffer holds the dQ tile
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_dst)
    plgpu.copy_smem_to_gmem(dqq_smem, dqq_dst)
    plgpu.wait_smem_to_gmem(0)


def parallel_bw_dq_mosaic(
    matQ: jax.Array,  # (BH, S, DHQK) bf16/f16, S a multiple of L, DHQK a multiple of 64
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV), DHV a multiple of 64
    matDH: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S) f32
    vecKlog: jax.Array,  # (BH, S) f32
    vecWinter: jax.Array,  # (BH, S) f32
    vecDenInv: jax.Array,  # (BH, S) f32
    vecDnq: jax.Array,  # (BH, S) f32
    vecStart: jax.Array,  # (BH, S) int32 (absolute step index z_t)
    matC_states: jax.Array,  # (BH, NC + 1, DHQK, DHV) any float dtype (cast to the kernel dtype)
    vecN_states: jax.Array,  # (BH, NC + 1, DHQK)
    *,
    L: int,
    qk_scale: float,
    interpret: bool,
    bK: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(dQ (BH, S, DHQK) in the dtype of q, <dq, q> (BH, S) f32): the outputs of the Triton kernel
    ``pallas.bw_parallel_dq.parallel_bw_dq`` for its arguments (same meaning). ``ValueError``
    where the tiles do not fit (``fits``)."""
    plgpu = _mosaic().plgpu()
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    dtype = matQ.dtype
    NC = S // L
    bK = default_bK(DHQK, DHV) if bK is None else bK
    if S % L or L % BLOCK or DHQK % bK or bK % 64 or DHV % 64:
        raise ValueError(
            f"parallel_bw_dq_mosaic needs S % L == 0, L % 64 == 0, DHQK % bK == 0, bK % 64 == 0, "
            f"DHV % 64 == 0; got S={S}, L={L}, DHQK={DHQK}, bK={bK}, DHV={DHV}"
        )
    if smem_bytes(DHQK, DHV, bK) > SMEM_LIMIT:
        raise ValueError(
            f"parallel_bw_dq_mosaic: the tiles at DHQK={DHQK}, DHV={DHV}, bK={bK} need "
            f"{smem_bytes(DHQK, DHV, bK)} bytes of shared memory (limit {SMEM_LIMIT}); use the Triton kernel"
        )
    if (matK.shape != matQ.shape or matK.dtype != dtype or matV.shape != (BH, S, DHV)
            or matDH.shape != (BH, S, DHV)):
        raise ValueError(
            f"parallel_bw_dq_mosaic: matK must be {matQ.shape} {jnp.dtype(dtype).name}, matV and matDH "
            f"{(BH, S, DHV)}; got {matK.shape} {matK.dtype}, {matV.shape}, {matDH.shape}"
        )
    if matC_states.shape != (BH, NC + 1, DHQK, DHV) or vecN_states.shape != (BH, NC + 1, DHQK):
        raise ValueError(
            f"matC_states and vecN_states must be {(BH, NC + 1, DHQK, DHV)} and {(BH, NC + 1, DHQK)}; "
            f"got {matC_states.shape}, {vecN_states.shape}"
        )
    nB, nDK = S // BLOCK, DHQK // bK
    qvec = block_rows(vecQlog, vecWinter, vecDenInv, vecDnq)  # (BH, nB, 4, 64)
    klog = vecKlog.astype(_F32).reshape(BH, nB, BLOCK)
    start = block_starts(vecStart, L)
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((BLOCK, DHV), dtype, transforms=tr),  # dh of the query block
        plgpu.SMEM((BLOCK, bK), dtype, transforms=tr),  # q tile, then the dQ tile
    ) + (() if reuses_slot(bK) else (
        plgpu.SMEM((bK, DHV), dtype, transforms=tr),  # entering state tile C_{c-1}
    )) + (
        plgpu.SMEM((2, BLOCK, DHV), dtype, transforms=tr),  # v, 2 slots (bK 64: one takes C last)
        plgpu.SMEM((2, BLOCK, bK), dtype, transforms=tr),  # k tile, 2 slots
        plgpu.SMEM((N_QVECS, BLOCK), _F32),
        plgpu.SMEM((BLOCK,), jnp.int32),
        plgpu.SMEM((2, BLOCK), _F32),  # key gate vector, 2 slots
        plgpu.SMEM((bK,), _F32),  # n_{c-1} tile
        plgpu.SMEM((BLOCK,), _F32),  # <dq, q>
    )
    bars = (
        plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(),
        plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
    )
    body = _mosaic().named_body(
        functools.partial(_kernel, L=L, bK=bK, qk_scale=float(qk_scale), interpret=bool(interpret)),
        "mlstm_mosaic_parallel_bw_dq",
    )
    call = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((BH, S, DHQK), dtype), jax.ShapeDtypeStruct((nDK, BH, S), _F32)),
        scratch_types=[smem, bars],
        grid=(nDK, nB, BH),
        grid_names=("d", "q", "bh"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_mosaic().interpret_params(interpret),
    )
    matDQ, vecDqq = call(
        matQ, matK, matV.astype(dtype), matDH.astype(dtype), qvec, start, klog,
        matC_states.astype(dtype), vecN_states.astype(_F32),
    )
    return matDQ, jnp.sum(vecDqq, axis=0)
