"""Forward recurrent kernel stage: the chunk-border states (the seed's signature over
``pallas.fw_recurrent``; checks and layouts from ``..seed_compat``, notation there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...chunking import validate_chunk_size
from ...validation import shape_str
from ..pallas import gates
from ..pallas.autodiff import resolve_interpret
from ..pallas.fw_recurrent import recurrent_fw_states
from ..pallas.heuristics import chunkwise_kernel_params, padded_head_dim
from ..seed_compat import array_arg, empty, flat_seq, flat_vec, gate_arg, positive_int, seq_dims, state_in, states_out

_KERNEL = "mlstm_chunkwise__recurrent_fw_C"
_F32 = jnp.float32


def mlstm_chunkwise__recurrent_fw_C(
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecF: jax.Array,  # (B, NH, S)
    vecI: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaMinter_initial: jax.Array | None = None,  # (B, NH)
    chunk_size: int = 64,
    num_stages: int | None = None,
    num_warps: int | None = None,
    save_states_every_nth_chunk: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The states (C, n, m) at every ``chunk_size * save_states_every_nth_chunk`` steps.

    Returns matC_states (B, NH, (NC+1)*DHQK, DHV), vecN_states (B, NH, (NC+1)*DHQK) and
    scaMinter_states (B, NH, NC+1), float32, index 0 the initial state (zeros, m = 0 if None).
    The kernel folds ``chunk_size`` steps into the state per matrix product.
    """
    d = seq_dims(_KERNEL, "matK", matK, "matV", matV)
    because = f"from matK {shape_str(matK)}"
    vecF = gate_arg(_KERNEL, "vecF", vecF, d, because)
    vecI = gate_arg(_KERNEL, "vecI", vecI, d, because)
    array_arg(_KERNEL, "matC_initial", matC_initial, (d.B, d.NH, d.DHQK, d.DHV), because, optional=True)
    array_arg(_KERNEL, "vecN_initial", vecN_initial, (d.B, d.NH, d.DHQK), because, optional=True)
    array_arg(_KERNEL, "scaMinter_initial", scaMinter_initial, (d.B, d.NH), because, optional=True)
    validate_chunk_size("chunk_size", chunk_size, pallas=True, S=d.S)
    L = chunk_size * positive_int("save_states_every_nth_chunk", save_states_every_nth_chunk)
    NC, BH = -(-d.S // L), d.B * d.NH
    if BH == 0:
        return (empty((d.B, d.NH, (NC + 1) * d.DHQK, d.DHV)), empty((d.B, d.NH, (NC + 1) * d.DHQK)),
                empty((d.B, d.NH, NC + 1)))
    params = chunkwise_kernel_params(
        S=max(d.S, L), DHQK=d.DHQK, DHV=d.DHV, dtype=matK.dtype, chunk_size_intra=L,
        chunk_size_inter=chunk_size, num_warps_inter=num_warps, num_stages_inter=num_stages,
    )
    S_pad = NC * L
    Kp, Vp = padded_head_dim(d.DHQK), padded_head_dim(d.DHV)
    k = flat_seq(matK, S_pad, Kp)
    v = flat_seq(matV, S_pad, Vp, matK.dtype)
    i = flat_vec(vecI, S_pad, gates.CLOSED_INPUT_GATE)
    logf = flat_vec(gates.log_forget_gate(vecF), S_pad, 0.0)
    C0 = state_in(matC_initial, BH, d.DHQK, d.DHV)
    n0 = state_in(vecN_initial, BH, d.DHQK)
    m0 = jnp.zeros((BH,), _F32) if scaMinter_initial is None else scaMinter_initial.astype(_F32).reshape(BH)
    vecM = gates.max_state_scan(i, logf, m0)
    g = gates.kernel_gates(i, logf, vecM, m0, L)
    matC_states, vecN_states = recurrent_fw_states(
        k, v, g.vecWstate, g.vecDecay, C0, n0, params=params, interpret=resolve_interpret(None)
    )
    matC, vecN = states_out(matC_states, vecN_states, d.B, d.NH, d.DHQK, d.DHV)
    return matC, vecN, g.scaM_borders.reshape(d.B, d.NH, NC + 1)
