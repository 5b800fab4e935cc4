"""Seed 004: names, signatures, defaults and behaviour of the recurrent backend module."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax.kernels.mlstm_recurrent.native import mlstm_recurrent_sequence
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import config as backend_config
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import recurrent as seed
from xlstm_jax.testing import mlstm_inputs, relative_error


def _defaults(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()}


def test_signatures_and_defaults():
    assert list(_defaults(seed.recurrent_step_fw)) == ["c", "n", "m", "q", "k", "v", "i", "f", "eps"]
    assert _defaults(seed.recurrent_step_fw)["eps"] == 1e-6
    d = _defaults(seed.recurrent_sequence_fw)
    assert list(d) == ["queries", "keys", "values", "igate_preact", "fgate_preact", "c_initial", "n_initial",
                       "m_initial", "return_last_states", "eps", "state_dtype", "use_scan", "mlstm_step_fn",
                       "segment_ids", "input_gate"]  # the last two: issue 11, after the seed's own
    assert (d["c_initial"], d["n_initial"], d["m_initial"]) == (None, None, None)
    assert d["return_last_states"] is False and d["eps"] == 1e-6 and d["state_dtype"] is None
    assert d["use_scan"] is False and d["mlstm_step_fn"] is seed.recurrent_step_fw
    fields = {f.name: f.default for f in dataclasses.fields(seed.mLSTMBackendRecurrentConfig)}
    assert fields == {"context_length": -1, "eps": 1e-6, "state_dtype": None, "use_scan": False,
                      "input_gate": "exp"}  # input_gate: issue 11
    assert seed.mLSTMBackendRecurrent.config_class is seed.mLSTMBackendRecurrentConfig
    assert issubclass(seed.mLSTMBackendRecurrent, backend_config.mLSTMBackend)
    backend = seed.mLSTMBackendRecurrent(config=seed.mLSTMBackendRecurrentConfig())
    assert backend.can_vmap_over_heads is False


def test_assign_model_config_params():
    @dataclasses.dataclass
    class ModelConfig:
        context_length: int = 321

    cfg = seed.mLSTMBackendRecurrentConfig()
    cfg.assign_model_config_params(ModelConfig())
    assert cfg.context_length == 321


def test_step_matches_definition_in_float64():
    with jax.enable_x64(True):
        B, NH, DHQK, DHV = 2, 3, 8, 4
        ks = jax.random.split(jax.random.PRNGKey(0), 8)
        c = jax.random.normal(ks[0], (B, NH, DHQK, DHV), jnp.float64)
        n = jax.random.normal(ks[1], (B, NH, DHQK), jnp.float64)
        m = jax.random.normal(ks[2], (B, NH, 1), jnp.float64)
        q, k = (jax.random.normal(kk, (B, NH, DHQK), jnp.float64) for kk in ks[3:5])
        v = jax.random.normal(ks[5], (B, NH, DHV), jnp.float64)
        i, f = (jax.random.normal(kk, (B, NH, 1), jnp.float64) * 3 for kk in ks[6:8])
        h, (c1, n1, m1) = seed.recurrent_step_fw(c, n, m, q, k, v, i, f)
        assert h.shape == (B, NH, DHV) and m1.shape == (B, NH, 1)
        # the definition, written out once more (docs/design.md, section 1)
        logf = jax.nn.log_sigmoid(f)
        m_ref = jnp.maximum(logf + m, i)
        fa, ia = jnp.exp(logf + m - m_ref), jnp.exp(i - m_ref)
        c_ref = fa[..., None] * c + ia[..., None] * k[..., :, None] * v[..., None, :]
        n_ref = fa * n + ia * k
        qs = q * DHQK**-0.5
        den = jnp.maximum(jnp.abs(jnp.sum(qs * n_ref, -1)), jnp.exp(-m_ref[..., 0])) + 1e-6
        h_ref = jnp.einsum("bhd,bhdv->bhv", qs, c_ref) / den[..., None]
        for got, ref in ((h, h_ref), (c1, c_ref), (n1, n_ref), (m1, m_ref)):
            assert relative_error(got, ref) < 1e-12


@pytest.mark.parametrize("use_scan", [False, True])
@pytest.mark.parametrize("gate_shape", ["BNS1", "BNS"])
def test_sequence_matches_reference(use_scan, gate_shape):
    B, NH, S, DHQK, DHV = 2, 2, 7, 8, 12
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(1), B, NH, S, DHQK, DHV,
                                             initial_states=True, m_initial_scale=4.0)
    gi, gf = (i[..., None], f[..., None]) if gate_shape == "BNS1" else (i, f)
    h, (c, n, m) = seed.recurrent_sequence_fw(q, k, v, gi, gf, c0, n0, m0, return_last_states=True,
                                              use_scan=use_scan)
    h_ref, (c_r, n_r, m_r) = mlstm_recurrent_sequence(q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert m.shape == (B, NH)
    for got, ref in ((h, h_ref), (c, c_r), (n, n_r), (m, m_r)):
        assert relative_error(got, ref) < 1e-6


def test_state_dtype_rules():
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(2), 1, 2, 5, 8, 8, initial_states=True)
    # default: the gate pre-activations' dtype
    _, st = seed.recurrent_sequence_fw(q, k, v, i.astype(jnp.bfloat16), f.astype(jnp.bfloat16),
                                       return_last_states=True)
    assert all(x.dtype == jnp.bfloat16 for x in st)
    # with initial states: their dtype
    _, st = seed.recurrent_sequence_fw(q, k, v, i, f, c0.astype(jnp.bfloat16), n0.astype(jnp.bfloat16),
                                       m0.astype(jnp.bfloat16), return_last_states=True)
    assert all(x.dtype == jnp.bfloat16 for x in st)
    # explicit state_dtype wins
    _, st = seed.recurrent_sequence_fw(q, k, v, i, f, return_last_states=True, state_dtype="float32")
    assert all(x.dtype == jnp.float32 for x in st)


def test_custom_step_fn_is_used():
    calls = []

    def step(c, n, m, q, k, v, i, f, eps=1e-6):
        calls.append(1)
        return seed.recurrent_step_fw(c, n, m, q, k, v, i, f, eps=eps)

    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(3), 1, 1, 4, 8, 8)
    seed.recurrent_sequence_fw(q, k, v, i, f, mlstm_step_fn=step)
    assert len(calls) == 4


def test_backend_module_runs():
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(4), 1, 2, 6, 8, 8, initial_states=True)
    backend = seed.mLSTMBackendRecurrent(config=seed.mLSTMBackendRecurrentConfig(use_scan=True))
    h, st = backend.apply({}, q, k, v, i[..., None], f[..., None], c0, n0, m0, return_last_states=True)
    h_ref, st_ref = mlstm_recurrent_sequence(q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert relative_error(h, h_ref) < 1e-6 and relative_error(st[0], st_ref[0]) < 1e-6


def test_step_rejects_bad_shapes():
    c = jnp.zeros((1, 2, 8, 4))
    n = jnp.zeros((1, 2, 8))
    q = k = jnp.zeros((1, 2, 8))
    v = jnp.zeros((1, 2, 4))
    g = jnp.zeros((1, 2, 1))
    with pytest.raises(ValueError, match=r"m \(1, 2\)"):
        seed.recurrent_step_fw(c, n, jnp.zeros((1, 2)), q, k, v, g, g)
    with pytest.raises(ValueError, match=r"v \(1, 2, 5\)"):
        seed.recurrent_step_fw(c, n, g, q, k, jnp.zeros((1, 2, 5)), g, g)
