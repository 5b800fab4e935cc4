"""Backward recurrent kernel stage: cotangents of the chunk-border states (the seed's signature
over ``pallas.bw_recurrent``; checks and layouts from ``..seed_compat``, notation there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...chunking import validate_chunk_size
from ...options import CellOptions
from ...validation import shape_str
from ..pallas import gates
from ..pallas.autodiff import resolve_interpret
from ..pallas.bw_recurrent import recurrent_bw_states
from ..pallas.heuristics import chunkwise_kernel_params, padded_head_dim
from ..seed_compat import array_arg, empty, flat_seq, flat_vec, gate_arg, positive_int, seq_dims, state_in, states_out

_KERNEL = "mlstm_chunkwise__recurrent_bw_dC"
_F32 = jnp.float32


def mlstm_chunkwise__recurrent_bw_dC(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    vecF: jax.Array,  # (B, NH, S)
    scaM_inter: jax.Array,  # (B, NH, NC+1)
    vecM_combine: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHHV)
    vecN_out: jax.Array,  # (B, NH, S)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHHV)
    qk_scale: float | None = None,
    chunk_size: int = 64,
    save_states_every_nth_chunk: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    *,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """matDeltaC_states (B, NH, (NC+1)*DHQK, DHHV): the cotangents of the border C states.

    The TFLA convention (dnum = dH / (vecN_out + eps), the normalizer constant) unless
    ``vecDeltaNq`` (the cotangent of q.n) or ``vecDeltaN_last`` are given; then the n-state
    cotangents (B, NH, (NC+1)*DHQK) are returned as well.
    """
    d = seq_dims(_KERNEL, "matQ", matQ, "matDeltaH", matDeltaH)
    because = f"from matQ {shape_str(matQ)}"
    vecF = gate_arg(_KERNEL, "vecF", vecF, d, because)
    validate_chunk_size("chunk_size", chunk_size, pallas=True, S=d.S)
    L = chunk_size * positive_int("save_states_every_nth_chunk", save_states_every_nth_chunk)
    NC, BH = -(-d.S // L), d.B * d.NH
    array_arg(_KERNEL, "scaM_inter", scaM_inter, (d.B, d.NH, NC + 1), f"{because} and {L}-step chunks")
    array_arg(_KERNEL, "vecM_combine", vecM_combine, (d.B, d.NH, d.S), because)
    array_arg(_KERNEL, "vecN_out", vecN_out, (d.B, d.NH, d.S), because)
    array_arg(_KERNEL, "matDeltaC_last", matDeltaC_last, (d.B, d.NH, d.DHQK, d.DHV),
         f"{because} and matDeltaH {shape_str(matDeltaH)}", optional=True)
    array_arg(_KERNEL, "vecDeltaNq", vecDeltaNq, (d.B, d.NH, d.S), because, optional=True)
    array_arg(_KERNEL, "vecDeltaN_last", vecDeltaN_last, (d.B, d.NH, d.DHQK), because, optional=True)
    cell = CellOptions(qk_scale=qk_scale, eps=eps)
    with_n = vecDeltaNq is not None or vecDeltaN_last is not None
    if BH == 0:
        dC = empty((d.B, d.NH, (NC + 1) * d.DHQK, d.DHV))
        return (dC, empty((d.B, d.NH, (NC + 1) * d.DHQK))) if with_n else dC
    params = chunkwise_kernel_params(
        S=NC * L, DHQK=d.DHQK, DHV=d.DHV, dtype=matQ.dtype, chunk_size_intra=L, chunk_size_inter=chunk_size,
        num_warps_inter=num_warps, num_stages_inter=num_stages,
    )
    S_pad = NC * L
    Kp, Vp = padded_head_dim(d.DHQK), padded_head_dim(d.DHV)
    q = flat_seq(matQ, S_pad, Kp)
    dh = flat_seq(matDeltaH, S_pad, Vp, matQ.dtype)
    logf = flat_vec(gates.log_forget_gate(vecF), S_pad, 0.0)
    vecM = flat_vec(vecM_combine)
    vecM = jnp.concatenate([vecM, jnp.repeat(vecM[:, -1:], S_pad - d.S, axis=1)], axis=1)
    m_b = scaM_inter.astype(_F32).reshape(BH, NC + 1)
    # the entering-state weights and decays need no input gates: give zeros
    reset = gates.reset_positions(logf, vecM, gates.previous_max_states(vecM, m_b[:, 0]))
    zeros = jnp.zeros_like(logf)
    cg = gates.chunk_gates(zeros, logf, reset, L)
    g = gates.kernel_gates_from_chunk_gates(zeros.reshape(BH, NC, L), cg, vecM.reshape(BH, NC, L), m_b)
    vecDenInv = 1.0 / (flat_vec(vecN_out, S_pad, 1.0) + cell.eps)
    vecDnq = jnp.zeros_like(vecDenInv) if vecDeltaNq is None else flat_vec(vecDeltaNq, S_pad, 0.0)
    matDC, vecDN = recurrent_bw_states(
        q, dh, g.vecWinter, vecDenInv, vecDnq, g.vecDecay,
        state_in(matDeltaC_last, BH, d.DHQK, d.DHV), state_in(vecDeltaN_last, BH, d.DHQK),
        params=params, qk_scale=cell.effective_qk_scale(d.DHQK), interpret=resolve_interpret(None),
    )
    matDC, vecDN = states_out(matDC, vecDN, d.B, d.NH, d.DHQK, d.DHV)
    return (matDC, vecDN) if with_n else matDC
