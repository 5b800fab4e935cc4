"""The three pure-JAX references (parallel, recurrent, XLA chunkwise) agree in float64.

Outputs h, last states (C, n, m) and the gradients of q, k, v, i, f and the initial states, in both
gradient conventions, on the hard cases of docs/design.md (testing). The recurrent form (the definition
applied step by step) is the reference; the others must match it to float64 precision.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax.kernels import get_mlstm_kernel
from xlstm_jax.testing import mlstm_inputs, outputs_and_grads, random_cotangents, relative_error

F64_TOL = 1e-10


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    NH: int = 2
    S: int = 37
    DHQK: int = 8
    DHV: int = 12
    chunk_size: int = 16
    i_offset: float = 0.0
    f_offset: float = 3.0
    gate_scale: float = 2.0
    initial_states: bool = True
    m_initial_scale: float = 1.0
    options: tuple = ()

    @property
    def id(self):
        s = f"B{self.B}-NH{self.NH}-S{self.S}-DHQK{self.DHQK}-DHV{self.DHV}-L{self.chunk_size}"
        if self.i_offset:
            s += f"-i{self.i_offset:+g}"
        if self.f_offset != 3.0:
            s += f"-f{self.f_offset:+g}"
        if self.initial_states:
            s += f"-init_m{self.m_initial_scale:g}"
        for k, v in self.options:
            s += f"-{k}{v}"
        return s


CASES = [
    Case(),  # DHQK != DHV, S not a multiple of the chunk size, initial states
    Case(S=1, chunk_size=16),
    Case(S=64, chunk_size=16, DHQK=16, DHV=16, initial_states=False),
    Case(f_offset=-20.0, gate_scale=1.0),  # strongly negative forget gates
    Case(i_offset=20.0, gate_scale=1.0),  # large input gates
    Case(m_initial_scale=30.0),  # initial states with large |m|
    Case(S=50, chunk_size=8, options=(("stabilize_correctly", False), ("norm_val", 2.0))),
    Case(S=40, chunk_size=64, options=(("qk_scale", 0.7), ("eps", 1e-3))),
]


def _run(name, case: Case, grad_mode, key, **kernel_options):
    inputs = mlstm_inputs(
        key, case.B, case.NH, case.S, case.DHQK, case.DHV, dtype=jnp.float64,
        i_offset=case.i_offset, f_offset=case.f_offset, gate_scale=case.gate_scale,
        initial_states=True, m_initial_scale=case.m_initial_scale,
    )
    if not case.initial_states:
        inputs = inputs[:5] + (None, None, None)
    shapes = ((case.B, case.NH, case.DHQK, case.DHV), (case.B, case.NH, case.DHQK), (case.B, case.NH))
    cots = random_cotangents(jax.random.fold_in(key, 1), (case.B, case.NH, case.S, case.DHV),
                             [jnp.zeros(s) for s in shapes], dtype=jnp.float64)
    kernel = get_mlstm_kernel(name, **kernel_options)
    fn = jax.jit(lambda inp, cot: outputs_and_grads(kernel, inp, cot, grad_mode=grad_mode, **dict(case.options)))
    return fn(inputs, cots)


def _compare(got, ref, tol, what):
    outs, grads = got
    ref_outs, ref_grads = ref
    errors = {k: relative_error(outs[k], ref_outs[k]) for k in ref_outs}
    errors.update({"d" + k: relative_error(grads[k], ref_grads[k]) for k in ref_grads})
    bad = {k: e for k, e in errors.items() if not e <= tol}  # NaN fails too
    assert not bad, f"{what}: relative errors above {tol:g}: {bad}"


# every case in the exact convention; the TFLA convention on the cases that exercise m and the bound
GRAD_CASES = [(c, "exact") for c in CASES] + [(CASES[i], "tfla") for i in (0, 3, 6)]


@pytest.mark.parametrize("case,grad_mode", GRAD_CASES, ids=lambda x: x if isinstance(x, str) else x.id)
def test_references_agree(case, grad_mode):
    key = jax.random.PRNGKey(zlib.crc32(case.id.encode()))  # stable across processes
    ref = _run("recurrent_native", case, grad_mode, key)
    for a in ref[0].values():
        assert bool(jnp.all(jnp.isfinite(a)))
    chunk = _run("chunkwise_native", case, grad_mode, key, chunk_size=case.chunk_size)
    _compare(chunk, ref, F64_TOL, "chunkwise_native vs recurrent")
    # the parallel form starts from m0 = -inf without initial states: it differs from m0 = 0 only
    # through eps (docs/design.md, section 1), and with stabilize_correctly=False through the lower bound
    same_m = case.initial_states or dict(case.options).get("stabilize_correctly", True)
    if same_m:
        parallel = _run("parallel_native", case, grad_mode, key)
        tol = F64_TOL if case.initial_states else 1e-5
        _compare(parallel, ref, tol, "parallel_native vs recurrent")


def test_parallel_without_initial_states_equals_recurrent_when_eps_is_zero():
    case = Case(S=33, initial_states=False, options=(("eps", 0.0),))
    key = jax.random.PRNGKey(3)
    ref = _run("recurrent_native", case, "exact", key)
    _compare(_run("parallel_native", case, "exact", key), ref, F64_TOL, "parallel vs recurrent, eps=0")


def test_python_loop_equals_scan():
    case = Case(S=6)
    key = jax.random.PRNGKey(5)
    ref = _run("recurrent_native", case, "exact", key)
    _compare(_run("recurrent_native", case, "exact", key, use_scan=False), ref, F64_TOL, "loop vs scan")


@pytest.mark.parametrize("name,options", [("chunkwise_native", {"chunk_size": 8}), ("parallel_native", {}),
                                          ("recurrent_native", {})])
def test_state_passing(name, options):
    """A sequence processed whole equals the same sequence split in two with states carried over."""
    B, NH, S, DHQK, DHV, cut = 2, 2, 45, 8, 12, 19
    key = jax.random.PRNGKey(11)
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=jnp.float64, gate_scale=2.0,
                                             initial_states=True, m_initial_scale=5.0)
    kernel = get_mlstm_kernel(name, **options)
    dh = jax.random.normal(jax.random.fold_in(key, 1), (B, NH, S, DHV), jnp.float64)

    def whole(q, k, v, i, f, c0, n0, m0):
        h, st = kernel(q, k, v, i, f, c0, n0, m0, return_last_states=True)
        return jnp.sum(h * dh) + jnp.sum(st[0]) + jnp.sum(st[1]), (h, st)

    def split(q, k, v, i, f, c0, n0, m0):
        a = lambda x: x[:, :, :cut]  # noqa: E731
        b = lambda x: x[:, :, cut:]  # noqa: E731
        h1, st1 = kernel(a(q), a(k), a(v), a(i), a(f), c0, n0, m0, return_last_states=True)
        h2, st2 = kernel(b(q), b(k), b(v), b(i), b(f), *st1, return_last_states=True)
        h = jnp.concatenate([h1, h2], axis=2)
        return jnp.sum(h * dh) + jnp.sum(st2[0]) + jnp.sum(st2[1]), (h, st2)

    args = (q, k, v, i, f, c0, n0, m0)
    # jitted: op-by-op dispatch of the kernels and their gradients took ~1 min on the CI machine
    (_, (h_w, st_w)), g_w = jax.jit(jax.value_and_grad(whole, argnums=tuple(range(8)), has_aux=True))(*args)
    (_, (h_s, st_s)), g_s = jax.jit(jax.value_and_grad(split, argnums=tuple(range(8)), has_aux=True))(*args)
    assert relative_error(h_s, h_w) < F64_TOL
    for a_, b_ in zip(st_s, st_w):
        assert relative_error(a_, b_) < F64_TOL
    for a_, b_ in zip(g_s, g_w):
        assert relative_error(a_, b_) < F64_TOL


def test_tfla_gradient_differs_from_exact():
    """The two conventions are different functions' gradients: the option must change dq, dk, di, df."""
    case = Case(S=24, initial_states=False)
    key = jax.random.PRNGKey(2)
    exact = _run("chunkwise_native", case, "exact", key, chunk_size=8)[1]
    tfla = _run("chunkwise_native", case, "tfla", key, chunk_size=8)[1]
    for name in ("q", "k", "i", "f"):
        assert relative_error(tfla[name], exact[name]) > 1e-3, name


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_chunkwise_low_precision_against_float64(dtype, tol):
    B, NH, S, DHQK, DHV = 2, 2, 70, 16, 32
    key = jax.random.PRNGKey(4)
    inputs = mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=dtype, initial_states=True, m_initial_scale=3.0)
    shapes = [jnp.zeros(x.shape) for x in inputs[5:]]
    cots = random_cotangents(jax.random.fold_in(key, 1), (B, NH, S, DHV), shapes, dtype=jnp.float32)
    got = outputs_and_grads(get_mlstm_kernel("chunkwise_native", chunk_size=16), inputs, cots)
    to64 = lambda t: jax.tree_util.tree_map(lambda x: None if x is None else x.astype(jnp.float64), t)  # noqa: E731
    ref = outputs_and_grads(get_mlstm_kernel("recurrent_native"), to64(inputs), to64(cots))
    _compare(got, ref, tol, f"chunkwise_native {jnp.dtype(dtype).name}")
