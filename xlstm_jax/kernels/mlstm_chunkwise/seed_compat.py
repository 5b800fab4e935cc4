"""What the seed entry points call: the one seed-compatibility layer over the Pallas chunkwise kernels.

The seed modules (``triton_stablef.triton_fwbw`` (seed 000) and ``max_triton_fwbw_v5xlchunksize.*``
(seeds 001 and 003)) fix the seeds' names, signatures and defaults; the math lives in ``pallas``
(kernels, gates, autodiff). Shared by them, here:

* ``make_fwbw`` / ``get_fwbw_kernel`` / ``sequence_fwbw``: the one factory of the differentiable
  chunkwise function behind both seed families' generators ("limit" and "xl" chunk layouts,
  ``xlstm_jax.kernels.chunking``);
* ``parallel_bw_stage``: the one implementation of the dQ, dK and dV stages;
* ``chunk_log_gates`` and ``gates_with_borders``: the chunk gates in the seed layout and the kernel
  gates from border stabilizers;
* the layout conversions (``flat_seq``, ``states_in``, ``states_out``, ...) and the argument checks
  (``seq_dims``, ``array_arg``, ``gate_arg``, ``check_unused_forward``) of the stage functions.

Notation (see ``xlstm_jax.kernels._common`` and ``pallas.gates``). The seeds keep the chunk-border
states stacked along the head dim:

    matC_all (B, NH, (NC+1) * DHQK, DHV)   vecN_all (B, NH, (NC+1) * DHQK)   scaM_all (B, NH, NC+1)

(index 0: the initial state), and give the chunk gates as (B, NH, NC, L):

    vecB  in-chunk cumulative sum of log sigmoid(f); -inf marks a reset (a dropped state, e.g.
          f = -inf) and the sum restarts after it (without resets: the plain cumulative sum)
    vecA  i_s + sum_{r = s+1 .. L} log sigmoid(f_r) (weight of step s in the chunk's end state),
          -inf where a reset follows s
    vecN_out (B, NH, S)  the normalizer max(|qs.n|, lam) (the denominator without eps)
    vecM_out (B, NH, S)  the per-step max state m

Every array argument of a stage is checked against the others (``ValueError`` naming the argument
and both shapes, ``xlstm_jax.kernels.validation.check_shape``), dtypes must be floating, chunk sizes
follow ``xlstm_jax.kernels.chunking``, and B == 0 or NH == 0 gives empty outputs. The per-kernel
backward stages compute the TFLA-convention terms (denominator and m held fixed) unless the
cotangent of the normalizer (``vecDeltaNq``) and of the n states are passed; the exact gradient of
the whole cell is assembled by ``_combined_bw.mlstm_chunkwise_bw`` (and by ``mlstm_chunkwise_pallas``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..chunking import chunk_layout, validate_chunk_size
from ..options import CellOptions
from ..validation import check_floating, check_shape, floating_dtype, shape_str, squeeze_gate
from .pallas import gates
from .pallas.autodiff import dtype_name, h_kernel_dtype, kernel_dtype_of, mlstm_chunkwise_pallas, resolve_interpret
from .pallas.bw_parallel_dk import parallel_bw_dk
from .pallas.bw_parallel_dq import parallel_bw_dq
from .pallas.bw_parallel_dv import parallel_bw_dv
from .pallas.heuristics import chunkwise_kernel_params, padded_head_dim

_F32 = jnp.float32
KERNEL_DTYPE_NAMES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------- the fwbw factory
def make_fwbw(
    *,
    layout: str,
    autocast_kernel_dtype,
    return_last_states: bool,
    recompute_states_in_bw: bool,
    chunk_size: int,
    eps: float,
    norm_val: float = 1.0,
    stabilize_correctly: bool = True,
    grad_mode: str = "exact",
) -> Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]]:
    """The differentiable chunkwise function of the seed generators.

    ``layout`` "limit" (seed 000: intra chunk = recurrent step = chunk_size) or "xl" (seed family
    v5: recurrent step chunk_size, intra chunk max(chunk_size, 128)); see ``chunking.chunk_layout``.
    Returns ``forward(matQ, matK, matV, vecI, vecF, matC_initial=None, vecN_initial=None,
    scaM_initial=None) -> (h, C_last, n_last, m_last)`` (three None without ``return_last_states``).
    Options are validated here, once.
    """
    kernel_dtype = kernel_dtype_of(autocast_kernel_dtype, jnp.float32)
    intra, inter = chunk_layout(chunk_size, layout)
    cell = CellOptions(eps=eps, norm_val=norm_val, stabilize_correctly=stabilize_correctly, grad_mode=grad_mode)
    if not isinstance(return_last_states, bool) or not isinstance(recompute_states_in_bw, bool):
        raise ValueError(
            f"return_last_states and recompute_states_in_bw must be bools; got {return_last_states!r}, "
            f"{recompute_states_in_bw!r}"
        )

    def forward(
        matQ: jax.Array,  # (B, NH, S, DHQK)
        matK: jax.Array,  # (B, NH, S, DHQK)
        matV: jax.Array,  # (B, NH, S, DHV)
        vecI: jax.Array,  # (B, NH, S)
        vecF: jax.Array,  # (B, NH, S)
        matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
        vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
        scaM_initial: jax.Array | None = None,  # (B, NH)
    ):
        h, (matC, vecN, scaM) = mlstm_chunkwise_pallas(
            matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
            return_last_states=True, cell_options=cell, chunk_size_intra=intra, chunk_size_inter=inter,
            autocast_kernel_dtype=kernel_dtype, recompute_states_in_bw=recompute_states_in_bw,
        )
        if return_last_states:
            return h, matC, vecN, scaM
        return h, None, None, None

    return forward


def get_fwbw_kernel(generator: Callable, valid: tuple[str, ...], autocast_kernel_dtype, kwargs: dict) -> Callable:
    """``generator(dtype, **kwargs)`` after checking the dtype and that ``kwargs`` are in ``valid``."""
    name = dtype_name(autocast_kernel_dtype)
    if name not in KERNEL_DTYPE_NAMES:
        raise ValueError(f"Unsupported kernel dtype {autocast_kernel_dtype}; use one of {KERNEL_DTYPE_NAMES}.")
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown keyword argument(s) {unknown}; valid: {list(valid)}")
    return generator(jnp.dtype(name), **kwargs)


def sequence_fwbw(fwbw: Callable, return_last_states: bool, q, k, v, i, f, c_initial, n_initial, m_initial):
    """Run a generated ``fwbw``; return h or (h, (C, n, m)) as the seeds' sequence functions do."""
    matH, matC, vecN, scaM = fwbw(q, k, v, i, f, c_initial, n_initial, m_initial)
    if return_last_states:
        return matH, (matC, vecN, scaM)
    return matH


