"""The Mosaic GPU chunkwise family ``chunkwise_mosaic`` (issue 14, forward only).

GPU tests (``gpu`` mark; skipped on CPU, run by ``scripts/gpu_mosaic.sh``): the compiled kernel's h
and last states against the float64 parallel reference at the issue's shapes. CPU tests: the
registry entry, import isolation (``import xlstm_jax.kernels`` imports no Mosaic GPU module), the
errors on CPU and for unsupported options, the compiled path lowered for CUDA, and (``slow``) the
kernel in Mosaic GPU's interpret mode against the float64 reference (resets, initial states).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.kernels import available_mlstm_kernels, get_mlstm_kernel, get_mlstm_kernel_spec
from xlstm_jax.kernels.mlstm_parallel.native import mlstm_parallel
from xlstm_jax.testing import mlstm_inputs, relative_error, to_float64

TOL = {"bfloat16": 2e-2, "float16": 1e-2}


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def _inputs(B, NH, S, DHQK, DHV, dtype, *, hard=False, seed=0):
    key = jax.random.PRNGKey(seed)
    inp = list(mlstm_inputs(key, B, NH, S, DHQK, DHV, dtype=jnp.dtype(dtype), initial_states=True,
                            m_initial_scale=1.0))
    if hard:  # large input gates, small forget gates, one exact reset (f = -inf)
        k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
        shape = (B, NH, S)
        inp[3] = jnp.where(jax.random.uniform(k1, shape) < 0.3, 20.0, inp[3]).astype(inp[3].dtype)
        inp[4] = jnp.where(jax.random.uniform(k2, shape) < 0.3, -20.0, inp[4]).astype(inp[4].dtype)
        inp[4] = inp[4].at[0, 0, S // 2 + 5].set(-jnp.inf)
    return tuple(inp)


def _check(out, ref, tol, what):
    err = relative_error(out, ref)
    assert np.isfinite(err) and err < tol, f"{what}: relative error {err:.3e} (tolerance {tol})"


def _compare(inputs, tol, jit=False, **options):
    fn = get_mlstm_kernel("chunkwise_mosaic", **options)
    fn = jax.jit(fn, static_argnames="return_last_states") if jit else fn
    h, st = fn(*inputs, return_last_states=True)
    h_ref, st_ref = mlstm_parallel(*to_float64(inputs), return_last_states=True)
    assert h.dtype == inputs[0].dtype and h.shape == h_ref.shape
    _check(h, h_ref, tol, "h")
    for name, a, b in zip(("C", "n", "m"), st, st_ref):
        assert a.dtype == jnp.float32, name
        _check(a, b, tol, f"last state {name}")


# ---------------------------------------------------------------------------------------- CPU


def test_registry_entry():
    assert "chunkwise_mosaic" in available_mlstm_kernels()
    spec = get_mlstm_kernel_spec("chunkwise_mosaic")
    pallas = get_mlstm_kernel_spec("chunkwise_pallas")
    assert spec.needs_gpu and not spec.differentiable
    assert spec.options == pallas.options  # same options as the Triton family
    with pytest.raises(ValueError, match="no option"):
        get_mlstm_kernel("chunkwise_mosaic", chunk_sise=64)


def test_import_isolation():
    """``import xlstm_jax.kernels`` (and loading the registry) imports neither the public Mosaic GPU
    module nor the project's one Mosaic module (JAX itself may load its private parts)."""
    code = (
        "import sys, xlstm_jax.kernels as K; K.available_mlstm_kernels(); "
        "bad = [m for m in ('jax.experimental.pallas.mosaic_gpu', 'xlstm_jax.kernels.pallas._mosaic') "
        "if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU error")
def test_clear_error_without_gpu():
    x = _inputs(1, 1, 64, 64, 64, "bfloat16")
    with pytest.raises(RuntimeError, match="needs an NVIDIA Hopper GPU.*chunkwise_pallas"):
        get_mlstm_kernel("chunkwise_mosaic")(*x)


def test_option_errors():
    x = _inputs(1, 1, 64, 64, 64, "bfloat16")
    kern = get_mlstm_kernel("chunkwise_mosaic")
    with pytest.raises(ValueError, match="multiple of 64"):
        get_mlstm_kernel("chunkwise_mosaic", chunk_size=32)(*x)
    with pytest.raises(ValueError, match="siz_b_L_parallel"):
        get_mlstm_kernel("chunkwise_mosaic", siz_b_L_parallel=128)(*x)
    with pytest.raises(ValueError, match="num_warps_intra"):
        get_mlstm_kernel("chunkwise_mosaic", num_warps_intra=8)(*x)
    with pytest.raises(ValueError, match="siz_b_DH_parallel"):
        get_mlstm_kernel("chunkwise_mosaic", siz_b_DH_parallel=96 + 1)(*x)
    with pytest.raises(NotImplementedError, match="float32"):
        kern(*_inputs(1, 1, 64, 64, 64, "float32"))
    with pytest.raises(ValueError, match="grad_mode"):
        kern(*x, grad_mode="approximate")


