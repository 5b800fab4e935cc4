"""The fused Pallas step kernel (``recurrent_pallas``) against the float64 recurrent reference.

Interpret mode on CPU, compiled on an NVIDIA GPU (``interpret=None``). Each case runs many steps in a
``lax.scan`` and compares h at every step and the last states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import available_mlstm_step_kernels, get_mlstm_step_kernel
from xlstm_jax.kernels.mlstm_recurrent.native import mlstm_recurrent_sequence
from xlstm_jax.kernels.mlstm_recurrent.pallas_step import choose_tiling, mlstm_recurrent_step_pallas
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import recurrent_sequence_fw, seed_step_fn
from xlstm_jax.testing import mlstm_inputs, relative_error, to_float64

F32_TOL = 1e-5  # float32 arithmetic over a dozen steps lands near 1e-7
BF16_TOL = 2e-2


@pytest.fixture
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _reference(inputs, opts):
    """float64 recurrent reference: h (B, NH, S, DHV) and the last states."""
    q, k, v, i, f, c0, n0, m0 = to_float64(inputs)
    return mlstm_recurrent_sequence(q, k, v, i, f, c0, n0, m0, return_last_states=True, use_scan=True, **opts)


def _run_pallas(inputs, state_dtype, opts, kernel_options):
    """The Pallas step over the whole sequence in one jitted lax.scan (states in ``state_dtype``)."""
    q, k, v, i, f, c0, n0, m0 = inputs
    B, NH, S, DHQK = q.shape
    DHV = v.shape[-1]
    if c0 is None:
        c0, n0, m0 = (jnp.zeros(s, jnp.float32) for s in ((B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH)))
    state = tuple(x.astype(state_dtype) for x in (c0, n0, m0))

    @jax.jit
    def run(state, xs):
        def body(carry, x):
            h, new = mlstm_recurrent_step_pallas(*carry, *x, **opts, **kernel_options)
            return tuple(new), h

        last, hs = jax.lax.scan(body, state, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
        return jnp.moveaxis(hs, 0, 2), last

    return run(state, (q, k, v, i, f))


def _check(out, ref, tol):
    h, last = out
    h_ref, last_ref = ref
    assert jnp.isfinite(h.astype(jnp.float32)).all()
    errs = {"h": relative_error(h, h_ref)}
    errs.update({name: relative_error(a, b) for name, a, b in zip(("C", "n", "m"), last, last_ref)})
    for name, err in errs.items():
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol} (all: {errs})"  # NaN fails too


CASES = [
    # id, (B, NH, S, DHQK, DHV), mlstm_inputs kwargs, cell options, kernel options
    ("B2-NH2-S12-DHQK16-DHV32-initM10", (2, 2, 12, 16, 32),
     dict(initial_states=True, m_initial_scale=10.0), {}, {}),
    ("B1-NH2-S8-DHQK96-DHV192-tiled", (1, 2, 8, 96, 192),
     dict(initial_states=True), {}, dict(block_dhqk=32, block_dhv=64)),
    ("B2-NH1-S7-DHQK20-DHV24-padded", (2, 1, 7, 20, 24), dict(initial_states=True), {}, {}),
    ("B2-NH2-S10-DHQK32-DHV16-i+20-f-20", (2, 2, 10, 32, 16),
     dict(i_offset=20.0, f_offset=-20.0, gate_scale=2.0), {}, dict(block_dhqk=16, block_dhv=16)),
    ("B1-NH2-S6-DHQK16-DHV16-options", (1, 2, 6, 16, 16), dict(initial_states=True, m_initial_scale=5.0),
     dict(qk_scale=0.5, norm_val=3.0, stabilize_correctly=False, eps=1e-4), {}),
]


@pytest.mark.parametrize(
    "shape,input_kw,opts,kernel_options", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_many_steps_float32_states(x64, shape, input_kw, opts, kernel_options):
    B, NH, S, DHQK, DHV = shape
    inputs = mlstm_inputs(jax.random.PRNGKey(S * 1000 + DHQK), B, NH, S, DHQK, DHV, **input_kw)
    out = _run_pallas(inputs, jnp.float32, opts, kernel_options)
    assert out[0].dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in out[1])
    _check(out, _reference(inputs, opts), F32_TOL)


def test_many_steps_bf16_states_and_inputs(x64):
    B, NH, S, DHQK, DHV = 2, 2, 16, 64, 32
    inputs = mlstm_inputs(jax.random.PRNGKey(7), B, NH, S, DHQK, DHV, dtype=jnp.bfloat16, initial_states=True,
                          m_initial_scale=3.0)
    out = _run_pallas(inputs, jnp.bfloat16, {}, dict(block_dhqk=16, block_dhv=16))
    assert out[0].dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in out[1])
    # the reference starts from the same (bf16-rounded) initial states
    q, k, v, i, f, c0, n0, m0 = inputs
    rounded = (q, k, v, i, f, *(x.astype(jnp.bfloat16) for x in (c0, n0, m0)))
    _check(out, _reference(rounded, {}), BF16_TOL)


@pytest.mark.parametrize("use_scan", [False, True], ids=["loop", "scan"])
def test_seed_adapter_in_recurrent_sequence_fw(x64, use_scan):
    inputs = mlstm_inputs(jax.random.PRNGKey(3), 1, 2, 3, 16, 32, initial_states=True)
    q, k, v, i, f, c0, n0, m0 = inputs
    h, last = recurrent_sequence_fw(
        q, k, v, i[..., None], f[..., None], c0, n0, m0, return_last_states=True, use_scan=use_scan,
        mlstm_step_fn=seed_step_fn("recurrent_pallas"),
    )
    _check((h, last), _reference(inputs, {}), F32_TOL)


def test_registry_and_backend(x64):
    assert "recurrent_pallas" in available_mlstm_step_kernels()
    step = get_mlstm_step_kernel("recurrent_pallas", block_dhv=16)
    inputs = mlstm_inputs(jax.random.PRNGKey(4), 2, 2, 4, 16, 32, initial_states=True)
    q, k, v, i, f, c0, n0, m0 = inputs
    h, (C, n, m) = step(c0, n0, m0, q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0])
    h_ref, last_ref = _reference(tuple(x[:, :, :1] for x in inputs[:5]) + inputs[5:], {})
    _check((h[:, :, None], (C, n, m)), (h_ref, last_ref), F32_TOL)
    with pytest.raises(ValueError, match="block_size"):
        get_mlstm_step_kernel("recurrent_pallas", block_size=16)

    backend = create_mlstm_backend("recurrent_triton", kernel_dtype="bfloat16", use_scan=True)
    h, last = backend.apply({}, q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert h.dtype == q.dtype
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v, i, f))  # the kernel sees bf16 inputs, h is bf16
    _check((h, last), _reference(bf + (c0, n0, m0), {}), BF16_TOL)
    with pytest.raises(ValueError, match="kernel_dtype"):
        create_mlstm_backend("recurrent_triton", kernel_dtype="int32").apply({}, q, k, v, i, f)


def test_tiling_heuristic():
    # large heads at batch 1: enough programs for the GPU; batch 64: DHV tiles of 128
    t1 = choose_tiling(8, 256, 512)
    assert t1.num_tiles_DHV * 8 >= 128 and t1.DHQK_p == 256 and t1.DHV_p == 512
    t64 = choose_tiling(512, 256, 512)
    assert t64.siz_b_DHV == 128 and t64.siz_b_DHQK * t64.siz_b_DHV <= 8192
    # 96 and 192 are tiled without padding, 100 is padded to a multiple of 16
    t = choose_tiling(4, 96, 192)
    assert (t.DHQK_p, t.DHV_p) == (96, 192) and 96 % t.siz_b_DHQK == 0 and 192 % t.siz_b_DHV == 0
    assert choose_tiling(4, 100, 8).DHQK_p == 112 and choose_tiling(4, 100, 8).DHV_p == 8


def test_lowers_for_gpu_with_in_place_state():
    """Lowering to Triton (no GPU needed) succeeds, with C aliased to the new C (in place)."""
    B, NH, DHQK, DHV = 2, 3, 96, 40
    sds = jax.ShapeDtypeStruct
    args = [sds((B, NH, DHQK, DHV), jnp.bfloat16), sds((B, NH, DHQK), jnp.bfloat16), sds((B, NH), jnp.float32),
            sds((B, NH, DHQK), jnp.bfloat16), sds((B, NH, DHQK), jnp.bfloat16), sds((B, NH, DHV), jnp.bfloat16),
            sds((B, NH), jnp.float32), sds((B, NH), jnp.float32)]
    fn = jax.jit(lambda *a: mlstm_recurrent_step_pallas(*a, interpret=False), donate_argnums=0)
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "output_operand_alias" in text


@pytest.mark.gpu
def test_step_updates_c_in_place_on_gpu():
    inputs = mlstm_inputs(jax.random.PRNGKey(5), 2, 2, 1, 64, 128, initial_states=True)
    q, k, v, i, f, c0, n0, m0 = (x[:, :, 0] if idx < 5 else x for idx, x in enumerate(inputs))
    step = jax.jit(mlstm_recurrent_step_pallas, donate_argnums=0)
    c0 = c0 + 0.0  # a buffer of our own to donate
    ptr = c0.unsafe_buffer_pointer()
    h, (C, n, m) = step(c0, n0, m0, q, k, v, i, f)
    assert C.unsafe_buffer_pointer() == ptr
    assert np.isfinite(np.asarray(h)).all()


BAD = [
    ("C-shape", dict(matC=(2, 2, 16, 31))),
    ("n-shape", dict(vecN=(2, 2, 15))),
    ("m-trailing-one", dict(scaM=(2, 2, 1))),
    ("gate-shape", dict(scaI=(2, 3))),
    ("q-rank", dict(vecQ=(2, 2, 1, 16))),
    ("v-shape", dict(vecV=(2, 1, 32))),
]


@pytest.mark.parametrize("override", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_shapes_raise(override):
    shapes = dict(matC=(2, 2, 16, 32), vecN=(2, 2, 16), scaM=(2, 2), vecQ=(2, 2, 16), vecK=(2, 2, 16),
                  vecV=(2, 2, 32), scaI=(2, 2), scaF=(2, 2))
    shapes.update(override)
    args = [jnp.ones(s, jnp.float32) for s in shapes.values()]
    with pytest.raises(ValueError, match="shape"):
        mlstm_recurrent_step_pallas(*args, interpret=True)


def test_bad_dtypes_options_and_adapter_shapes_raise():
    C, n, m = jnp.ones((1, 1, 16, 16)), jnp.ones((1, 1, 16)), jnp.ones((1, 1))
    q = k = jnp.ones((1, 1, 16))
    v = jnp.ones((1, 1, 16))
    g = jnp.ones((1, 1))
    with pytest.raises(ValueError, match="dtype"):
        mlstm_recurrent_step_pallas(C, n.astype(jnp.bfloat16), m, q, k, v, g, g, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        mlstm_recurrent_step_pallas(C, n, m, q, k, v, g, g, block_dhqk=12, interpret=True)
    with pytest.raises(ValueError, match="exceeds"):
        mlstm_recurrent_step_pallas(C, n, m, q, k, v, g, g, block_dhv=64, interpret=True)
    with pytest.raises(ValueError, match="eps"):
        mlstm_recurrent_step_pallas(C, n, m, q, k, v, g, g, eps=-1.0, interpret=True)
    with pytest.raises(ValueError, match=r"\(1, 1, 1\)"):
        seed_step_fn("recurrent_pallas")(C, n, m, q, k, v, g[..., None], g[..., None])  # m without trailing 1
