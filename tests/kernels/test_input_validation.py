"""The validation layer (issue 8): every kernel, step kernel, seed entry point and backend refuses
bad inputs with a ``ValueError`` naming the argument (and its dtype or both shapes), and handles an
empty batch or head count the same way (empty outputs and empty gradients).

All of these fail (or return) before any kernel runs, so they are fast.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax.kernels import (
    CellOptions,
    available_mlstm_kernels,
    available_mlstm_step_kernels,
    get_mlstm_kernel,
    get_mlstm_step_kernel,
)
from xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize import (
    _chunkwise_gates,
    _combined_bw,
    _combined_fw,
    _parallel_bw_dK,
    _parallel_bw_dQ,
    _parallel_bw_dV,
    _parallel_fw,
    _recurrent_bw,
    _recurrent_fw,
    triton_fwbw,
)
from xlstm_jax.kernels.mlstm_chunkwise.triton_stablef import triton_fwbw as stablef
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
    available_mlstm_backends,
    create_mlstm_backend,
    create_mlstm_backend_config,
)
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import recurrent as seed004
from xlstm_jax.testing import mlstm_inputs

B, NH, S, DHQK, DHV = 1, 2, 8, 16, 16
KERNELS = available_mlstm_kernels()
STEP_KERNELS = available_mlstm_step_kernels()


def _inputs(B=B, NH=NH, S=S, states=True):
    return mlstm_inputs(jax.random.PRNGKey(0), B, NH, S, DHQK, DHV, initial_states=states)


def _step_inputs(B=B, NH=NH):
    q, k, v, i, f, c0, n0, m0 = _inputs(B, NH, 1)
    return c0, n0, m0, q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0]


# every sequence entry point, called as fn(q, k, v, i, f, c0, n0, m0) -> h or (h, states)
def _seed000(*a):
    return stablef.mlstm_chunkwise_triton_stablef(*a, return_last_states=True, chunk_size=16)


def _v5(*a):
    return triton_fwbw.mlstm_chunkwise_max_triton(*a, return_last_states=True, chunk_size=16)


def _seed001(*a):
    return _combined_fw.mlstm_chunkwise_fw(*a, return_last_states=True)


def _seed001_bw(*a):
    dh = jnp.ones(a[2].shape, jnp.float32)
    return _combined_bw.mlstm_chunkwise_bw(*a, matDeltaH=dh, chunk_size=16)


def _seed004(q, k, v, i, f, c0, n0, m0):
    return seed004.recurrent_sequence_fw(q, k, v, i, f, c0, n0, m0, return_last_states=True)


ENTRY_POINTS = {name: (lambda *a, _n=name: get_mlstm_kernel(_n)(*a, return_last_states=True)) for name in KERNELS}
ENTRY_POINTS.update({
    "seed000-mlstm_chunkwise_triton_stablef": _seed000,
    "v5-mlstm_chunkwise_max_triton": _v5,
    "seed001-mlstm_chunkwise_fw": _seed001,
    "seed001-mlstm_chunkwise_bw": _seed001_bw,
    "seed004-recurrent_sequence_fw": _seed004,
})
ENTRY_POINTS.update({
    f"backend-{name}": (lambda *a, _n=name: create_mlstm_backend(_n).apply({}, *a, return_last_states=True))
    for name in available_mlstm_backends()
})


# ----------------------------------------------------------------------------- integer inputs
INT_ARGS = {"q": 0, "f": 4, "c_initial": 5}


@pytest.mark.parametrize("arg", list(INT_ARGS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_integer_inputs_are_refused(entry, arg):
    args = list(_inputs())
    args[INT_ARGS[arg]] = args[INT_ARGS[arg]].astype(jnp.int32)
    with pytest.raises(ValueError, match=rf"{arg} must be a floating-point array; got dtype int32"):
        ENTRY_POINTS[entry](*args)


@pytest.mark.parametrize("name", STEP_KERNELS)
def test_step_kernels_refuse_integer_inputs_and_bad_shapes(name):
    step = get_mlstm_step_kernel(name)
    args = list(_step_inputs())
    with pytest.raises(ValueError, match=r"q must be a floating-point array; got dtype int32"):
        step(*args[:3], args[3].astype(jnp.int32), *args[4:])
    bad = list(args)
    bad[0] = jnp.ones((B, NH, DHQK, DHV + 1))
    with pytest.raises(ValueError, match=r"shape mismatch: C \(1, 2, 16, 17\) \(expected \(1, 2, 16, 16\)\)"):
        step(*bad)
    bad = list(args)
    bad[6] = jnp.ones((B, NH, 1))  # i with a trailing 1
    with pytest.raises(ValueError, match=r"i \(1, 2, 1\) \(expected \(1, 2\)\)"):
        step(*bad)


def test_seed004_step_refuses_integer_inputs():
    c, n, m, q, k, v, i, f = _step_inputs()
    with pytest.raises(ValueError, match=r"v must be a floating-point array; got dtype int32"):
        seed004.recurrent_step_fw(c, n, m[..., None], q, k, v.astype(jnp.int32), i[..., None], f[..., None])


# ----------------------------------------------------------------------------- empty batch / heads
@pytest.mark.parametrize("dims", [(0, NH), (B, 0)], ids=["B0", "NH0"])
@pytest.mark.parametrize("name", KERNELS)
def test_empty_batch_or_heads_give_empty_outputs_and_gradients(name, dims):
    inputs = _inputs(*dims)
    kernel = get_mlstm_kernel(name)

    def loss(*a):
        h, (c, n, m) = kernel(*a, return_last_states=True)
        return jnp.sum(h) + jnp.sum(c) + jnp.sum(n) + jnp.sum(m), (h, c, n, m)

    grads, (h, c, n, m) = jax.grad(loss, argnums=tuple(range(8)), has_aux=True)(*inputs)
    Bx, NHx = dims
    assert h.shape == (Bx, NHx, S, DHV) and h.dtype == jnp.float32
    assert (c.shape, n.shape, m.shape) == ((Bx, NHx, DHQK, DHV), (Bx, NHx, DHQK), (Bx, NHx))
    assert [g.shape for g in grads] == [x.shape for x in inputs]


@pytest.mark.parametrize("dims", [(0, NH), (B, 0)], ids=["B0", "NH0"])
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if not e.startswith(tuple(KERNELS))])
def test_empty_batch_or_heads_in_seed_entry_points_and_backends(entry, dims):
    out = ENTRY_POINTS[entry](*_inputs(*dims))
    leaves = [x for x in jax.tree_util.tree_leaves(out) if x is not None]
    assert leaves and all(x.shape[:2] == dims for x in leaves), [x.shape for x in leaves]


@pytest.mark.parametrize("name", STEP_KERNELS)
def test_empty_batch_in_step_kernels(name):
    h, (c, n, m) = get_mlstm_step_kernel(name)(*_step_inputs(0, NH))
    assert h.shape == (0, NH, DHV) and c.shape == (0, NH, DHQK, DHV) and m.shape == (0, NH)


def test_empty_batch_in_seed_stages():
    q, k, v, i, f, c0, n0, m0 = _inputs(0, NH, 32)
    Cs, Ns, Ms = _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, c0, n0, m0, chunk_size=16)
    assert (Cs.shape, Ns.shape, Ms.shape) == ((0, NH, 3 * DHQK, DHV), (0, NH, 3 * DHQK), (0, NH, 3))
    h, vecN, vecM = _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, Cs, Ns, Ms, chunk_size=16)
    assert h.shape == (0, NH, 32, DHV)
    dCs = _recurrent_bw.mlstm_chunkwise__recurrent_bw_dC(q, f, Ms, vecM, v, vecN, chunk_size=16)
    assert dCs.shape == Cs.shape
    vecB, vecA = _chunkwise_gates.compute_chunkwise_log_gates_vecB_vecA(i, f, 16)
    common = (q, k, v, i.reshape(0, NH, 2, 16), vecA, vecB, Cs, Ns, Ms, vecN, vecM, v, dCs)
    for fn in (_parallel_bw_dQ.mlstm_chunkwise__parallel_bw_dQ, _parallel_bw_dK.mlstm_chunkwise__parallel_bw_dK,
               _parallel_bw_dV.mlstm_chunkwise__parallel_bw_dV):
        assert fn(*common, chunk_size=16).shape == (0, NH, 32, DHQK)


# ----------------------------------------------------------------------------- cell options
BAD_OPTIONS = [
    ("stabilize_correctly", "no", r"stabilize_correctly must be a bool; got 'no'"),
    ("stabilize_correctly", 1, r"stabilize_correctly must be a bool"),
    ("eps", math.nan, r"eps must be finite and >= 0; got nan"),
    ("eps", -1e-6, r"eps must be finite and >= 0"),
    ("eps", math.inf, r"eps must be finite"),
    ("eps", "1e-6", r"eps must be a real number"),
    ("norm_val", -1.0, r"norm_val must be finite and >= 0"),
    ("norm_val", math.nan, r"norm_val must be finite"),
    ("qk_scale", 0.0, r"qk_scale must be finite and > 0"),
    ("qk_scale", -0.5, r"qk_scale must be finite and > 0"),
    ("qk_scale", math.inf, r"qk_scale must be finite"),
    ("grad_mode", "approx", r"grad_mode must be one of \('exact', 'tfla'\); got 'approx'"),
]
BAD_IDS = [f"{name}={value!r}" for name, value, _ in BAD_OPTIONS]


@pytest.mark.parametrize("option,value,pattern", BAD_OPTIONS, ids=BAD_IDS)
def test_cell_options_validate(option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        CellOptions(**{option: value})


@pytest.mark.parametrize("option,value,pattern", BAD_OPTIONS, ids=BAD_IDS)
@pytest.mark.parametrize("name", KERNELS)
def test_kernels_refuse_bad_cell_options(name, option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_mlstm_kernel(name)(*_inputs(), **{option: value})


@pytest.mark.parametrize("option,value,pattern", BAD_OPTIONS, ids=BAD_IDS)
@pytest.mark.parametrize("name", STEP_KERNELS)
def test_step_kernels_refuse_bad_cell_options(name, option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_mlstm_step_kernel(name)(*_step_inputs(), **{option: value})


BAD_CONFIGS = [
    ("fwbw_stabilized", {"stabilize_correctly": "no"}, "stabilize_correctly"),
    ("parallel_stabilized", {"eps": -1.0}, "eps"),
    ("triton_kernels", {"grad_mode": "approx"}, "grad_mode"),
    ("triton_kernels", {"norm_val": math.nan}, "norm_val"),
    ("triton_kernels", {"stabilize_correctly": "no"}, "stabilize_correctly"),
    ("triton_kernels", {"autocast_dtype": "int32"}, "autocast_dtype"),
    ("recurrent", {"eps": math.nan}, "eps"),
    ("recurrent", {"state_dtype": "int32"}, "state_dtype"),
    ("recurrent_triton", {"state_dtype": "int32"}, "state_dtype"),
]


@pytest.mark.parametrize("backend,kwargs,pattern", BAD_CONFIGS,
                         ids=[f"{b}-{next(iter(kw))}" for b, kw, _ in BAD_CONFIGS])
def test_backend_configs_validate_at_construction(backend, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_mlstm_backend_config(backend, **kwargs)


def test_seed_entry_points_validate_cell_options():
    q, k, v, i, f, *_ = _inputs(states=False)
    with pytest.raises(ValueError, match="stabilize_correctly must be a bool"):
        stablef.mlstm_chunkwise_triton_stablef(q, k, v, i, f, stabilize_correctly="no")
    with pytest.raises(ValueError, match="eps must be finite"):
        stablef._get_chunkwise_fwbw_kernel("float32", eps=math.nan)
    with pytest.raises(ValueError, match="eps must be finite"):
        triton_fwbw.mlstm_chunkwise_max_triton(q, k, v, i, f, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be finite"):
        _combined_fw.mlstm_chunkwise_fw(q, k, v, i, f, eps=-1.0)
    with pytest.raises(ValueError, match="qk_scale must be finite and > 0"):
        _combined_fw.mlstm_chunkwise_fw(q, k, v, i, f, qk_scale=0.0)


def test_unknown_input_gate_is_refused():
    with pytest.raises(ValueError, match="input_gate must be one of"):
        CellOptions(input_gate="relu")
    with pytest.raises(ValueError, match="input_gate must be one of"):
        get_mlstm_kernel("parallel_native")(*_inputs(), input_gate="relu")


def test_cell_options_api():
    opts = CellOptions(eps=1e-5, norm_val=2, stabilize_correctly=False, grad_mode="tfla")
    assert opts.norm_val == 2.0 and isinstance(opts.norm_val, float)
    assert hash(opts) == hash(CellOptions(eps=1e-5, norm_val=2.0, stabilize_correctly=False, grad_mode="tfla"))
    assert opts.effective_qk_scale(16) == 0.25 and CellOptions(qk_scale=0.7).effective_qk_scale(16) == 0.7
    assert opts.as_kwargs() == dict(qk_scale=None, eps=1e-5, norm_val=2.0, stabilize_correctly=False,
                                    grad_mode="tfla", input_gate="exp")
    assert opts.replace(eps=0.0).eps == 0.0
    with pytest.raises(ValueError, match="eps must be finite"):
        opts.replace(eps=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.eps = 1.0


def test_cell_options_argument_equals_flat_keywords_and_refuses_both():
    inputs = _inputs()
    kernel = get_mlstm_kernel("recurrent_native")
    flat = dict(eps=1e-3, norm_val=0.5, stabilize_correctly=False, qk_scale=0.3)
    h_flat = kernel(*inputs, **flat)
    h_opts = kernel(*inputs, cell_options=CellOptions(**flat))
    assert bool(jnp.all(h_flat == h_opts))
    with pytest.raises(ValueError, match=r"not both; also got \['eps'\]"):
        kernel(*inputs, cell_options=CellOptions(), eps=1e-3)
    with pytest.raises(ValueError, match="cell_options must be a CellOptions"):
        kernel(*inputs, cell_options={"eps": 1e-3})


# ----------------------------------------------------------------------------- dtype options
def test_dtype_options_must_be_floating():
    q, k, v, i, f, c0, n0, m0 = _inputs()
    with pytest.raises(ValueError, match="output_dtype must be a floating dtype .*got int32"):
        get_mlstm_kernel("chunkwise_pallas", output_dtype="int32")(q, k, v, i, f)
    with pytest.raises(ValueError, match="autocast_kernel_dtype must be a floating dtype .*got int32"):
        get_mlstm_kernel("chunkwise_pallas", autocast_kernel_dtype=jnp.int32)(q, k, v, i, f)
    with pytest.raises(ValueError, match="autocast_kernel_dtype must name a floating dtype; got 'nope'"):
        get_mlstm_kernel("chunkwise_pallas", autocast_kernel_dtype="nope")(q, k, v, i, f)
    with pytest.raises(ValueError, match="state_dtype must be a floating dtype .*got int32"):
        get_mlstm_kernel("recurrent_native", state_dtype="int32")(q, k, v, i, f)
    with pytest.raises(ValueError, match="state_dtype must be a floating dtype .*got int32"):
        seed004.recurrent_sequence_fw(q, k, v, i, f, state_dtype="int32")
    with pytest.raises(ValueError, match="output_dtype must be a floating dtype .*got int32"):
        _combined_fw.mlstm_chunkwise_fw(q, k, v, i, f, output_dtype=jnp.int32)
    with pytest.raises(ValueError, match="Unsupported kernel dtype"):
        stablef._get_chunkwise_fwbw_kernel(jnp.int32)


# ----------------------------------------------------------------------------- seed stage shapes
BS, NHS, SS, DQ, DV, LS = 1, 2, 32, 16, 8, 16
NC = SS // LS


def _stage_args(**over):
    ones = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
    args = dict(
        matQ=ones(BS, NHS, SS, DQ), matK=ones(BS, NHS, SS, DQ), matV=ones(BS, NHS, SS, DV),
        vecI=ones(BS, NHS, NC, LS), vecA=ones(BS, NHS, NC, LS), vecB=ones(BS, NHS, NC, LS),
        matC_all=ones(BS, NHS, (NC + 1) * DQ, DV), vecN_all=ones(BS, NHS, (NC + 1) * DQ),
        scaM_all=ones(BS, NHS, NC + 1), vecN_out=ones(BS, NHS, SS), vecM_out=ones(BS, NHS, SS),
        matDeltaH=ones(BS, NHS, SS, DV), matDeltaC_states=ones(BS, NHS, (NC + 1) * DQ, DV),
    )
    args.update({k: ones(*v) for k, v in over.items()})
    return args


STAGES = {
    "dQ": _parallel_bw_dQ.mlstm_chunkwise__parallel_bw_dQ,
    "dK": _parallel_bw_dK.mlstm_chunkwise__parallel_bw_dK,
    "dV": _parallel_bw_dV.mlstm_chunkwise__parallel_bw_dV,
}
STAGE_MISMATCHES = [
    ("matDeltaH-half-length", {"matDeltaH": (BS, NHS, SS // 2, DV)},
     r"matDeltaH has shape \(1, 2, 16, 8\); expected \(1, 2, 32, 8\) from matV \(1, 2, 32, 8\)"),
    ("matDeltaC_states-too-few-rows", {"matDeltaC_states": (BS, NHS, NC * DQ, DV)},
     r"matDeltaC_states has shape \(1, 2, 32, 8\); expected \(1, 2, 48, 8\) from matQ \(1, 2, 32, 16\)"),
    ("matQ-wrong-DHQK", {"matQ": (BS, NHS, SS, DQ // 2)},
     r"matK has shape \(1, 2, 32, 16\); expected \(1, 2, 32, 8\) from matQ \(1, 2, 32, 8\)"),
    ("vecN_out-short", {"vecN_out": (BS, NHS, SS - 1)},
     r"vecN_out has shape \(1, 2, 31\); expected \(1, 2, 32\) from matQ"),
    ("vecB-wrong-chunks", {"vecB": (BS, NHS, NC + 1, LS)},
     r"vecB has shape \(1, 2, 3, 16\); expected \(1, 2, 2, 16\) from matQ .* and chunk_size=16"),
    ("scaM_all-short", {"scaM_all": (BS, NHS, NC)}, r"scaM_all has shape \(1, 2, 2\); expected \(1, 2, 3\)"),
    ("matC_all-wrong-DHV", {"matC_all": (BS, NHS, (NC + 1) * DQ, DV + 1)},
     r"matC_all has shape \(1, 2, 48, 9\); expected \(1, 2, 48, 8\)"),
]


@pytest.mark.parametrize("case,over,pattern", STAGE_MISMATCHES, ids=[c[0] for c in STAGE_MISMATCHES])
@pytest.mark.parametrize("stage", list(STAGES))
def test_seed_backward_stages_check_every_argument(stage, case, over, pattern):
    a = _stage_args(**over)
    with pytest.raises(ValueError, match=pattern):
        STAGES[stage](*a.values(), chunk_size=LS)


@pytest.mark.parametrize("chunk_size,pattern", [(0, "positive int; got 0"), (24, "power of two >= 16; got 24"),
                                                (32, "must be a multiple of chunk_size=32")],
                         ids=["0", "24", "not-dividing-S"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_seed_backward_stages_check_the_chunk_size(stage, chunk_size, pattern):
    a = _stage_args()
    if chunk_size == 32:  # S = 32 is a multiple of 32: use S = 48 with gates of 48 / 16 chunks
        a = _stage_args(matQ=(BS, NHS, 48, DQ), matK=(BS, NHS, 48, DQ), matV=(BS, NHS, 48, DV))
    with pytest.raises(ValueError, match=pattern):
        STAGES[stage](*a.values(), chunk_size=chunk_size)


def test_seed_forward_stages_check_every_argument():
    a = _stage_args()
    q, k, v = a["matQ"], a["matK"], a["matV"]
    i = f = jnp.ones((BS, NHS, SS))
    with pytest.raises(ValueError, match=r"matV has shape \(1, 2, 31, 8\); expected \(1, 2, 32, 8\) from matK"):
        _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v[:, :, 1:], f, i)
    with pytest.raises(ValueError, match=r"vecF has shape \(1, 2, 31\); expected \(1, 2, 32\)"):
        _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v, f[:, :, 1:], i)
    with pytest.raises(ValueError, match=r"scaMinter_initial has shape \(1, 3\); expected \(1, 2\)"):
        _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, None, None, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=0)
    with pytest.raises(ValueError, match="save_states_every_nth_chunk must be a positive int; got 0"):
        _recurrent_fw.mlstm_chunkwise__recurrent_fw_C(k, v, f, i, chunk_size=16, save_states_every_nth_chunk=0)
    states = (a["matC_all"], a["vecN_all"], a["scaM_all"])
    with pytest.raises(ValueError, match=r"matC_all has shape \(1, 2, 32, 8\); expected \(1, 2, 48, 8\)"):
        _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, states[0][:, :, :32], *states[1:],
                                                         chunk_size=LS)
    with pytest.raises(ValueError, match=r"matK has shape \(1, 2, 32, 8\); expected \(1, 2, 32, 16\)"):
        _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(q, k[..., :8], v, i, f, *states, chunk_size=LS)
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, *states, chunk_size=0)
    with pytest.raises(ValueError, match="output_dtype must be a floating dtype"):
        _parallel_fw.mlstm_chunkwise__parallel_fw_Hintra(q, k, v, i, f, *states, chunk_size=LS,
                                                         output_dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"vecI has shape \(1, 2, 16\); expected \(1, 2, 32\) from vecF"):
        _chunkwise_gates.compute_chunkwise_log_gates_vecB_vecA(i[:, :, :16], f, LS)
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        _chunkwise_gates.compute_chunkwise_log_gates_vecB_vecA(i, f, 0)


def test_seed_recurrent_bw_checks_every_argument():
    a = _stage_args()
    q, dh, vecN, vecM = a["matQ"], a["matDeltaH"], a["vecN_out"], a["vecM_out"]
    f, scaM = jnp.ones((BS, NHS, SS)), a["scaM_all"]
    fn = _recurrent_bw.mlstm_chunkwise__recurrent_bw_dC
    with pytest.raises(ValueError, match=r"vecN_out has shape \(1, 2, 16\); expected \(1, 2, 32\) from matQ"):
        fn(q, f, scaM, vecM, dh, vecN[:, :, :16], chunk_size=LS)
    with pytest.raises(ValueError, match=r"matDeltaH has shape \(1, 2, 16, 8\); expected \(1, 2, 32, 8\) from matQ"):
        fn(q, f, scaM, vecM, dh[:, :, :16], vecN, chunk_size=LS)
    with pytest.raises(ValueError, match=r"scaM_inter has shape \(1, 2, 2\); expected \(1, 2, 3\) .*16-step chunks"):
        fn(q, f, scaM[:, :, :2], vecM, dh, vecN, chunk_size=LS)
    with pytest.raises(ValueError, match=r"matDeltaC_last has shape \(1, 2, 8, 8\); expected \(1, 2, 16, 8\)"):
        fn(q, f, scaM, vecM, dh, vecN, jnp.ones((1, 2, 8, 8)), chunk_size=LS)
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        fn(q, f, scaM, vecM, dh, vecN, chunk_size=0)


def test_seed_combined_bw_checks_every_argument():
    q, k, v, i, f, c0, n0, m0 = _inputs(S=32)
    fn = _combined_bw.mlstm_chunkwise_bw
    with pytest.raises(ValueError, match="matDeltaH .* is required"):
        fn(q, k, v, i, f)
    with pytest.raises(ValueError, match=r"matDeltaH has shape \(1, 2, 16, 16\); expected \(1, 2, 32, 16\)"):
        fn(q, k, v, i, f, matDeltaH=jnp.ones((1, 2, 16, 16)))
    with pytest.raises(ValueError, match=r"vecN_out has shape \(1, 2, 31\); expected \(1, 2, 32\)"):
        fn(q, k, v, i, f, vecN_out=jnp.ones((1, 2, 31)), matDeltaH=jnp.ones(v.shape))
    with pytest.raises(ValueError, match=r"matC_all has shape \(1, 2, 40, 16\); expected \(1, 2, 16, 16\)"):
        fn(q, k, v, i, f, matC_all=jnp.ones((1, 2, 40, 16)), matDeltaH=jnp.ones(v.shape))
    with pytest.raises(ValueError, match=r"matDeltaC_last has shape \(1, 2, 16\)"):
        fn(q, k, v, i, f, matDeltaH=jnp.ones(v.shape), matDeltaC_last=jnp.ones((1, 2, 16)))
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        fn(q, k, v, i, f, matDeltaH=jnp.ones(v.shape), grad_mode="approx")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int; got 0"):
        fn(q, k, v, i, f, matDeltaH=jnp.ones(v.shape), chunk_size=0)


@pytest.mark.parametrize("module", [stablef, triton_fwbw], ids=["seed000", "v5"])
def test_seed_generators_check_the_chunk_size(module):
    with pytest.raises(ValueError, match="chunk_size must be a positive int; got 0"):
        module._get_chunkwise_fwbw_kernel("float32", chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16; got 48"):
        module._get_chunkwise_fwbw_kernel("float32", chunk_size=48)
