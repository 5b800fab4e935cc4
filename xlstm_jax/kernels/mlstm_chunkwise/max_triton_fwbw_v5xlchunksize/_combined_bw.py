"""The whole backward pass of the chunkwise (TFLA) mLSTM: gradients of every input.

The seed's signature over ``pallas.autodiff.chunkwise_backward`` (layouts from ``..seed_compat``,
notation there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...chunking import validate_chunk_size
from ...validation import shape_str, validate_sequence_call
from ..pallas.autodiff import chunkwise_backward, chunkwise_forward, core_config, prepare
from ..seed_compat import array_arg, check_unused_forward, flat_seq, state_in, unflat_seq, unflat_vec

_KERNEL = "mlstm_chunkwise_bw"
_F32 = jnp.float32


def mlstm_chunkwise_bw(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    matC_all: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array | None = None,  # (B, NH, NC+1)
    vecN_out: jax.Array | None = None,  # (B, NH, S)
    vecM_out: jax.Array | None = None,  # (B, NH, S)
    matDeltaH: jax.Array | None = None,  # (B, NH, S, DHV)
    matDeltaC_last: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    qk_scale: float | None = None,
    chunk_size: int = 128,
    chunk_size_inter: int | None = None,
    chunk_size_intra: int | None = None,
    siz_b_L_parallel: int | None = None,
    siz_b_L_loop: int | None = None,
    siz_b_DH_parallel: int | None = None,
    siz_b_DH_loop: int | None = None,
    num_warps_intra: int | None = None,
    num_warps_inter: int | None = None,
    num_stages_intra: int | None = None,
    num_stages_inter: int | None = None,
    eps: float = 0.0,
    *,
    vecDeltaN_last: jax.Array | None = None,  # (B, NH, DHQK)
    scaDeltaM_last: jax.Array | None = None,  # (B, NH)
    grad_mode: str = "exact",
):
    """Execute the backward pass of the mLSTM chunkwise formulation.

    Returns (matDeltaQ, matDeltaK, matDeltaV, vecDeltaI, vecDeltaF, matDeltaC_initial,
    vecDeltaN_initial, scaDeltaM_initial) in the dtypes of the inputs; the initial-state gradients
    are None without initial states. ``grad_mode="exact"`` (default) is the exact gradient of the
    cell (through the normalizer and its lower bound), ``"tfla"`` the TFLA convention (denominator
    and m held constant). The forward quantities this needs (states, h, the signed normalizer, m)
    are recomputed by the kernels, so ``matC_all``, ``vecN_all``, ``scaM_all``, ``vecN_out`` and
    ``vecM_out`` are accepted for the seed's signature but not used (their shapes are checked: the
    states against any chunking, (B, NH, (NC+1) * DHQK, DHV) for some NC). ``chunk_size`` is the
    intra chunk unless ``chunk_size_intra`` is given.
    """
    call = validate_sequence_call(
        _KERNEL, matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
        qk_scale=qk_scale, eps=eps, grad_mode=grad_mode,
    )
    if chunk_size_intra is None:
        chunk_size_intra = validate_chunk_size("chunk_size", chunk_size, pallas=True)
    tile_params = dict(
        chunk_size_inter=chunk_size_inter, chunk_size_intra=chunk_size_intra,
        siz_b_L_parallel=siz_b_L_parallel, siz_b_L_loop=siz_b_L_loop,
        siz_b_DH_parallel=siz_b_DH_parallel, siz_b_DH_loop=siz_b_DH_loop,
        num_warps_intra=num_warps_intra, num_warps_inter=num_warps_inter,
        num_stages_intra=num_stages_intra, num_stages_inter=num_stages_inter,
    )
    unused_forward = dict(matC_all=matC_all, vecN_all=vecN_all, scaM_all=scaM_all, vecN_out=vecN_out,
                          vecM_out=vecM_out)
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    because = f"from matQ {shape_str(matQ)} and matV {shape_str(matV)}"
    if matDeltaH is None:
        raise ValueError(f"{_KERNEL}: matDeltaH (the cotangent of h, shape {(B, NH, S, DHV)}) is required")
    array_arg(_KERNEL, "matDeltaH", matDeltaH, (B, NH, S, DHV), because)
    array_arg(_KERNEL, "matDeltaC_last", matDeltaC_last, (B, NH, DHQK, DHV), because, optional=True)
    array_arg(_KERNEL, "vecDeltaN_last", vecDeltaN_last, (B, NH, DHQK), because, optional=True)
    array_arg(_KERNEL, "scaDeltaM_last", scaDeltaM_last, (B, NH), because, optional=True)
    check_unused_forward(_KERNEL, unused_forward, call, because)
    state_grads = call.state is not None
    if call.empty:
        grads = [jnp.zeros(x.shape, x.dtype) for x in (matQ, matK, matV, vecI, vecF)]
        grads += [jnp.zeros(x.shape, x.dtype) if state_grads else None
                  for x in (matC_initial, vecN_initial, scaM_initial)]
        return tuple(grads)
    prep = prepare(call, matQ, matK, matV, chunk_size=None, autocast_kernel_dtype=matQ.dtype,
                   tile_params=tile_params)
    cfg = core_config(prep, h_dtype=_F32, recompute_states_in_bw=True, interpret=None)
    BH = B * NH
    S_pad, Vp = prep.arrays[0].shape[1], prep.arrays[2].shape[2]
    out = chunkwise_forward(*prep.arrays, cfg)
    dh = flat_seq(matDeltaH, S_pad, Vp, _F32)
    dm_last = jnp.zeros((BH,), _F32) if scaDeltaM_last is None else scaDeltaM_last.astype(_F32).reshape(BH)
    dQ, dK, dV, dI, dLogF, dC0, dN0, dM0 = chunkwise_backward(
        *prep.arrays, out.vecM, out.vecNq, out.matH, out.matC_states, out.vecN_states,
        dh, state_in(matDeltaC_last, BH, DHQK, DHV), state_in(vecDeltaN_last, BH, DHQK), dm_last, cfg,
    )
    dF = unflat_vec(dLogF, B, NH, S) * jax.nn.sigmoid(-call.vecF.astype(_F32))
    grads = [
        unflat_seq(dQ, B, NH, S, DHQK).astype(matQ.dtype),
        unflat_seq(dK, B, NH, S, DHQK).astype(matK.dtype),
        unflat_seq(dV, B, NH, S, DHV).astype(matV.dtype),
        unflat_vec(dI, B, NH, S).reshape(vecI.shape).astype(vecI.dtype),
        dF.reshape(vecF.shape).astype(vecF.dtype),
    ]
    if not state_grads:
        grads += [None, None, None]
    else:
        grads += [
            dC0[:, :DHQK, :DHV].reshape(B, NH, DHQK, DHV).astype(matC_initial.dtype),
            dN0[:, :DHQK].reshape(B, NH, DHQK).astype(vecN_initial.dtype),
            dM0.reshape(B, NH).astype(scaM_initial.dtype),
        ]
    return tuple(grads)