# ----------------------------------------------------------------------------- layout helpers
def pad_to(x: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def flat_seq(x: jax.Array, S_pad: int, D_pad: int, dtype=None) -> jax.Array:
    """(B, NH, S, D) -> (BH, S_pad, D_pad), zero padded."""
    B, NH, S, D = x.shape
    x = x.reshape(B * NH, S, D)
    if dtype is not None:
        x = x.astype(dtype)
    return pad_to(pad_to(x, 1, S_pad), 2, D_pad)


def flat_vec(x: jax.Array, S_pad: int | None = None, value: float = 0.0) -> jax.Array:
    """(B, NH, ...) -> (BH, prod(...)) float32, padded at the end to ``S_pad`` with ``value``."""
    x = x.reshape(x.shape[0] * x.shape[1], -1).astype(_F32)
    return x if S_pad is None else pad_to(x, 1, S_pad, value)


def states_in(matC_all, vecN_all, B, NH, DHQK, DHV):
    """Seed layout (shapes already checked) -> (BH, NC+1, DHQKp, DHVp), (BH, NC+1, DHQKp) float32."""
    NC1 = matC_all.shape[2] // DHQK
    Kp, Vp = padded_head_dim(DHQK), padded_head_dim(DHV)
    matC = matC_all.astype(_F32).reshape(B * NH, NC1, DHQK, DHV)
    matC = pad_to(pad_to(matC, 2, Kp), 3, Vp)
    vecN = None
    if vecN_all is not None:
        vecN = pad_to(vecN_all.astype(_F32).reshape(B * NH, NC1, DHQK), 2, Kp)
    return matC, vecN


def states_out(matC_states, vecN_states, B, NH, DHQK, DHV):
    """(BH, NC+1, DHQKp, DHVp) -> seed layout (B, NH, (NC+1)*DHQK, DHV)."""
    NC1 = matC_states.shape[1]
    matC = matC_states[:, :, :DHQK, :DHV].reshape(B, NH, NC1 * DHQK, DHV)
    vecN = None if vecN_states is None else vecN_states[:, :, :DHQK].reshape(B, NH, NC1 * DHQK)
    return matC, vecN


def unflat_seq(x, B, NH, S, D):
    return x[:, :S, :D].reshape(B, NH, S, D)


def unflat_vec(x, B, NH, S):
    return x[:, :S].reshape(B, NH, S)


def state_in(x, BH, *dims):
    """An optional (B, NH, *dims) state as (BH, *padded dims) float32, zeros if None."""
    padded = tuple(padded_head_dim(d) for d in dims)
    if x is None:
        return jnp.zeros((BH,) + padded, _F32)
    x = x.astype(_F32).reshape((BH,) + tuple(dims))
    for axis, p in enumerate(padded, start=1):
        x = pad_to(x, axis, p)
    return x


# ----------------------------------------------------------------------------- argument checks
class Dims(NamedTuple):
    B: int
    NH: int
    S: int
    DHQK: int
    DHV: int


def seq_dims(kernel: str, qk_name: str, matQK, v_name: str | None, matV) -> Dims:
    """Dims from a (B, NH, S, DHQK) and a (B, NH, S, DHV) argument (checked against each other)."""
    if getattr(matQK, "ndim", None) != 4:
        raise ValueError(f"{kernel}: {qk_name} must have shape (B, NH, S, DHQK); got {shape_str(matQK)}")
    B, NH, S, DHQK = matQK.shape
    check_floating(qk_name, matQK, kernel=kernel)
    if getattr(matV, "ndim", None) != 4:
        raise ValueError(f"{kernel}: {v_name} must have shape (B, NH, S, DHV); got {shape_str(matV)}")
    DHV = matV.shape[3]
    check_shape(kernel, v_name, matV, (B, NH, S, DHV), f"from {qk_name} {shape_str(matQK)}")
    check_floating(v_name, matV, kernel=kernel)
    if S < 1 or DHQK < 1 or DHV < 1:
        raise ValueError(f"{kernel}: empty sequence or head dimension: {qk_name} {shape_str(matQK)}, "
                         f"{v_name} {shape_str(matV)}")
    return Dims(B, NH, S, DHQK, DHV)


def array_arg(kernel: str, name: str, x, shape: tuple[int, ...], because: str, *, optional: bool = False):
    """Check one array argument's shape and dtype (None allowed if ``optional``)."""
    if x is None and optional:
        return None
    check_shape(kernel, name, x, shape, because)
    check_floating(name, x, kernel=kernel)
    return x


def gate_arg(kernel: str, name: str, x, dims: Dims, because: str) -> jax.Array:
    """A (B, NH, S) or (B, NH, S, 1) gate as (B, NH, S), floating."""
    try:
        x = squeeze_gate(name, x, (dims.B, dims.NH, dims.S))
    except ValueError:
        raise ValueError(
            f"{kernel}: {name} has shape {shape_str(x)}; expected {(dims.B, dims.NH, dims.S)} {because}"
        ) from None
    check_floating(name, x, kernel=kernel)
    return x


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def empty(shape, dtype=_F32):
    return jnp.zeros(shape, dtype)


# ----------------------------------------------------------------------------- gates
def chunk_log_gates(
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    chunk_size: int,
    *,
    scaM_initial: jax.Array | None = None,  # (B, NH)
    kernel: str = "compute_chunkwise_log_gates_vecB_vecA",
) -> tuple[jax.Array, jax.Array]:
    """(vecB, vecA) (B, NH, NC, L) float32 in the seed layout (module doc), S a multiple of L.

    The resets are those of the kernels (``pallas.gates.reset_positions``), from the m scan started
    at ``scaM_initial`` (default 0, as the kernels without initial states).
    """
    if getattr(vecF, "ndim", None) != 3:
        raise ValueError(f"{kernel}: vecF must have shape (B, NH, S); got {shape_str(vecF)}")
    B, NH, S = vecF.shape
    check_floating("vecF", vecF, kernel=kernel)
    array_arg(kernel, "vecI", vecI, (B, NH, S), f"from vecF {shape_str(vecF)}")
    L = validate_chunk_size("chunk_size", chunk_size, S=S)
    if S % L:
        raise ValueError(f"{kernel}: S={S} (vecF {shape_str(vecF)}) must be a multiple of chunk_size={L}")
    array_arg(kernel, "scaM_initial", scaM_initial, (B, NH), f"from vecF {shape_str(vecF)}", optional=True)
    NC, BH = S // L, B * NH
    if BH == 0:
        return empty((B, NH, NC, L)), empty((B, NH, NC, L))
    i = vecI.astype(_F32).reshape(BH, S)
    logf = gates.log_forget_gate(vecF).astype(_F32).reshape(BH, S)
    m0 = jnp.zeros((BH,), _F32) if scaM_initial is None else scaM_initial.astype(_F32).reshape(BH)
    vecM = gates.max_state_scan(i, logf, m0)
    reset = gates.reset_positions(logf, vecM, gates.previous_max_states(vecM, m0))
    vecB, vecA = gates.seed_chunk_gates(gates.chunk_gates(i, logf, reset, L))
    return vecB.reshape(B, NH, NC, L), vecA.reshape(B, NH, NC, L)


def gates_with_borders(i, logf, m_b, L):
    """Kernel gates from raw gates (BH, S_pad) and given border m's (BH, NC+1): per-step m by the
    per-chunk scan from each chunk's entering m, resets as in the kernels."""
    BH, S_pad = i.shape
    NC = S_pad // L
    ic, fc = i.reshape(BH, NC, L), logf.reshape(BH, NC, L)
    vecM = gates.chunk_max_states(ic, fc, m_b)
    vecM_prev = jnp.concatenate([m_b[:, :-1, None], vecM[..., :-1]], axis=2)
    reset = gates.reset_positions(fc, vecM, vecM_prev).reshape(BH, S_pad)
    cg = gates.chunk_gates(i, logf, reset, L)
    return gates.kernel_gates_from_chunk_gates(ic, cg, vecM, m_b), vecM.reshape(BH, S_pad)


# ----------------------------------------------------------------------------- recurrent stages




# ----------------------------------------------------------------------------- parallel stages
def stage_tile_params(S, DHQK, DHV, dtype, chunk_size, l_par, l_loop, dh_par, dh_loop, num_warps, num_stages):
    return chunkwise_kernel_params(
        S=S, DHQK=DHQK, DHV=DHV, dtype=dtype, chunk_size_intra=chunk_size,
        chunk_size_inter=min(chunk_size, 128), siz_b_L_parallel=l_par, siz_b_L_loop=l_loop,
        siz_b_DH_parallel=dh_par, siz_b_DH_loop=dh_loop, num_warps_intra=num_warps,
        num_stages_intra=num_stages,
    )




# which tile each seed block size sets, per stage: (siz_b_L_parallel, siz_b_L_loop,
# siz_b_DH_parallel, siz_b_DH_loop) from (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV)
_STAGE_TILES = {
    "dQ": lambda LQ, LKV, DHQK, DHHV: (LQ, LKV, DHQK, DHHV),
    "dK": lambda LQ, LKV, DHQK, DHHV: (LKV, LQ, DHQK, DHHV),
    "dV": lambda LQ, LKV, DHQK, DHHV: (LKV, LQ, DHHV, DHQK),
}
_STAGE_NAMES = {
    "dQ": "mlstm_chunkwise__parallel_bw_dQ",
    "dK": "mlstm_chunkwise__parallel_bw_dK",
    "dV": "mlstm_chunkwise__parallel_bw_dV",
}


def parallel_bw_stage(
    which: str,
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, NC, L)
    vecA: jax.Array,  # (B, NH, NC, L)
    vecB: jax.Array,  # (B, NH, NC, L)
    matC_all: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    vecN_all: jax.Array,  # (B, NH, (NC+1) * DHQK)
    scaM_all: jax.Array,  # (B, NH, NC+1)
    vecN_out: jax.Array,  # (B, NH, S)
    vecM_out: jax.Array,  # (B, NH, S)
    matDeltaH: jax.Array,  # (B, NH, S, DHV)
    matDeltaC_states: jax.Array,  # (B, NH, (NC+1) * DHQK, DHV)
    *,
    qk_scale: float | None = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: int | None = None,
    siz_b_DHHV: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    eps: float = 0.0,
    output_dtype=jnp.float32,
    vecDeltaNq: jax.Array | None = None,  # (B, NH, S)
    vecDeltaN_states: jax.Array | None = None,  # (B, NH, (NC+1) * DHQK)
    interpret: bool | None = None,
) -> jax.Array:  # dQ, dK (B, NH, S, DHQK) or dV (B, NH, S, DHV)
    """The dQ, dK or dV stage (``which``), one implementation: checks every argument, then calls
    the one kernel of that name.

    ``vecDeltaNq`` (dQ, dK) and ``vecDeltaN_states`` (dK) add the normalizer's terms (exact
    gradient), otherwise the TFLA convention; dV is the same in both. S must be a multiple of
    ``chunk_size`` (the chunk gates are (B, NH, NC, L)).
    """
    kernel = _STAGE_NAMES[which]
    d = seq_dims(kernel, "matQ", matQ, "matV", matV)
    because = f"from matQ {shape_str(matQ)}"
    array_arg(kernel, "matK", matK, (d.B, d.NH, d.S, d.DHQK), because)
    L = validate_chunk_size("chunk_size", chunk_size, pallas=True, S=d.S)
    if d.S % L:
        raise ValueError(f"{kernel}: S={d.S} (matQ {shape_str(matQ)}) must be a multiple of chunk_size={L} "
                         "for the chunked gates")
    NC, BH = d.S // L, d.B * d.NH
    chunked = f"{because} and chunk_size={L}"
    for name, x in (("vecI", vecI), ("vecA", vecA), ("vecB", vecB)):
        array_arg(kernel, name, x, (d.B, d.NH, NC, L), chunked)
    states = f"{because}, matV {shape_str(matV)} and chunk_size={L}"
    array_arg(kernel, "matC_all", matC_all, (d.B, d.NH, (NC + 1) * d.DHQK, d.DHV), states)
    array_arg(kernel, "vecN_all", vecN_all, (d.B, d.NH, (NC + 1) * d.DHQK), states)
    array_arg(kernel, "scaM_all", scaM_all, (d.B, d.NH, NC + 1), states)
    for name, x in (("vecN_out", vecN_out), ("vecM_out", vecM_out)):
        array_arg(kernel, name, x, (d.B, d.NH, d.S), because)
    array_arg(kernel, "matDeltaH", matDeltaH, (d.B, d.NH, d.S, d.DHV), f"from matV {shape_str(matV)}")
    array_arg(kernel, "matDeltaC_states", matDeltaC_states, (d.B, d.NH, (NC + 1) * d.DHQK, d.DHV), states)
    array_arg(kernel, "vecDeltaNq", vecDeltaNq, (d.B, d.NH, d.S), because, optional=True)
    array_arg(kernel, "vecDeltaN_states", vecDeltaN_states, (d.B, d.NH, (NC + 1) * d.DHQK), states, optional=True)
    cell = CellOptions(qk_scale=qk_scale, eps=eps)
    out_dtype = floating_dtype("output_dtype", output_dtype, allow_none=False)
    D_out = d.DHV if which == "dV" else d.DHQK
    if BH == 0:
        return empty((d.B, d.NH, d.S, D_out), out_dtype)
    Kp, Vp = padded_head_dim(d.DHQK), padded_head_dim(d.DHV)
    dt = matQ.dtype
    q, k = flat_seq(matQ, d.S, Kp), flat_seq(matK, d.S, Kp, dt)
    v, dh = flat_seq(matV, d.S, Vp, dt), flat_seq(matDeltaH, d.S, Vp, dt)
    cg = gates.chunk_gates_from_seed(vecB.astype(_F32).reshape(BH, NC, L), vecA.astype(_F32).reshape(BH, NC, L))
    g = gates.kernel_gates_from_chunk_gates(
        vecI.astype(_F32).reshape(BH, NC, L), cg, vecM_out.astype(_F32).reshape(BH, NC, L),
        scaM_all.astype(_F32).reshape(BH, NC + 1),
    )
    vecDenInv = 1.0 / (flat_vec(vecN_out) + cell.eps)
    vecDnq = jnp.zeros_like(vecDenInv) if vecDeltaNq is None else flat_vec(vecDeltaNq)
    tiles = _STAGE_TILES[which](siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV)
    params = stage_tile_params(d.S, d.DHQK, d.DHV, dt, L, *tiles, num_warps, num_stages)
    kw = dict(params=params, qk_scale=cell.effective_qk_scale(d.DHQK),
              output_dtype=h_kernel_dtype(out_dtype, dt), interpret=resolve_interpret(interpret))
    if which == "dQ":
        matC, vecN = states_in(matC_all, vecN_all, d.B, d.NH, d.DHQK, d.DHV)
        out, _ = parallel_bw_dq(q, k, v, dh, g.vecQlog, g.vecKlog, g.vecWinter, vecDenInv, vecDnq, g.vecStart,
                                matC, vecN, **kw)
    elif which == "dK":
        matDC, vecDN = states_in(matDeltaC_states, vecDeltaN_states, d.B, d.NH, d.DHQK, d.DHV)
        if vecDN is None:
            vecDN = jnp.zeros(matDC.shape[:3], _F32)
        out, _, _ = parallel_bw_dk(q, k, v, dh, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, vecDnq, g.vecStart,
                                   matDC, vecDN, **kw)
    else:
        matDC, _ = states_in(matDeltaC_states, None, d.B, d.NH, d.DHQK, d.DHV)
        out = parallel_bw_dv(q, k, dh, g.vecQlog, g.vecKlog, g.vecWstate, vecDenInv, g.vecStart, matDC, **kw)
    return unflat_seq(out, d.B, d.NH, d.S, D_out).astype(out_dtype)


