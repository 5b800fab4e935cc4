"""Forward parallel kernel stage: h from the chunk-border states (the seed's signature over
``pallas.fw_parallel``; checks and layouts from ``..seed_compat``, notation there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...chunking import validate_chunk_size
from ...options import CellOptions
from ...validation import floating_dtype, shape_str
from ..pallas import gates
from ..pallas.autodiff import h_kernel_dtype, resolve_interpret
from ..pallas.fw_parallel import parallel_fw_h
from ..pallas.heuristics import padded_head_dim
from ..seed_compat import (
    array_arg,
    empty,
    flat_seq,
    flat_vec,
    gate_arg,
    gates_with_borders,
    seq_dims,
    stage_tile_params,
    states_in,
    unflat_seq,
    unflat_vec,
)

_KERNEL = "mlstm_chunkwise__parallel_fw_Hintra"
_F32 = jnp.float32


def mlstm_chunkwise__parallel_fw_Hintra(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 1e-6,
    output_dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h (B, NH, S, DHHV), vecN_out (B, NH, S) and vecM_out (B, NH, S) of every step.

    chunk parallel size: siz_b_LQ; chunk loop size: siz_b_LKV; head dim parallel size: siz_b_DHHV;
    head dim loop size: siz_b_DHQK. The per-step m is recomputed from the border m's and the gates.
    """
    d = seq_dims(_KERNEL, "matQ", matQ, "matV", matV)
    because = f"from matQ {shape_str(matQ)}"
    array_arg(_KERNEL, "matK", matK, (d.B, d.NH, d.S, d.DHQK), because)
    vecI = gate_arg(_KERNEL, "vecI", vecI, d, because)
    vecF = gate_arg(_KERNEL, "vecF", vecF, d, because)
    L = validate_chunk_size("chunk_size", chunk_size, pallas=True, S=d.S)
    NC, BH = -(-d.S // L), d.B * d.NH
    because_states = f"{because}, matV {shape_str(matV)} and chunk_size={L}"
    array_arg(_KERNEL, "matC_all", matC_all, (d.B, d.NH, (NC + 1) * d.DHQK, d.DHV), because_states)
    array_arg(_KERNEL, "vecN_all", vecN_all, (d.B, d.NH, (NC + 1) * d.DHQK), because_states)
    array_arg(_KERNEL, "scaM_all", scaM_all, (d.B, d.NH, NC + 1), because_states)
    cell = CellOptions(qk_scale=qk_scale, eps=eps)
    out_dtype = floating_dtype("output_dtype", output_dtype, allow_none=False)
    if BH == 0:
        return empty((d.B, d.NH, d.S, d.DHV), out_dtype), empty((d.B, d.NH, d.S)), empty((d.B, d.NH, d.S))
    S_pad = NC * L
    params = stage_tile_params(S_pad, d.DHQK, d.DHV, matQ.dtype, L, siz_b_LQ, siz_b_LKV, siz_b_DHHV, siz_b_DHQK,
                          num_warps, num_stages)
    Kp, Vp = padded_head_dim(d.DHQK), padded_head_dim(d.DHV)
    q, k = flat_seq(matQ, S_pad, Kp), flat_seq(matK, S_pad, Kp, matQ.dtype)
    v = flat_seq(matV, S_pad, Vp, matQ.dtype)
    i = flat_vec(vecI, S_pad, gates.CLOSED_INPUT_GATE)
    logf = flat_vec(gates.log_forget_gate(vecF), S_pad, 0.0)
    matC, vecN = states_in(matC_all, vecN_all, d.B, d.NH, d.DHQK, d.DHV)
    g, vecM = gates_with_borders(i, logf, scaM_all.astype(_F32).reshape(BH, NC + 1), L)
    matH, vecNq = parallel_fw_h(
        q, k, v, g.vecQlog, g.vecKlog, g.vecWinter, vecM, g.vecStart, matC, vecN, params=params,
        qk_scale=cell.effective_qk_scale(d.DHQK), eps=cell.eps, norm_val=cell.norm_val,
        stabilize_correctly=cell.stabilize_correctly,
        output_dtype=h_kernel_dtype(out_dtype, matQ.dtype), interpret=resolve_interpret(None),
    )
    lam = gates.normalizer_lower_bound(vecM, norm_val=cell.norm_val, stabilize_correctly=cell.stabilize_correctly)
    vecN_out = jnp.maximum(jnp.abs(vecNq), lam)
    return (
        unflat_seq(matH, d.B, d.NH, d.S, d.DHV).astype(out_dtype),
        unflat_vec(vecN_out, d.B, d.NH, d.S),
        unflat_vec(vecM, d.B, d.NH, d.S),
    )