def test_backward_is_not_implemented():
    from xlstm_jax.kernels.mlstm_chunkwise.mosaic import forward

    with pytest.raises(NotImplementedError, match="forward-only.*chunkwise_pallas"):
        forward._forward_bwd(None, None, None)


def test_empty_batch():
    x = _inputs(0, 2, 64, 64, 64, "bfloat16")
    h, (c, n, m) = get_mlstm_kernel("chunkwise_mosaic")(*x, return_last_states=True)
    assert h.shape == (0, 2, 64, 64) and c.shape == (0, 2, 64, 64) and m.shape == (0, 2)


LOWERING_CASES = [  # (B, NH, S, DHQK, DHV, dtype, chunk): standard, 7B and small heads
    (1, 2, 256, 128, 256, "bfloat16", 128),
    (1, 2, 256, 256, 512, "bfloat16", 128),
    (1, 2, 128, 64, 128, "float16", 64),
]


@pytest.mark.parametrize("case", LOWERING_CASES, ids=["-".join(map(str, c)) for c in LOWERING_CASES])
def test_compiled_path_lowers_for_cuda(case, monkeypatch):
    """The compiled (not interpreted) kernel body traces and lowers to a Mosaic GPU custom call
    for CUDA on any machine: catches API, shape and layout errors of the GPU path without a GPU
    (compiling to a cubin, and the run, need the GPU)."""
    from xlstm_jax.kernels.pallas import _mosaic

    B, NH, S, DHQK, DHV, dtype, chunk = case
    monkeypatch.setattr(_mosaic, "check_backend", lambda *a: None)
    sds = lambda *shape, dt=jnp.dtype(dtype): jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    args = (sds(B, NH, S, DHQK), sds(B, NH, S, DHQK), sds(B, NH, S, DHV),
            sds(B, NH, S, dt=jnp.float32), sds(B, NH, S, dt=jnp.float32))
    fn = get_mlstm_kernel("chunkwise_mosaic", chunk_size=chunk, interpret=False)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.slow  # ~20-40 s on 2 cores (CI budget); the GPU tests check the same arithmetic compiled
def test_interpret_mode_against_float64_reference(x64):
    """The kernel in Mosaic GPU's interpret mode (CPU; 20-40 s, mostly compilation), one
    case covering every path: S = 200 padded to 256 (two chunks of 128: the entering state and
    the inter-chunk term), two 64-row query blocks per chunk (the second loops over two key blocks:
    double-buffered k/v, the causal mask on the diagonal block only), two DHV tiles, DHQK = 32
    padded to 64, hard gates with an exact reset (f = -inf), initial states."""
    inputs = _inputs(1, 1, 200, 32, 128, "bfloat16", hard=True)
    _compare(inputs, TOL["bfloat16"], jit=True, chunk_size=128, siz_b_DH_parallel=64, interpret=True)


# ---------------------------------------------------------------------------------------- GPU

GPU_CASES = [
    # (B, NH, S, DHQK, DHV, dtype, chunk, hard gates)
    (1, 4, 256, 128, 256, "bfloat16", 128, False),
    (1, 2, 512, 256, 512, "bfloat16", 128, True),
    (1, 4, 1024, 64, 128, "bfloat16", 64, True),
    (2, 4, 2048, 128, 256, "bfloat16", 128, False),
    (1, 4, 256, 128, 256, "float16", 128, True),
    (1, 2, 320, 256, 512, "float16", 64, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=["-".join(map(str, c)) for c in GPU_CASES])
def test_gpu_against_float64_reference(case, x64):
    B, NH, S, DHQK, DHV, dtype, chunk, hard = case
    inputs = _inputs(B, NH, S, DHQK, DHV, dtype, hard=hard)
    _compare(inputs, TOL[dtype], chunk_size=chunk)


@pytest.mark.gpu
def test_gpu_matches_chunkwise_pallas():
    """Same forward as the Triton family (float32 inputs autocast to bf16 in both)."""
    inputs = _inputs(2, 4, 512, 128, 256, "float32", hard=True)
    opts = dict(chunk_size=128, autocast_kernel_dtype="bfloat16")
    h, st = get_mlstm_kernel("chunkwise_mosaic", **opts)(*inputs, return_last_states=True)
    h_p, st_p = get_mlstm_kernel("chunkwise_pallas", **opts)(*inputs, return_last_states=True)
    assert h.dtype == jnp.float32
    _check(h, h_p, 1e-2, "h vs chunkwise_pallas")
    for a, b in zip(st, st_p):
        _check(a, b, 1e-5, "last states vs chunkwise_pallas (same recurrent kernel)")
