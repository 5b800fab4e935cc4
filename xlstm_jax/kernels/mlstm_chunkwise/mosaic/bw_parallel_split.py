"""Backward parallel kernels for dQ and dK in Mosaic GPU with the score gradient computed once:
``bw_kernels="mosaic_split"`` of ``chunkwise_mosaic``.

Why. ``bw_parallel_dq`` and ``bw_parallel_dk`` each compute the same gated score gradient of every
(query block, key block) pair of a chunk,

    dS[t, s] = (dh_t . v_s / den_t + dnq_t) exp2(vecQlog_t + vecKlog_s)   (t >= s, s >= z_t; else 0)

once per DHQK tile of their program: at the 7B heads (DHQK 256 in tiles of 64, DHV 512) the
DHV-deep product dh v^T is computed eight times per block pair (four tiles in each kernel), 1.7x
their nominal FLOPs (profile of 2026-12-02, docs/benchmarks.md). Here it is computed once:

1. ``_ds_kernel``, grid (key block j of the chunk, query block, BH): the pair's dP = dh v^T (one
   wgmma over DHV), the per-row 1 / den and dnq, the gate matrix with the causal and reset masks
   (``fw_parallel.query_block_mask``), stored in the kernel dtype (the rounding the other kernels
   apply before their products) into dS (BH, S, L): row t holds the L keys of its chunk; blocks
   above the diagonal are neither written nor read. Programs with j > iq return at once.
2. ``_dq_kernel``, grid (DHQK tile, query block, BH): acc += dS[t-block, key block j] k_j over the
   key blocks up to the diagonal (both operands in shared memory, the dS and k tiles
   double-buffered), then the inter-chunk term Winter_t (dh_t C^T / den_t + dnq_t n) as in
   ``bw_parallel_dq``; outputs dQ and the row sums <dq, q>.
3. ``_dk_kernel``, grid (DHQK tile, key block, BH): acc += dS[query block i, key block]^T q_i over
   the query blocks from the diagonal (dS transposed in shared memory), then the state part
   Wstate_s (dC v_s + dn) as in ``bw_parallel_dk``; outputs dK, <dk, k> and <dk_state, k>.

Shared memory: dS kernel 2 x 64 x DHV + 64 x 64 tiles (136 KB at the 7B heads); dQ / dK kernels
64 x DHV + bK x DHV + 3 x 64 x bK + 2 x 64 x 64 (bK 128 where it fits: 160 KB at the standard
heads; bK 64 at the 7B heads: 168 KB). dS costs BH * S * L * 2 bytes (268 MB at the standard
workload 8 x 8192, 134 MB at the 7B heads) written once and read twice.

``interpret=True``: Mosaic GPU's interpret mode on CPU (see ``fw_parallel.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .bw_parallel_dk import SMEM_LIMIT, finish_dk
from .bw_parallel_dq import finish_dq
from .fw_parallel import BLOCK, _mosaic, block_rows, block_starts, query_block_mask, streamed_loop

_F32 = jnp.float32


def split_smem_bytes(DHQK: int, DHV: int, bK: int, itemsize: int = 2) -> int:
    """Shared memory of one dQ or dK program of this module (tiles and vectors)."""
    del DHQK
    tiles = BLOCK * DHV + bK * DHV + 3 * BLOCK * bK + 2 * BLOCK * BLOCK
    return tiles * itemsize + 4 * (8 * BLOCK + bK)


def ds_smem_bytes(DHV: int, itemsize: int = 2) -> int:
    """Shared memory of one dS program."""
    return (2 * BLOCK * DHV + BLOCK * BLOCK) * itemsize + 4 * 8 * BLOCK


def split_bK(DHQK: int, DHV: int) -> int:
    """The DHQK tile of the dQ and dK programs: 128 where it fits (and divides DHQK), else 64."""
    return 128 if DHQK % 128 == 0 and split_smem_bytes(DHQK, DHV, 128) <= SMEM_LIMIT else 64


def fits(DHQK: int, DHV: int) -> bool:
    """Whether the three kernels' tiles fit in shared memory at these (padded) head dims."""
    return (DHQK % 64 == 0 and DHV % 64 == 0 and ds_smem_bytes(DHV) <= SMEM_LIMIT
            and split_smem_bytes(DHQK, DHV, split_bK(DHQK, DHV)) <= SMEM_LIMIT)


