"""Packed documents (``segment_ids``) and the sigmoid input gate (``input_gate="sigmoid"``) in every
kernel (issue 11), against float64 references written from the cell's recurrent definition.

* Segments: a document starts where the id changes; the reference (``_reference``) runs the
  recurrence and, at every document start, replaces the state by the empty state (C = 0, n = 0 and,
  for the exponential cell, m = -inf: the parallel form's start, in which the first step's forget
  gate has no effect). That is each document run on its own; the first document of a row starts
  from the initial states. Hard cases: S not a multiple of the chunk, documents of one step and
  shorter than a chunk, boundaries on and off chunk edges, ids not consecutive, a row of one
  document, different documents per row.
* Sigmoid: C_t = sigmoid(f_t) C_{t-1} + sigmoid(i_t) k_t v_t^T (n_t likewise), h_t = qs_t^T C_t /
  (max(|qs_t . n_t|, norm_val) + eps), no max state; initial states (C, n, m) mean (exp(m) C, exp(m) n).

Outputs, last states and every gradient (q, k, v, i, f, C0, n0, m0) are compared leaf by leaf; NaN
fails. Pallas kernels run in interpret mode on CPU (compiled on the GPU machine).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import CellOptions, get_mlstm_kernel, get_mlstm_step_kernel
from xlstm_jax.testing import assert_trees_close, mlstm_inputs, outputs_and_grads_of, to_float64

B, NH, S, DHQK, DHV, L = 3, 2, 40, 16, 16, 16
F64_TOL = 1e-10
F32_TOL = 2e-4
NAMES = ("q", "k", "v", "i", "f", "c0", "n0", "m0")
# row 0: documents of 3, 13, 1, 16, 7 steps (starts 3, 16 = a chunk edge, 17, 33), consecutive ids;
# row 1: ids 5, 2, 9 (not consecutive, not sorted), a document of one step at 20;
# row 2: one document.
_ROWS = (
    [0] * 3 + [1] * 13 + [2] * 1 + [3] * 16 + [4] * 7,
    [5] * 20 + [2] * 1 + [9] * 19,
    [7] * 40,
)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def segment_ids() -> jax.Array:
    return jnp.asarray(np.array(_ROWS, np.int32))


def _starts(ids) -> jax.Array:
    """(B, S) bool: a document starts at t > 0."""
    return jnp.concatenate([jnp.zeros((ids.shape[0], 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _inputs(dtype=jnp.float32, seed=11):
    key = jax.random.PRNGKey(seed)
    inputs = mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=dtype, gate_scale=2.0, f_offset=2.0,
                          initial_states=True, m_initial_scale=2.0)
    ks = jax.random.split(jax.random.fold_in(key, 1), 4)
    cots = (
        jax.random.normal(ks[0], (B, NH, S, DHV)), jax.random.normal(ks[1], (B, NH, DHQK, DHV)),
        jax.random.normal(ks[2], (B, NH, DHQK)), jax.random.normal(ks[3], (B, NH)),
    )
    return inputs, cots


def _reference(q, k, v, i, f, c0, n0, m0, starts, *, input_gate="exp", eps=1e-6, norm_val=1.0,
               grad_mode="exact"):
    """The recurrent definition in float64; the empty state at every document start (module doc).
    ``grad_mode="tfla"``: the denominator (and m) held constant in the backward pass."""
    sg = jax.lax.stop_gradient if grad_mode == "tfla" else (lambda x: x)
    qk_scale = q.shape[-1] ** -0.5
    sigmoid = input_gate == "sigmoid"
    if sigmoid:  # the state convention: (C, n, m) stands for (exp(m) C, exp(m) n)
        c0, n0, m0 = c0 * jnp.exp(m0)[..., None, None], n0 * jnp.exp(m0)[..., None], jnp.zeros_like(m0)

    def step(carry, x):
        C, n, m = carry
        qt, kt, vt, it, ft, st = x
        st = st[:, None]  # (B, 1): the document starts here
        C = jnp.where(st[..., None, None], 0.0, C)
        n = jnp.where(st[..., None], 0.0, n)
        qs = qt * qk_scale
        if sigmoid:
            fa, ia = jax.nn.sigmoid(ft), jax.nn.sigmoid(it)
            m_new, lam = m, norm_val
        else:
            m = jnp.where(st, -jnp.inf, m)
            logf = jax.nn.log_sigmoid(ft)
            m_new = sg(jnp.maximum(logf + m, it))
            fa, ia = jnp.exp(logf + m - m_new), jnp.exp(it - m_new)
            lam = norm_val * jnp.exp(-m_new)
        C = fa[..., None, None] * C + ia[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = fa[..., None] * n + ia[..., None] * kt
        den = sg(jnp.maximum(jnp.abs(jnp.einsum("bhd,bhd->bh", qs, n)), lam) + eps)
        return (C, n, m_new), jnp.einsum("bhd,bhdv->bhv", qs, C) / den[..., None]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f)) + (jnp.moveaxis(starts, 1, 0),)
    (C, n, m), hs = jax.lax.scan(step, (c0, n0, m0), xs)
    return jnp.moveaxis(hs, 0, 2), (C, n, m)


@functools.lru_cache(maxsize=None)
def _reference_fn(input_gate, packed, grad_mode="exact"):
    def run(inputs, cots):
        starts = _starts(segment_ids()) if packed else jnp.zeros((B, S), bool)
        return outputs_and_grads_of(
            lambda *a: _reference(*a, starts, input_gate=input_gate, grad_mode=grad_mode), inputs, cots)

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _kernel_fn(name, options, input_gate, packed, grad_mode="exact"):
    kernel = get_mlstm_kernel(name, **dict(options))
    opts = CellOptions(input_gate=input_gate, grad_mode=grad_mode)

    def fn(*a):
        seg = segment_ids() if packed else None
        return kernel(*a, return_last_states=True, segment_ids=seg, cell_options=opts)

    return jax.jit(lambda inputs, cots: outputs_and_grads_of(fn, inputs, cots))


KERNELS = [
    ("parallel_native", ()),
    ("recurrent_native", ()),
    ("chunkwise_native", (("chunk_size", L),)),
    ("chunkwise_pallas", (("chunk_size", L),)),
]
CASES = [("exp", True), ("sigmoid", False), ("sigmoid", True)]


@pytest.mark.parametrize("input_gate,packed", CASES, ids=["segment-exp", "sigmoid", "segment-sigmoid"])
@pytest.mark.parametrize("name,options", KERNELS, ids=[k[0] for k in KERNELS])
def test_kernels_against_float64_reference(name, options, input_gate, packed):
    inputs, cots = _inputs()
    ref = _reference_fn(input_gate, packed)(to_float64(inputs), to_float64(cots))
    if name == "chunkwise_pallas":  # computes in float32
        got, tol = _kernel_fn(name, options, input_gate, packed)(inputs, cots), F32_TOL
    else:
        got, tol = _kernel_fn(name, options, input_gate, packed)(to_float64(inputs), to_float64(cots)), F64_TOL
    what = f"{name} {input_gate} packed={packed}"
    assert_trees_close(got[0], ref[0], tol, f"{what} outputs")
    assert_trees_close(got[1], ref[1], tol, f"{what} gradients")
    if packed:  # the given f at a document start has no effect
        starts = np.asarray(_starts(segment_ids()))
        assert float(jnp.max(jnp.abs(got[1]["f"][np.broadcast_to(starts[:, None], (B, NH, S))]))) == 0.0


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_chunkwise_pallas_tfla_gradients(input_gate):
    """The TFLA gradient convention (denominator and m constant) with packed documents."""
    inputs, cots = _inputs()
    ref = _reference_fn(input_gate, True, "tfla")(to_float64(inputs), to_float64(cots))
    got = _kernel_fn("chunkwise_pallas", (("chunk_size", L),), input_gate, True, "tfla")(inputs, cots)
    assert_trees_close(got[0], ref[0], F32_TOL, f"tfla {input_gate} outputs")
    assert_trees_close(got[1], ref[1], F32_TOL, f"tfla {input_gate} gradients")


@pytest.mark.slow  # ~10 s unloaded; the float64-reference tests above cover the same property
def test_segments_equal_documents_run_alone():
    """A packed row equals its documents as separate kernel calls (first with the initial states,
    the others from nothing), outputs and gradients; the row's last state is the last document's."""
    inputs, cots = to_float64(_inputs())
    kernel = get_mlstm_kernel("recurrent_native")
    ids = segment_ids()[:1]
    cuts = [0, 3, 16, 17, 33, 40]
    row = tuple(x[:1] for x in inputs)
    dh = cots[0][:1]

    def packed(q, k, v, i, f, c0, n0, m0):
        h, st = kernel(q, k, v, i, f, c0, n0, m0, return_last_states=True, segment_ids=ids)
        return jnp.sum(h * dh) + jnp.sum(st[0] * cots[1][:1]), h

    def alone(q, k, v, i, f, c0, n0, m0):
        hs, total = [], 0.0
        for d, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            sl = lambda x: x[:, :, a:b]  # noqa: E731
            init = (c0, n0, m0) if d == 0 else (None, None, None)
            if d == 0:
                h, st = kernel(sl(q), sl(k), sl(v), sl(i), sl(f), *init, return_last_states=True)
            else:  # the empty state of the parallel form: the document's first forget gate is unused
                h = get_mlstm_kernel("parallel_native")(sl(q), sl(k), sl(v), sl(i), sl(f))
                _, st = get_mlstm_kernel("parallel_native")(
                    sl(q), sl(k), sl(v), sl(i), sl(f).at[:, :, 0].set(-jnp.inf), return_last_states=True)
            hs.append(h)
        h = jnp.concatenate(hs, axis=2)
        return jnp.sum(h * dh) + jnp.sum(st[0] * cots[1][:1]), h

    (g1, h1) = jax.grad(packed, argnums=tuple(range(8)), has_aux=True)(*row)
    (g2, h2) = jax.grad(alone, argnums=tuple(range(8)), has_aux=True)(*row)
    assert_trees_close({"h": h1, **dict(zip(NAMES, g1))}, {"h": h2, **dict(zip(NAMES, g2))}, F64_TOL,
                       "packed vs alone")


@pytest.mark.parametrize("name", ["recurrent_native", "recurrent_pallas"])
def test_step_kernels_sigmoid(name):
    """The step kernels with input_gate="sigmoid" step by step equal the float64 reference
    (initial states with m != 0 included)."""
    inputs, _ = _inputs(seed=3)
    steps = 6
    q, k, v, i, f = (x[:, :, :steps] for x in inputs[:5])
    c, n, m = inputs[5:]
    ref_h, ref_state = jax.jit(lambda *a: _reference(*to_float64(a), jnp.zeros((B, steps), bool),
                                                     input_gate="sigmoid"))(q, k, v, i, f, c, n, m)
    step = get_mlstm_step_kernel(name)
    hs = []
    for t in range(steps):
        h, (c, n, m) = step(c, n, m, q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t],
                            input_gate="sigmoid")
        hs.append(h)
    got = {"h": jnp.stack(hs, axis=2), "C": c, "n": n, "m": m}
    want = {"h": ref_h, "C": ref_state[0], "n": ref_state[1], "m": ref_state[2]}
    assert_trees_close(got, want, F32_TOL, f"{name} sigmoid steps")


def test_segment_ids_of_one_step_and_empty_batch():
    q, k, v, i, f, *_ = (x[:, :, :1] if x is not None and x.ndim > 2 else x for x in _inputs()[0])
    kernel = get_mlstm_kernel("chunkwise_native", chunk_size=L)
    h = kernel(q, k, v, i, f, segment_ids=jnp.zeros((B, 1), jnp.int32))
    assert_trees_close({"h": h}, {"h": kernel(q, k, v, i, f)}, F64_TOL, "S = 1")
    h0 = kernel(q[:0], k[:0], v[:0], i[:0], f[:0], segment_ids=jnp.zeros((0, 1), jnp.int32))
    assert h0.shape == (0, NH, 1, DHV)


def test_segment_ids_validation():
    q, k, v, i, f, *_ = _inputs()[0]
    kernel = get_mlstm_kernel("parallel_native")
    with pytest.raises(ValueError, match=r"segment_ids has shape \(3, 39\); expected \(B, S\)"):
        kernel(q, k, v, i, f, segment_ids=jnp.zeros((B, S - 1), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be an integer array; got dtype float32"):
        kernel(q, k, v, i, f, segment_ids=jnp.zeros((B, S), jnp.float32))
