"""Backward parallel kernel for dV in Mosaic GPU: dV of one 64-row key block per program.

Notation (see ``fw_parallel.py`` and the Triton kernel ``pallas/bw_parallel_dv.py``, which computes
the same): BH = B * NH, L the intra chunk (a multiple of 64), BLOCK = 64 key rows per program =
query rows per loop step, bV the DHV tile of a program. For key s in chunk k:

    dv_s = Wstate_s k_s^T dC_k  +  sum_{t >= s in chunk, z_t <= s} P_ts dh_t / den_t
    P_ts = (qs_t . k_s) exp2(vecQlog_t + vecKlog_s)

with dC_k the cotangent of the state leaving chunk k (row k + 1 of the recurrent backward kernel's
(NC + 1)-row output, read directly), Wstate_s = vecWstate_s, den_t the forward's normaliser
(``vecDenInv`` = 1 / den_t) and z_t the latest reset <= t in the chunk (``vecStart``, passed
chunk-relative). V enters neither the normaliser nor m, so dV is the same in both gradient modes.

Design (the forward kernel's, transposed: one warpgroup of 128 threads, no warp specialisation):

* Grid (DHV / bV, S / 64, BH), one CTA per (DHV tile, key block, batch*head). A program of key
  block b (block ik = b mod (L/64) inside chunk c) loops over the L/64 - ik query blocks of its
  chunk from the diagonal on: the causal triangle, like the Triton kernel.
* Shared memory (16-bit tiles in the (8, 64) tiling with the 128-byte swizzle): the k block
  (64, DHQK) and the state-cotangent tile dC_c (DHQK, bV) loaded once by TMA; q (64, DHQK), dh
  (64, bV) and the per-query vectors in ``slots`` buffers (``fw_parallel.PIPELINE_SLOTS``): with 2
  the TMA load of query block j + 1 overlaps the two wgmmas and the gate math of block j, with 1 it
  follows them; the output tile (64, bV). At DHQK = 128, bV = 128: 16 + 32 + 2 * (16 + 16) + 16 KB
  = 128 KB with two slots, 96 KB with one (two CTAs per SM: the default there); at DHQK = 256 (7B
  heads): 32 + 64 + 2 * (32 + 16) + 16 = 208 KB (the forward kernel's budget).
* First the state term: acc = Wstate_s * (k dC_c) (wgmma from two shared-memory operands, a
  64 x bV f32 accumulator). Then per query block: S^T = k q^T (wgmma, 64 x 64 f32), the gate
  matrix exp2(Klog_s + Qlog_t) with the causal and reset masks, scaled per query column by
  qk_scale / den_t, and acc += P^T dh (wgmma with P^T as a register operand in the 16-bit kernel
  dtype; ``pl.run_state`` awaits it before the slot is refilled). The registers: the forward's.
* Output: the dV tile (64, bV) in the kernel dtype (the Triton kernel's output dtype).

Everything Mosaic-specific comes from ``xlstm_jax.kernels.pallas._mosaic`` (imported lazily).
``interpret=True`` runs the kernel in Mosaic GPU's interpret mode on CPU (arithmetic and
synchronisation checked; layouts and resources only by lowering for CUDA, see the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .fw_parallel import BLOCK, _mosaic, block_rows, block_starts, check_slots, key_block_mask, streamed_loop

N_QVECS = 2
"""Per-query vectors packed into one (2, 64) TMA tile: vecQlog, qk_scale / den."""
N_KVECS = 2
"""Per-key vectors packed into one (2, 64) TMA tile: vecKlog, vecWstate."""
_F32 = jnp.float32


def _kernel(
    q_ref,  # (BH, S, DHQK) gmem
    k_ref,  # (BH, S, DHQK)
    dh_ref,  # (BH, S, DHV)
    qvec_ref,  # (BH, S / 64, 2, 64) f32: vecQlog, qk_scale / den
    start_ref,  # (BH, S / 64, 64) int32: z_t - chunk start
    kvec_ref,  # (BH, S / 64, 2, 64) f32: vecKlog, vecWstate
    dc_ref,  # (BH, NC + 1, DHQK, DHV) kernel dtype: row k + 1 is the cotangent of C leaving chunk k
    dv_ref,  # out (BH, S, DHV) kernel dtype
    smem,
    bars,
    *,
    L: int,
    bV: int,
    slots: int,
    interpret: bool,
):
    plgpu = _mosaic().plgpu()
    k_smem, dc_smem, q_smem, dh_smem, dv_smem, kvec_smem, qvec_smem, start_smem = smem
    k_bar, dc_bar, kvec_bar, q_bar, dh_bar, qvec_bar, start_bar = bars
    wg = plgpu.Layout.WGMMA
    row_layout, col_layout = wg.reduce(1), wg.reduce(0)
    load = functools.partial(_mosaic().load, interpret=interpret)
    dtype = k_smem.dtype
    DHQK = k_smem.shape[-1]

    iv = lax.axis_index("v")
    kb = lax.axis_index("k")
    bh = lax.axis_index("bh")
    nb = L // BLOCK
    chunk = lax.div(kb, jnp.int32(nb))
    ik = lax.rem(kb, jnp.int32(nb))
    vcols = pl.ds(iv * bV, bV)
    krows = pl.ds(kb * BLOCK, BLOCK)

    def fetch_q(j, slot):  # query block ik + j of the chunk (global block kb + j)
        qrows = pl.ds((kb + j) * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(q_ref.at[bh, qrows], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(dh_ref.at[bh, qrows, vcols], dh_smem.at[slot], dh_bar.at[slot])
        plgpu.copy_gmem_to_smem(qvec_ref.at[bh, kb + j], qvec_smem.at[slot], qvec_bar.at[slot])
        plgpu.copy_gmem_to_smem(start_ref.at[bh, kb + j], start_smem.at[slot], start_bar.at[slot])

    plgpu.copy_gmem_to_smem(k_ref.at[bh, krows], k_smem, k_bar)
    plgpu.copy_gmem_to_smem(kvec_ref.at[bh, kb], kvec_smem, kvec_bar)
    fetch_q(0, 0)
    plgpu.copy_gmem_to_smem(dc_ref.at[bh, chunk + 1, pl.ds(0, DHQK), vcols], dc_smem, dc_bar)

    plgpu.barrier_wait(kvec_bar)
    vecKlog = load(kvec_smem.at[0], row_layout)
    vecWstate = load(kvec_smem.at[1], row_layout)
    shape_s = (BLOCK, BLOCK)
    idx_r = _mosaic().iota(shape_s, 0, wg, interpret=interpret)  # key row s (block-local)
    idx_c = _mosaic().iota(shape_s, 1, wg, interpret=interpret)  # query column t (block-local)
    matKlog = lax.broadcast_in_dim(vecKlog, shape_s, [0])
    plgpu.barrier_wait(k_bar)

    n_iter = nb - ik
    shape_dv = (BLOCK, bV)

    # the state term first: acc = Wstate_s * (k_s^T dC_c)
    plgpu.barrier_wait(dc_bar)

    matAcc0 = _mosaic().dot_nn(k_smem, dc_smem) * lax.broadcast_in_dim(vecWstate, shape_dv, [0])

    def step(j, slot, matAcc):
        """Query block ik + j of the chunk: acc -> acc + P^T dh of this block."""
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(qvec_bar.at[slot])
        plgpu.barrier_wait(start_bar.at[slot])

        matSt = _mosaic().dot_nt(k_smem, q_smem.at[slot], interpret=interpret)
        vecQlog = load(qvec_smem.at[slot, 0], col_layout)
        vecScale = load(qvec_smem.at[slot, 1], col_layout)
        vecStart = load(start_smem.at[slot], col_layout)
        matLogD = matKlog + lax.broadcast_in_dim(vecQlog, shape_s, [1])
        mask = key_block_mask(idx_r, idx_c, j, ik, lax.broadcast_in_dim(vecStart, shape_s, [1]))
        matPt = (matSt * lax.broadcast_in_dim(vecScale, shape_s, [1])) * jnp.exp2(
            jnp.where(mask, matLogD, -jnp.inf)
        )
        matPt = matPt.astype(dtype)
        plgpu.barrier_wait(dh_bar.at[slot])
        # awaited: the slot may be refilled (``streamed_loop``)
        return _mosaic().dot_acc(matAcc, matPt, dh_smem.at[slot], interpret=interpret)

    matAcc = streamed_loop(n_iter, slots, fetch_q, step, matAcc0)

    dv_smem[...] = matAcc.astype(dv_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bh, krows, vcols])
    plgpu.wait_smem_to_gmem(0)


def parallel_bw_dv_mosaic(
    matQ: jax.Array,  # (BH, S, DHQK) bf16/f16, S a multiple of L, DHQK a multiple of 64
    matK: jax.Array,  # (BH, S, DHQK)
    matDH: jax.Array,  # (BH, S, DHV), DHV a multiple of bV
    vecQlog: jax.Array,  # (BH, S) f32
    vecKlog: jax.Array,  # (BH, S) f32
    vecWstate: jax.Array,  # (BH, S) f32
    vecDenInv: jax.Array,  # (BH, S) f32
    vecStart: jax.Array,  # (BH, S) int32 (absolute step index z_t)
    matDC_states: jax.Array,  # (BH, NC + 1, DHQK, DHV) any float dtype (cast to the kernel dtype)
    *,
    L: int,
    bV: int,
    qk_scale: float,
    interpret: bool,
    slots: int = 2,
) -> jax.Array:
    """dV (BH, S, DHV) in the dtype of q: the arguments of the Triton kernel
    ``pallas.bw_parallel_dv.parallel_bw_dv`` (same meaning), packed here into the kernel's tiles.
    ``slots``: shared-memory buffers of the streamed q, dh and query-vector tiles
    (``fw_parallel.check_slots``)."""
    plgpu = _mosaic().plgpu()
    BH, S, DHQK = matQ.shape
    DHV = matDH.shape[-1]
    dtype = matQ.dtype
    NC = S // L
    if S % L or L % BLOCK or DHQK % 64 or DHV % bV or bV % 64:
        raise ValueError(
            f"parallel_bw_dv_mosaic needs S % L == 0, L % 64 == 0, DHQK % 64 == 0, DHV % bV == 0, "
            f"bV % 64 == 0; got S={S}, L={L}, DHQK={DHQK}, DHV={DHV}, bV={bV}"
        )
    if matK.shape != matQ.shape or matK.dtype != dtype or matDH.shape != (BH, S, DHV):
        raise ValueError(
            f"parallel_bw_dv_mosaic: matK must be {matQ.shape} {jnp.dtype(dtype).name} and matDH "
            f"{(BH, S, DHV)}; got {matK.shape} {matK.dtype}, {matDH.shape}"
        )
    if matDC_states.shape != (BH, NC + 1, DHQK, DHV):
        raise ValueError(
            f"matDC_states must be {(BH, NC + 1, DHQK, DHV)}; got {matDC_states.shape}"
        )
    check_slots("parallel_bw_dv_mosaic", slots)
    nB = S // BLOCK
    qvec = block_rows(vecQlog, vecDenInv * qk_scale)  # (BH, nB, 2, 64)
    kvec = block_rows(vecKlog, vecWstate)
    start = block_starts(vecStart, L)
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((BLOCK, DHQK), dtype, transforms=tr),  # k
        plgpu.SMEM((DHQK, bV), dtype, transforms=tr),  # dC tile of the chunk
        plgpu.SMEM((slots, BLOCK, DHQK), dtype, transforms=tr),  # q, one tile per slot
        plgpu.SMEM((slots, BLOCK, bV), dtype, transforms=tr),  # dh
        plgpu.SMEM((BLOCK, bV), dtype, transforms=tr),  # dv tile
        plgpu.SMEM((N_KVECS, BLOCK), _F32),
        plgpu.SMEM((slots, N_QVECS, BLOCK), _F32),  # per-query vectors
        plgpu.SMEM((slots, BLOCK), jnp.int32),  # reset starts
    )
    bars = (
        plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(),
        plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
    )
    body = _mosaic().named_body(
        functools.partial(_kernel, L=L, bV=bV, slots=int(slots), interpret=bool(interpret)),
        "mlstm_mosaic_parallel_bw_dv",
    )
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((BH, S, DHV), dtype),
        scratch_types=[smem, bars],
        grid=(DHV // bV, nB, BH),
        grid_names=("v", "k", "bh"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_mosaic().interpret_params(interpret),
    )
    return call(matQ, matK, matDH.astype(dtype), qvec, start, kvec, matDC_states.astype(dtype))