def _tr():
    plgpu = _mosaic().plgpu()
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


# ---------------------------------------------------------------------------------------------
# 1. dS of one (query block, key block) pair


def _ds_kernel(
    v_ref,  # (BH, S, DHV) gmem
    dh_ref,  # (BH, S, DHV)
    qvec_ref,  # (BH, S / 64, 3, 64) f32: vecQlog, 1 / den, dnq
    start_ref,  # (BH, S / 64, 64) int32: z_t - chunk start
    klog_ref,  # (BH, S / 64, 64) f32
    ds_ref,  # out (BH, S, L) kernel dtype
    smem,
    bars,
    *,
    L: int,
    interpret: bool,
):
    plgpu = _mosaic().plgpu()
    dh_smem, v_smem, ds_smem, qvec_smem, start_smem, klog_smem = smem
    dh_bar, v_bar, qvec_bar, start_bar, klog_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout, col_layout = wg.reduce(1), wg.reduce(0)
    load = functools.partial(_mosaic().load, interpret=interpret)
    dtype = dh_smem.dtype

    j = lax.axis_index("j")
    qb = lax.axis_index("q")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(qb, jnp.int32(nb))
    iq = lax.rem(qb, jnp.int32(nb))
    qrows = pl.ds(qb * BLOCK, BLOCK)

    @pl.when(j <= iq)
    def _pair():
        krows = pl.ds((chunk * nb + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(dh_ref.at[bh, qrows], dh_smem, dh_bar)
        plgpu.copy_gmem_to_smem(v_ref.at[bh, krows], v_smem, v_bar)
        plgpu.copy_gmem_to_smem(qvec_ref.at[bh, qb], qvec_smem, qvec_bar)
        plgpu.copy_gmem_to_smem(start_ref.at[bh, qb], start_smem, start_bar)
        plgpu.copy_gmem_to_smem(klog_ref.at[bh, chunk * nb + j], klog_smem, klog_bar)
        shape_s = (BLOCK, BLOCK)

        def row(x):
            return lax.broadcast_in_dim(x, shape_s, [0])

        plgpu.barrier_wait(dh_bar)
        plgpu.barrier_wait(v_bar)
        matDP = _mosaic().dot_nt(dh_smem, v_smem, interpret=interpret)
        plgpu.barrier_wait(qvec_bar)
        plgpu.barrier_wait(start_bar)
        plgpu.barrier_wait(klog_bar)
        vecQlog = load(qvec_smem.at[0], row_layout)
        vecDenInv = load(qvec_smem.at[1], row_layout)
        vecDnq = load(qvec_smem.at[2], row_layout)
        vecStart = load(start_smem, row_layout)
        vecKlog = load(klog_smem, col_layout)
        idx_r = _mosaic().iota(shape_s, 0, wg, interpret=interpret)
        idx_c = _mosaic().iota(shape_s, 1, wg, interpret=interpret)
        matDP = matDP * row(vecDenInv) + row(vecDnq)
        matLogD = row(vecQlog) + lax.broadcast_in_dim(vecKlog, shape_s, [1])
        mask = query_block_mask(idx_r, idx_c, j, iq, row(vecStart))
        ds_smem[...] = (matDP * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ds_smem, ds_ref.at[bh, qrows, pl.ds(j * BLOCK, BLOCK)])
        plgpu.wait_smem_to_gmem(0)


def score_gradients_mosaic(matV, matDH, vecQlog, vecKlog, vecDenInv, vecDnq, vecStart, *, L: int,
                           interpret: bool) -> jax.Array:
    """dS (BH, S, L) in the dtype of v: row t holds dS[t, s] for the L keys s of t's chunk (the
    module doc's formula; blocks above the diagonal are left unwritten: never read)."""
    plgpu = _mosaic().plgpu()
    BH, S, DHV = matV.shape
    dtype = matV.dtype
    nB, nb = S // BLOCK, L // BLOCK
    qvec = block_rows(vecQlog, vecDenInv, vecDnq)
    klog = vecKlog.astype(_F32).reshape(BH, nB, BLOCK)
    start = block_starts(vecStart, L)
    tr = _tr()
    smem = (
        plgpu.SMEM((BLOCK, DHV), dtype, transforms=tr),  # dh of the query block
        plgpu.SMEM((BLOCK, DHV), dtype, transforms=tr),  # v of the key block
        plgpu.SMEM((BLOCK, BLOCK), dtype, transforms=tr),  # the dS tile for the TMA store
        plgpu.SMEM((3, BLOCK), _F32),
        plgpu.SMEM((BLOCK,), jnp.int32),
        plgpu.SMEM((BLOCK,), _F32),
    )
    bars = tuple(plgpu.Barrier() for _ in range(5))
    body = _mosaic().named_body(
        functools.partial(_ds_kernel, L=L, interpret=bool(interpret)), "mlstm_mosaic_parallel_bw_ds"
    )
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((BH, S, L), dtype),
        scratch_types=[smem, bars],
        grid=(nb, nB, BH),
        grid_names=("j", "q", "bh"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_mosaic().interpret_params(interpret),
    )
    return call(matV, matDH.astype(dtype), qvec, start, klog)


# ---------------------------------------------------------------------------------------------
# 2. dQ from dS


def _accumulate_ds(shape, n_iter, fetch, ds_smem, ds_bar, b_smem, b_bar, *, transpose_ds: bool,
                   interpret: bool):
    """The loop of the dQ and dK programs: the f32 ``shape`` accumulator plus dS_j @ b_j (dS_j^T @
    b_j with ``transpose_ds``) over the ``n_iter`` blocks j, the dS and b tiles double-buffered
    (``streamed_loop`` with 2 slots): ``fetch(j, slot)`` issues block j's TMAs (block 0 before the
    loop), the next block's while the current one is multiplied."""
    plgpu = _mosaic().plgpu()

    def step(j, slot, matAcc):
        plgpu.barrier_wait(b_bar.at[slot])
        plgpu.barrier_wait(ds_bar.at[slot])
        return _mosaic().dot_acc_smem(matAcc, ds_smem.at[slot], b_smem.at[slot], transpose_a=transpose_ds,
                                      interpret=interpret)

    matAcc0 = _mosaic().layout_cast(jnp.zeros(shape, _F32), plgpu.Layout.WGMMA, interpret=interpret)
    return streamed_loop(n_iter, 2, fetch, step, matAcc0)


def _dq_kernel(
    q_ref,  # (BH, S, DHQK) gmem
    k_ref,  # (BH, S, DHQK)
    dh_ref,  # (BH, S, DHV)
    ds_ref,  # (BH, S, L)
    qvec_ref,  # (BH, S / 64, 3, 64) f32: vecWinter, 1 / den, dnq
    c_ref,  # (BH, NC + 1, DHQK, DHV) kernel dtype: row k is the state entering chunk k
    n_ref,  # (BH, NC + 1, DHQK) f32
    dq_ref,  # out (BH, S, DHQK) kernel dtype
    dqq_ref,  # out (DHQK / bK, BH, S) f32
    smem,
    bars,
    *,
    L: int,
    bK: int,
    qk_scale: float,
    interpret: bool,
):
    plgpu = _mosaic().plgpu()
    dh_smem, c_smem, q_smem, k_smem, ds_smem, qvec_smem, n_smem, dqq_smem = smem
    dh_bar, c_bar, q_bar, qvec_bar, n_bar, k_bar, ds_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout = wg.reduce(1)
    load = functools.partial(_mosaic().load, interpret=interpret)

    idk = lax.axis_index("d")
    qb = lax.axis_index("q")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(qb, jnp.int32(nb))
    iq = lax.rem(qb, jnp.int32(nb))
    dcols = pl.ds(idk * bK, bK)
    qrows = pl.ds(qb * BLOCK, BLOCK)

    def fetch(j, slot):  # key block j of the chunk
        krows = pl.ds((chunk * nb + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(k_ref.at[bh, krows, dcols], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(ds_ref.at[bh, qrows, pl.ds(j * BLOCK, BLOCK)], ds_smem.at[slot],
                                ds_bar.at[slot])

    fetch(0, 0)
    plgpu.copy_gmem_to_smem(dh_ref.at[bh, qrows], dh_smem, dh_bar)
    plgpu.copy_gmem_to_smem(c_ref.at[bh, chunk, dcols], c_smem, c_bar)
    plgpu.copy_gmem_to_smem(qvec_ref.at[bh, qb], qvec_smem, qvec_bar)
    plgpu.copy_gmem_to_smem(n_ref.at[bh, chunk, dcols], n_smem, n_bar)
    plgpu.copy_gmem_to_smem(q_ref.at[bh, qrows, dcols], q_smem, q_bar)
    matAcc = _accumulate_ds((BLOCK, bK), iq + 1, fetch, ds_smem, ds_bar, k_smem, k_bar,
                            transpose_ds=False, interpret=interpret)

    plgpu.barrier_wait(qvec_bar)
    vecWinter = load(qvec_smem.at[0], row_layout)
    vecDenInv = load(qvec_smem.at[1], row_layout)
    vecDnq = load(qvec_smem.at[2], row_layout)
    plgpu.barrier_wait(dh_bar)
    finish_dq(
        matAcc, dh_smem=dh_smem, c_buf=c_smem, c_bar=c_bar, n_smem=n_smem, n_bar=n_bar, q_smem=q_smem,
        q_bar=q_bar, dqq_smem=dqq_smem, vecWinter=vecWinter, vecDenInv=vecDenInv, vecDnq=vecDnq,
        dq_dst=dq_ref.at[bh, qrows, dcols], dqq_dst=dqq_ref.at[idk, bh, qrows], qk_scale=qk_scale,
        interpret=interpret,
    )


# ---------------------------------------------------------------------------------------------
# 3. dK from dS


def _dk_kernel(
    q_ref,  # (BH, S, DHQK) gmem
    k_ref,  # (BH, S, DHQK)
    v_ref,  # (BH, S, DHV)
    ds_ref,  # (BH, S, L)
    wstate_ref,  # (BH, S / 64, 64) f32: vecWstate
    dc_ref,  # (BH, NC + 1, DHQK, DHV) kernel dtype
    dn_ref,  # (BH, NC + 1, DHQK) f32
    dk_ref,  # out (BH, S, DHQK) kernel dtype
    dkk_ref,  # out (DHQK / bK, BH, S) f32
    dkks_ref,  # out (DHQK / bK, BH, S) f32
    smem,
    bars,
    *,
    L: int,
    bK: int,
    qk_scale: float,
    interpret: bool,
):
    plgpu = _mosaic().plgpu()
    v_smem, dc_smem, k_smem, q_smem, ds_smem, wstate_smem, dn_smem, dkk_smem, dkks_smem = smem
    v_bar, dc_bar, k_bar, wstate_bar, dn_bar, q_bar, ds_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout = wg.reduce(1)
    load = functools.partial(_mosaic().load, interpret=interpret)

    idk = lax.axis_index("d")
    kb = lax.axis_index("k")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(kb, jnp.int32(nb))
    ik = lax.rem(kb, jnp.int32(nb))
    dcols = pl.ds(idk * bK, bK)
    krows = pl.ds(kb * BLOCK, BLOCK)

    def fetch(j, slot):  # query block ik + j of the chunk (global block kb + j)
        qrows = pl.ds((kb + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(q_ref.at[bh, qrows, dcols], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(ds_ref.at[bh, qrows, pl.ds(ik * BLOCK, BLOCK)], ds_smem.at[slot],
                                ds_bar.at[slot])

    fetch(0, 0)
    plgpu.copy_gmem_to_smem(v_ref.at[bh, krows], v_smem, v_bar)
    plgpu.copy_gmem_to_smem(dc_ref.at[bh, chunk + 1, dcols], dc_smem, dc_bar)
    plgpu.copy_gmem_to_smem(wstate_ref.at[bh, kb], wstate_smem, wstate_bar)
    plgpu.copy_gmem_to_smem(dn_ref.at[bh, chunk + 1, dcols], dn_smem, dn_bar)
    plgpu.copy_gmem_to_smem(k_ref.at[bh, krows, dcols], k_smem, k_bar)
    matAcc = _accumulate_ds((BLOCK, bK), nb - ik, fetch, ds_smem, ds_bar, q_smem, q_bar,
                            transpose_ds=True, interpret=interpret)

    plgpu.barrier_wait(wstate_bar)
    vecWstate = load(wstate_smem, row_layout)
    plgpu.barrier_wait(v_bar)
    finish_dk(
        matAcc, v_smem=v_smem, dc_buf=dc_smem, dc_bar=dc_bar, dn_smem=dn_smem, dn_bar=dn_bar,
        k_smem=k_smem, k_bar=k_bar, dkk_smem=dkk_smem, dkks_smem=dkks_smem, vecWstate=vecWstate,
        dk_dst=dk_ref.at[bh, krows, dcols], dkk_dst=dkk_ref.at[idk, bh, krows],
        dkks_dst=dkks_ref.at[idk, bh, krows], qk_scale=qk_scale, interpret=interpret,
    )


def _check(name, matQ, matK, matV, matDH, L, bK, *state_pairs):
    """``ValueError`` for sizes the kernels do not take, and for arguments (the state pairs: C and n,
    dC and dn) whose shapes disagree."""
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    NC = S // L if L else 0
    if not L or S % L or L % BLOCK or DHQK % bK or bK % 64 or DHV % 64:
        raise ValueError(
            f"{name} needs S % L == 0, L % 64 == 0, DHQK % bK == 0, bK % 64 == 0, DHV % 64 == 0; "
            f"got S={S}, L={L}, DHQK={DHQK}, bK={bK}, DHV={DHV}"
        )
    if split_smem_bytes(DHQK, DHV, bK) > SMEM_LIMIT or ds_smem_bytes(DHV) > SMEM_LIMIT:
        raise ValueError(
            f"{name}: the tiles at DHQK={DHQK}, DHV={DHV}, bK={bK} need "
            f"{max(split_smem_bytes(DHQK, DHV, bK), ds_smem_bytes(DHV))} bytes of shared memory "
            f"(limit {SMEM_LIMIT}); use bw_kernels='mosaic' or 'triton'"
        )
    if (matK.shape != matQ.shape or matK.dtype != matQ.dtype or matV.shape != (BH, S, DHV)
            or matDH.shape != (BH, S, DHV)):
        raise ValueError(
            f"{name}: matK must be {matQ.shape} {jnp.dtype(matQ.dtype).name}, matV and matDH "
            f"{(BH, S, DHV)}; got {matK.shape} {matK.dtype}, {matV.shape}, {matDH.shape}"
        )
    for states, vec_states in state_pairs:
        if states.shape != (BH, NC + 1, DHQK, DHV) or vec_states.shape != (BH, NC + 1, DHQK):
            raise ValueError(
                f"{name}: the state arrays must be {(BH, NC + 1, DHQK, DHV)} and {(BH, NC + 1, DHQK)}; "
                f"got {states.shape}, {vec_states.shape}"
            )


def parallel_bw_dqdk_split_mosaic(
    dq_args: tuple,  # chunkwise_backward's dQ arguments (the Triton dQ kernel's, same order)
    dk_args: tuple,  # chunkwise_backward's dK arguments (the Triton dK kernel's, same order)
    *,
    L: int,
    qk_scale: float,
    interpret: bool,
    bK: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """(dQ, <dq, q>, dK, <dk, k>, <dk_state, k>): the outputs of the Triton kernels
    ``pallas.bw_parallel_dq.parallel_bw_dq`` and ``pallas.bw_parallel_dk.parallel_bw_dk`` for their
    arguments, through one dS kernel and the dQ and dK kernels of this module. ``ValueError`` where
    the tiles do not fit (``fits``) or the arguments disagree."""
    (matQ, matK, matV, matDH, vecQlog, vecKlog, vecWinter, vecDenInv, vecDnq, vecStart,
     matC_states, vecN_states) = dq_args
    (_, _, _, _, _, _, vecWstate, _, _, _, matDC_states, vecDN_states) = dk_args
    plgpu = _mosaic().plgpu()
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    dtype = matQ.dtype
    bK = split_bK(DHQK, DHV) if bK is None else bK
    _check("parallel_bw_dqdk_split_mosaic", matQ, matK, matV, matDH, L, bK,
           (matC_states, vecN_states), (matDC_states, vecDN_states))
    matV, matDH = matV.astype(dtype), matDH.astype(dtype)
    matDS = score_gradients_mosaic(matV, matDH, vecQlog, vecKlog, vecDenInv, vecDnq, vecStart, L=L,
                                   interpret=interpret)
    nB, nDK = S // BLOCK, DHQK // bK
    tr = _tr()
    interp = _mosaic().interpret_params(interpret)

    # dQ
    smem = (
        plgpu.SMEM((BLOCK, DHV), dtype, transforms=tr),  # dh of the query block
        plgpu.SMEM((bK, DHV), dtype, transforms=tr),  # entering state tile C_{c-1}
        plgpu.SMEM((BLOCK, bK), dtype, transforms=tr),  # q tile, then the dQ tile
        plgpu.SMEM((2, BLOCK, bK), dtype, transforms=tr),  # k tile, 2 slots
        plgpu.SMEM((2, BLOCK, BLOCK), dtype, transforms=tr),  # dS tile, 2 slots
        plgpu.SMEM((3, BLOCK), _F32),
        plgpu.SMEM((bK,), _F32),  # n_{c-1} tile
        plgpu.SMEM((BLOCK,), _F32),  # <dq, q>
    )
    bars = tuple(plgpu.Barrier() for _ in range(5)) + (
        plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2))
    body = _mosaic().named_body(
        functools.partial(_dq_kernel, L=L, bK=bK, qk_scale=float(qk_scale), interpret=bool(interpret)),
        "mlstm_mosaic_parallel_bw_dq_split",
    )
    matDQ, vecDqq = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((BH, S, DHQK), dtype), jax.ShapeDtypeStruct((nDK, BH, S), _F32)),
        scratch_types=[smem, bars], grid=(nDK, nB, BH), grid_names=("d", "q", "bh"),
        compiler_params=plgpu.CompilerParams(), interpret=interp,
    )(matQ, matK, matDH, matDS, block_rows(vecWinter, vecDenInv, vecDnq), matC_states.astype(dtype),
      vecN_states.astype(_F32))

    # dK
    smem = (
        plgpu.SMEM((BLOCK, DHV), dtype, transforms=tr),  # v of the key block
        plgpu.SMEM((bK, DHV), dtype, transforms=tr),  # dC tile of the chunk
        plgpu.SMEM((BLOCK, bK), dtype, transforms=tr),  # k tile, then the dK tile
        plgpu.SMEM((2, BLOCK, bK), dtype, transforms=tr),  # q tile, 2 slots
        plgpu.SMEM((2, BLOCK, BLOCK), dtype, transforms=tr),  # dS tile, 2 slots
        plgpu.SMEM((BLOCK,), _F32),  # Wstate of the key block
        plgpu.SMEM((bK,), _F32),  # dn tile
        plgpu.SMEM((BLOCK,), _F32),  # <dk, k>
        plgpu.SMEM((BLOCK,), _F32),  # <dk_state, k>
    )
    bars = tuple(plgpu.Barrier() for _ in range(5)) + (
        plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2))
    body = _mosaic().named_body(
        functools.partial(_dk_kernel, L=L, bK=bK, qk_scale=float(qk_scale), interpret=bool(interpret)),
        "mlstm_mosaic_parallel_bw_dk_split",
    )
    matDK, vecDkk, vecDkkState = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((BH, S, DHQK), dtype), jax.ShapeDtypeStruct((nDK, BH, S), _F32),
                  jax.ShapeDtypeStruct((nDK, BH, S), _F32)),
        scratch_types=[smem, bars], grid=(nDK, nB, BH), grid_names=("d", "k", "bh"),
        compiler_params=plgpu.CompilerParams(), interpret=interp,
    )(matQ, matK, matV, matDS, vecWstate.astype(_F32).reshape(BH, nB, BLOCK), matDC_states.astype(dtype),
      vecDN_states.astype(_F32))
    return matDQ, jnp.sum(vecDqq, axis=0), matDK, jnp.sum(vecDkk, axis=0), jnp.sum(vecDkkState, axis=0)
