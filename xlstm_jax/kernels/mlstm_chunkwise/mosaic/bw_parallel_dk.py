"""Backward parallel kernel for dK in Mosaic GPU: dK of one 64-row key block and one DHQK tile per
program, with the row sums <dk_s, k_s> and <dk_state_s, k_s> the gate gradients need.

Notation (see ``bw_parallel_dv.py`` and the Triton kernel ``pallas/bw_parallel_dk.py``, which
computes the same): bK the DHQK tile of a program. For key s in chunk k, with
dP[t, s] = dh_t . v_s / den_t + dnq_t:

    dk_s = qk_scale sum_{t >= s in chunk, z_t <= s} dP[t, s] exp2(vecQlog_t + vecKlog_s) q_t
           + Wstate_s (dC_k v_s + dn_k)                                        (the state part)

with dC_k, dn_k the cotangents of the state leaving chunk k (row k + 1 of the recurrent backward
kernel's outputs, read directly).

Design (``bw_parallel_dv``'s, with the products of the Triton dK kernel):

* Grid (DHQK / bK, S / 64, BH). A program of key block b (block ik inside chunk c) loops over the
  query blocks of its chunk from the diagonal on.
* Shared memory (16-bit tiles, (8, 64) tiling, 128-byte swizzle): v (64, DHV) and the k tile
  (64, bK) loaded once; dh (64, DHV), the q tile (64, bK) and the per-query vectors
  double-buffered; the state-cotangent tile dC_c (bK, DHV) in a buffer of its own at bK = 128,
  and at bK = 64 (the same shape as a dh tile) in the dh slot that the last loop step leaves free
  (its TMA issued at the start of that step, overlapping its products). The k tile is read into
  registers for the row sums at the end and its buffer then holds the dK tile for the TMA store.
  Standard heads (DHQK 128, DHV 256, bK 128): 32 + 16 + 64 + 2 * (32 + 16) = 208 KB; 7B heads
  (256, 512, bK 64): 64 + 8 + 2 * (64 + 8) = 216 KB; small heads (64, 128, bK 64): 72 KB.
* Per query block: dP^T = v dh^T (wgmma over DHV), scaled per query column by 1 / den_t and
  shifted by dnq_t, the gate matrix with the causal and reset masks, and acc += dS^T q (dS^T as a
  16-bit register operand). After the loop the state part: v dC_c^T (wgmma, the state tile
  transposed in shared memory) + dn_c, times Wstate (after the loop so that its 64 x bK f32
  accumulator is not live beside the loop's: 64 + 32 registers per thread at bK = 128).
* Outputs: the dK tile (64, bK) in the kernel dtype, and per (DHQK tile, key row) the two fp32 row
  sums (64 values each: (DHQK / bK, BH, S) arrays that the launcher sums over the tiles).

``interpret=True``: Mosaic GPU's interpret mode on CPU (see ``fw_parallel.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .fw_parallel import BLOCK, _mosaic, block_rows, block_starts, key_block_mask

N_QVECS = 3
"""Per-query vectors packed into one (3, 64) TMA tile: vecQlog, 1 / den, dnq."""
N_KVECS = 2
"""Per-key vectors packed into one (2, 64) TMA tile: vecKlog, vecWstate."""
SMEM_LIMIT = 220 * 1024
"""Shared memory a program may ask for (the H100/H200 allow 227 KB per block; the rest is margin
for barriers and the compiler's own scratch)."""
_F32 = jnp.float32


def reuses_slot(bK: int) -> bool:
    """Whether the state tile (bK, DHV) goes into a freed double-buffer slot of the (64, DHV) tiles
    (the same shape when bK == 64) instead of a buffer of its own."""
    return bK == BLOCK


def smem_bytes(DHQK: int, DHV: int, bK: int, itemsize: int = 2) -> int:
    """Shared memory of one program (tiles and vectors; ``fits`` compares it with SMEM_LIMIT)."""
    del DHQK
    state = 0 if reuses_slot(bK) else bK * DHV
    tiles = BLOCK * DHV + BLOCK * bK + state + 2 * (BLOCK * DHV + BLOCK * bK)
    vecs = 4 * (N_KVECS * BLOCK + 2 * N_QVECS * BLOCK + 2 * BLOCK + bK + 2 * BLOCK)
    return tiles * itemsize + vecs


def default_bK(DHQK: int, DHV: int) -> int:
    """The DHQK tile: 128 (one tile at the standard heads) where it fits, else 64."""
    return 128 if DHQK % 128 == 0 and smem_bytes(DHQK, DHV, 128) <= SMEM_LIMIT else 64


def fits(DHQK: int, DHV: int) -> bool:
    """Whether the kernel's tiles fit in shared memory at these (padded) head dims."""
    return DHQK % 64 == 0 and smem_bytes(DHQK, DHV, default_bK(DHQK, DHV)) <= SMEM_LIMIT


def _kernel(
    q_ref,  # (BH, S, DHQK) gmem
    k_ref,  # (BH, S, DHQK)
    v_ref,  # (BH, S, DHV)
    dh_ref,  # (BH, S, DHV)
    qvec_ref,  # (BH, S / 64, 3, 64) f32: vecQlog, 1 / den, dnq
    start_ref,  # (BH, S / 64, 64) int32: z_t - chunk start
    kvec_ref,  # (BH, S / 64, 2, 64) f32: vecKlog, vecWstate
    dc_ref,  # (BH, NC + 1, DHQK, DHV) kernel dtype
    dn_ref,  # (BH, NC + 1, DHQK) f32
    dk_ref,  # out (BH, S, DHQK) kernel dtype
    dkk_ref,  # out (DHQK / bK, BH, S) f32: <dk_s, k_s> over this tile's columns
    dkks_ref,  # out (DHQK / bK, BH, S) f32: <dk_state_s, k_s> over this tile's columns
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
    if reuse:  # the dC tile goes into a freed dh slot in the last loop step
        (v_smem, k_smem, dh_smem, q_smem, kvec_smem, qvec_smem, start_smem, dn_smem,
         dkk_smem, dkks_smem) = smem
        dc_smem = None
    else:
        (v_smem, k_smem, dc_smem, dh_smem, q_smem, kvec_smem, qvec_smem, start_smem, dn_smem,
         dkk_smem, dkks_smem) = smem
    v_bar, k_bar, dc_bar, kvec_bar, dn_bar, dh_bar, q_bar, qvec_bar, start_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout, col_layout = wg.reduce(1), wg.reduce(0)
    load = functools.partial(_mosaic().load, interpret=interpret)
    dtype = k_smem.dtype

    idk = lax.axis_index("d")
    kb = lax.axis_index("k")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(kb, jnp.int32(nb))
    ik = lax.rem(kb, jnp.int32(nb))
    dcols = pl.ds(idk * bK, bK)
    krows = pl.ds(kb * BLOCK, BLOCK)

    def fetch_q(j, slot):  # query block ik + j of the chunk (global block kb + j)
        qrows = pl.ds((kb + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(dh_ref.at[bh, qrows], dh_smem.at[slot], dh_bar.at[slot])
        plgpu.copy_gmem_to_smem(q_ref.at[bh, qrows, dcols], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(qvec_ref.at[bh, kb + j], qvec_smem.at[slot], qvec_bar.at[slot])
        plgpu.copy_gmem_to_smem(start_ref.at[bh, kb + j], start_smem.at[slot], start_bar.at[slot])

    plgpu.copy_gmem_to_smem(v_ref.at[bh, krows], v_smem, v_bar)
    plgpu.copy_gmem_to_smem(kvec_ref.at[bh, kb], kvec_smem, kvec_bar)
    plgpu.copy_gmem_to_smem(dn_ref.at[bh, chunk + 1, dcols], dn_smem, dn_bar)
    dc_tile = dc_ref.at[bh, chunk + 1, dcols]  # (bK, DHV)
    if not reuse:
        plgpu.copy_gmem_to_smem(dc_tile, dc_smem, dc_bar)
    fetch_q(0, 0)
    plgpu.copy_gmem_to_smem(k_ref.at[bh, krows, dcols], k_smem, k_bar)

    plgpu.barrier_wait(kvec_bar)
    vecKlog = load(kvec_smem.at[0], row_layout)
    vecWstate = load(kvec_smem.at[1], row_layout)
    shape_s = (BLOCK, BLOCK)
    idx_r = _mosaic().iota(shape_s, 0, wg, interpret=interpret)  # key row s (block-local)
    idx_c = _mosaic().iota(shape_s, 1, wg, interpret=interpret)  # query column t (block-local)
    matKlog = lax.broadcast_in_dim(vecKlog, shape_s, [0])
    shape_dk = (BLOCK, bK)

    n_iter = nb - ik
    plgpu.barrier_wait(v_bar)  # v is read by every step's dP^T and by the state part

    def step(j, matAcc):
        """Query block ik + j of the chunk: acc -> acc + dS^T q of this block."""
        slot = lax.rem(j, jnp.int32(2))

        @pl.when(j + 1 < n_iter)
        def _prefetch():  # the other slot was last read by block j - 1, whose wgmmas are done
            fetch_q(j + 1, 1 - slot)

        if reuse:

            @pl.when(j + 1 == n_iter)
            def _prefetch_state():  # the last step: the other dh slot is free for the dC tile
                plgpu.copy_gmem_to_smem(dc_tile, dh_smem.at[1 - slot], dc_bar)

        plgpu.barrier_wait(dh_bar.at[slot])
        plgpu.barrier_wait(qvec_bar.at[slot])
        plgpu.barrier_wait(start_bar.at[slot])

        matDPt = _mosaic().dot_nt(v_smem, dh_smem.at[slot], interpret=interpret)
        vecQlog = load(qvec_smem.at[slot, 0], col_layout)
        vecDenInv = load(qvec_smem.at[slot, 1], col_layout)
        vecDnq = load(qvec_smem.at[slot, 2], col_layout)
        vecStart = load(start_smem.at[slot], col_layout)
        matDPt = matDPt * lax.broadcast_in_dim(vecDenInv, shape_s, [1]) + lax.broadcast_in_dim(
            vecDnq, shape_s, [1]
        )
        matLogD = matKlog + lax.broadcast_in_dim(vecQlog, shape_s, [1])
        mask = key_block_mask(idx_r, idx_c, j, ik, lax.broadcast_in_dim(vecStart, shape_s, [1]))
        matDSt = (matDPt * jnp.exp2(jnp.where(mask, matLogD, -jnp.inf))).astype(dtype)
        plgpu.barrier_wait(q_bar.at[slot])
        return _mosaic().dot_acc(matAcc, matDSt, q_smem.at[slot], interpret=interpret)

    matAcc0 = _mosaic().layout_cast(jnp.zeros(shape_dk, _F32), wg, interpret=interpret)
    matAcc = lax.fori_loop(jnp.int32(0), n_iter, step, matAcc0)

    dc_buf = dh_smem.at[lax.rem(n_iter, jnp.int32(2))] if reuse else dc_smem  # the last step's other slot
    finish_dk(
        matAcc, v_smem=v_smem, dc_buf=dc_buf, dc_bar=dc_bar, dn_smem=dn_smem, dn_bar=dn_bar,
        k_smem=k_smem, k_bar=k_bar, dkk_smem=dkk_smem, dkks_smem=dkks_smem, vecWstate=vecWstate,
        dk_dst=dk_ref.at[bh, krows, dcols], dkk_dst=dkk_ref.at[idk, bh, krows],
        dkks_dst=dkks_ref.at[idk, bh, krows], qk_scale=qk_scale, interpret=interpret,
    )


def finish_dk(matAcc, *, v_smem, dc_buf, dc_bar, dn_smem, dn_bar, k_smem, k_bar, dkk_smem, dkks_smem,
              vecWstate, dk_dst, dkk_dst, dkks_dst, qk_scale: float, interpret: bool):
    """The end of a dK program (also the split kernel's, ``bw_parallel_split``), after its loop
    over the query blocks has summed ``matAcc`` (64, bK): the state part Wstate_s (dC_c v_s + dn_c)
    (after the loop, so that its accumulator is not live across it; the state-cotangent tile
    ``dc_buf``), dK = acc qk_scale + state part, the row sums <dk, k> and <dk_state, k>, and the
    TMA stores of the three (the k buffer holds the dK tile)."""
    plgpu = _mosaic().plgpu()
    wg = plgpu.Layout.WGMMA
    load = functools.partial(_mosaic().load, interpret=interpret)
    shape_dk = matAcc.shape
    plgpu.barrier_wait(dc_bar)
    plgpu.barrier_wait(dn_bar)
    matState = _mosaic().dot_nt(v_smem, dc_buf, interpret=interpret)
    vecDn = load(dn_smem, wg.reduce(0))
    matDKstate = (matState + lax.broadcast_in_dim(vecDn, shape_dk, [1])) * lax.broadcast_in_dim(
        vecWstate, shape_dk, [0]
    )

    matDK = matAcc * qk_scale + matDKstate

    plgpu.barrier_wait(k_bar)
    matK = load(k_smem, wg).astype(_F32)
    dkk_smem[...] = jnp.sum(matDK * matK, axis=1)
    dkks_smem[...] = jnp.sum(matDKstate * matK, axis=1)
    k_smem[...] = matDK.astype(k_smem.dtype)  # k has been read: its buffer holds the dK tile
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_dst)
    plgpu.copy_smem_to_gmem(dkk_smem, dkk_dst)
    plgpu.copy_smem_to_gmem(dkks_smem, dkks_dst)
    plgpu.wait_smem_to_gmem(0)


def parallel_bw_dk_mosaic(
    matQ: jax.Array,  # (BH, S, DHQK) bf16/f16, S a multiple of L, DHQK a multiple of 64
    matK: jax.Array,  # (BH, S, DHQK)
    matV: jax.Array,  # (BH, S, DHV), DHV a multiple of 64
    matDH: jax.Array,  # (BH, S, DHV)
    vecQlog: jax.Array,  # (BH, S) f32
    vecKlog: jax.Array,  # (BH, S) f32
    vecWstate: jax.Array,  # (BH, S) f32
    vecDenInv: jax.Array,  # (BH, S) f32
    vecDnq: jax.Array,  # (BH, S) f32
    vecStart: jax.Array,  # (BH, S) int32 (absolute step index z_t)
    matDC_states: jax.Array,  # (BH, NC + 1, DHQK, DHV) any float dtype (cast to the kernel dtype)
    vecDN_states: jax.Array,  # (BH, NC + 1, DHQK)
    *,
    L: int,
    qk_scale: float,
    interpret: bool,
    bK: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dK (BH, S, DHQK) in the dtype of q, <dk, k> (BH, S), <dk_state, k> (BH, S) f32): the
    outputs of the Triton kernel ``pallas.bw_parallel_dk.parallel_bw_dk`` for its arguments (same
    meaning). ``ValueError`` where the tiles do not fit (``fits``)."""
    plgpu = _mosaic().plgpu()
    BH, S, DHQK = matQ.shape
    DHV = matV.shape[-1]
    dtype = matQ.dtype
    NC = S // L
    bK = default_bK(DHQK, DHV) if bK is None else bK
    if S % L or L % BLOCK or DHQK % bK or bK % 64 or DHV % 64:
        raise ValueError(
            f"parallel_bw_dk_mosaic needs S % L == 0, L % 64 == 0, DHQK % bK == 0, bK % 64 == 0, "
            f"DHV % 64 == 0; got S={S}, L={L}, DHQK={DHQK}, bK={bK}, DHV={DHV}"
        )
    if smem_bytes(DHQK, DHV, bK) > SMEM_LIMIT:
        raise ValueError(
            f"parallel_bw_dk_mosaic: the tiles at DHQK={DHQK}, DHV={DHV}, bK={bK} need "
            f"{smem_bytes(DHQK, DHV, bK)} bytes of shared memory (limit {SMEM_LIMIT}); use the Triton kernel"
        )
    if (matK.shape != matQ.shape or matK.dtype != dtype or matV.shape != (BH, S, DHV)
            or matDH.shape != (BH, S, DHV)):
        raise ValueError(
            f"parallel_bw_dk_mosaic: matK must be {matQ.shape} {jnp.dtype(dtype).name}, matV and matDH "
            f"{(BH, S, DHV)}; got {matK.shape} {matK.dtype}, {matV.shape}, {matDH.shape}"
        )
    if matDC_states.shape != (BH, NC + 1, DHQK, DHV) or vecDN_states.shape != (BH, NC + 1, DHQK):
        raise ValueError(
            f"matDC_states and vecDN_states must be {(BH, NC + 1, DHQK, DHV)} and {(BH, NC + 1, DHQK)}; "
            f"got {matDC_states.shape}, {vecDN_states.shape}"
        )
    nB, nDK = S // BLOCK, DHQK // bK
    qvec = block_rows(vecQlog, vecDenInv, vecDnq)  # (BH, nB, 3, 64)
    kvec = block_rows(vecKlog, vecWstate)
    start = block_starts(vecStart, L)
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((BLOCK, DHV), dtype, transforms=tr),  # v of the key block
        plgpu.SMEM((BLOCK, bK), dtype, transforms=tr),  # k tile, then the dK tile
    ) + (() if reuses_slot(bK) else (
        plgpu.SMEM((bK, DHV), dtype, transforms=tr),  # dC tile of the chunk
    )) + (
        plgpu.SMEM((2, BLOCK, DHV), dtype, transforms=tr),  # dh, 2 slots (bK 64: one takes dC last)
        plgpu.SMEM((2, BLOCK, bK), dtype, transforms=tr),  # q tile, 2 slots
        plgpu.SMEM((N_KVECS, BLOCK), _F32),
        plgpu.SMEM((2, N_QVECS, BLOCK), _F32),  # per-query vectors, 2 slots
        plgpu.SMEM((2, BLOCK), jnp.int32),  # reset starts, 2 slots
        plgpu.SMEM((bK,), _F32),  # dn tile of the chunk
        plgpu.SMEM((BLOCK,), _F32),  # <dk, k>
        plgpu.SMEM((BLOCK,), _F32),  # <dk_state, k>
    )
    bars = (
        plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(),
        plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=2),
    )
    body = _mosaic().named_body(
        functools.partial(_kernel, L=L, bK=bK, qk_scale=float(qk_scale), interpret=bool(interpret)),
        "mlstm_mosaic_parallel_bw_dk",
    )
    call = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((BH, S, DHQK), dtype),
            jax.ShapeDtypeStruct((nDK, BH, S), _F32),
            jax.ShapeDtypeStruct((nDK, BH, S), _F32),
        ),
        scratch_types=[smem, bars],
        grid=(nDK, nB, BH),
        grid_names=("d", "k", "bh"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_mosaic().interpret_params(interpret),
    )
    matDK, vecDkk, vecDkkState = call(
        matQ, matK, matV.astype(dtype), matDH.astype(dtype), qvec, start, kvec,
        matDC_states.astype(dtype), vecDN_states.astype(_F32),
    )
    return matDK, jnp.sum(vecDkk, axis=0), jnp.sum(vecDkkState, axis=0)