# ----------------------------------------------------------------------------- combined stages




def check_unused_forward(kernel: str, arrays: dict[str, Any], call, because: str) -> None:
    """Shapes of the forward results a backward signature passes but does not use."""
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    for name in ("vecN_out", "vecM_out"):
        array_arg(kernel, name, arrays.get(name), (B, NH, S), because, optional=True)
    matC_all, vecN_all, scaM_all = (arrays.get(n) for n in ("matC_all", "vecN_all", "scaM_all"))
    if matC_all is not None:
        rows = getattr(matC_all, "shape", (None,) * 4)[2] if getattr(matC_all, "ndim", 0) == 4 else None
        NC1 = rows // DHQK if rows and rows % DHQK == 0 else 0
        array_arg(kernel, "matC_all", matC_all, (B, NH, max(NC1, 1) * DHQK, DHV), f"{because} ((NC+1) * DHQK rows)")
        array_arg(kernel, "vecN_all", vecN_all, (B, NH, max(NC1, 1) * DHQK), f"from matC_all {shape_str(matC_all)}",
             optional=True)
        array_arg(kernel, "scaM_all", scaM_all, (B, NH, max(NC1, 1)), f"from matC_all {shape_str(matC_all)}",
             optional=True)
    else:
        for name, x in (("vecN_all", vecN_all), ("scaM_all", scaM_all)):
            if x is not None and tuple(getattr(x, "shape", ()))[:2] != (B, NH):
                raise ValueError(f"{kernel}: {name} has shape {shape_str(x)}; expected (B, NH, ...) = "
                                 f"({B}, {NH}, ...) {because}")
