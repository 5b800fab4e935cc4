"""Kernel body of the fused mLSTM step: gate update, state update and output in one program.

Notation: see ``xlstm_jax.kernels._common``; additionally

    siz_b_DHQK   tile of the DHQK axis that one loop iteration handles (power of two)
    siz_b_DHV    tile of the DHV axis that one program owns (power of two)
    DHQK_p       DHQK as the kernel sees it (a multiple of siz_b_DHQK, zero-padded by the wrapper)

One program handles one (batch, head) pair and one DHV tile. It reads the scalars m, i, f, computes
the new stabilizer and the two gate factors, then walks over the DHQK axis in tiles:

    matC_tile <- fa * matC_tile + (ia * k_tile) v_tile^T         (stored in place)
    vecNum    += (q_tile * qk_scale)^T matC_tile                 (the numerator of h)
    vecN_tile <- fa * vecN_tile + ia * k_tile                    (stored by the first DHV tile only)
    scaQN     += (q_tile * qk_scale) . vecN_tile                 (the normalizer's dot product)

and writes ``h = vecNum / (max(|scaQN|, norm_val * exp(-m_new)) + eps)``. All arithmetic runs in
``acc_dtype`` (float32, or float64 for float64 states); the new stabilizer is rounded to the dtype in
which m is stored *before* it scales the state, so that stored C, n and m stay consistent.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


def _log_sigmoid(x):
    """log(sigmoid(x)) without overflow, in elementary operations that every Pallas backend lowers."""
    return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def mlstm_step_kernel(
    matC_ref,  # (DHQK_p, siz_b_DHV)   state C of one head, one DHV tile
    vecN_ref,  # (DHQK_p,)             state n of one head
    scaM_ref,  # ()                    state m of one head
    vecQ_ref,  # (DHQK_p,)
    vecK_ref,  # (DHQK_p,)
    vecV_ref,  # (siz_b_DHV,)
    scaI_ref,  # ()                    input gate pre-activation
    scaF_ref,  # ()                    forget gate pre-activation
    vecH_ref,  # (siz_b_DHV,)          out: h
    matCout_ref,  # (DHQK_p, siz_b_DHV)  out: new C (aliases matC in HBM)
    vecNout_ref,  # (DHQK_p,)          out: new n (written by the program of DHV tile 0)
    scaMout_ref,  # ()                 out: new m (written by the program of DHV tile 0)
    *,
    siz_b_DHQK: int,
    qk_scale: float,
    eps: float,
    norm_val: float,
    stabilize_correctly: bool,
    acc_dtype,
    max_state: bool = True,
):
    """One mLSTM step for one (batch, head) and one DHV tile; see the module docstring."""
    DHQK_p = vecQ_ref.shape[0]
    siz_b_DHV = vecV_ref.shape[0]
    num_tiles_DHQK = DHQK_p // siz_b_DHQK
    writes_vecN = pl.program_id(1) == 0

    scaM_old = scaM_ref[...].astype(acc_dtype)
    scaI = scaI_ref[...].astype(acc_dtype)
    scaLogF = _log_sigmoid(scaF_ref[...].astype(acc_dtype))
    if max_state:
        scaM_new = jnp.maximum(scaLogF + scaM_old, scaI)
    else:  # the sigmoid cell: input gate log_sigmoid(i), m held at 0 (an old m != 0 is folded into
        # the old state's weight exp(logf + m_old - 0))
        scaI = _log_sigmoid(scaI)
        # zeros shaped by a loaded value, not a constant: Triton's lowering cannot negate a
        # literal (found compiled on an H200, 2026-12-01)
        scaM_new = jnp.zeros_like(scaM_old)
    scaM_new = scaM_new.astype(scaMout_ref.dtype).astype(acc_dtype)  # the m that is stored
    scaFa = jnp.exp(scaLogF + scaM_old - scaM_new)
    scaIa = jnp.exp(scaI - scaM_new)

    vecVa = scaIa * vecV_ref[...].astype(acc_dtype)  # (siz_b_DHV,)
    vecNum = jnp.zeros((siz_b_DHV,), acc_dtype)
    scaQN = jnp.zeros((), acc_dtype)
    for t in range(num_tiles_DHQK):  # static and short: unrolled
        sl = pl.ds(t * siz_b_DHQK, siz_b_DHQK)
        vecQs = vecQ_ref[sl].astype(acc_dtype) * qk_scale  # (siz_b_DHQK,)
        vecK = vecK_ref[sl].astype(acc_dtype)
        matC_tile = scaFa * matC_ref[sl, :].astype(acc_dtype) + vecK[:, None] * vecVa[None, :]
        matCout_ref[sl, :] = matC_tile.astype(matCout_ref.dtype)
        vecNum = vecNum + jnp.sum(vecQs[:, None] * matC_tile, axis=0)
        vecN_tile = scaFa * vecN_ref[sl].astype(acc_dtype) + scaIa * vecK
        scaQN = scaQN + jnp.sum(vecQs * vecN_tile)

        @pl.when(writes_vecN)
        def _store_vecN():
            vecNout_ref[sl] = vecN_tile.astype(vecNout_ref.dtype)

    if stabilize_correctly and max_state:
        scaLower = norm_val * jnp.exp(-scaM_new)
    elif stabilize_correctly:  # m == 0: the lower bound is norm_val itself
        scaLower = jnp.full((), norm_val, acc_dtype)
    else:
        scaLower = jnp.full((), norm_val, acc_dtype)
    scaDen = jnp.maximum(jnp.abs(scaQN), scaLower) + eps
    vecH_ref[...] = (vecNum / scaDen).astype(vecH_ref.dtype)

    @pl.when(writes_vecN)
    def _store_scaM():
        scaMout_ref[...] = scaM_new.astype(scaMout_ref.dtype)
