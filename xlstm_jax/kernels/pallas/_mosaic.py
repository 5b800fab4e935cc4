"""The only module that imports Pallas' Mosaic GPU backend (``jax.experimental.pallas.mosaic_gpu``).

Nothing imports this module at package import: the Mosaic GPU kernel family
(``xlstm_jax.kernels.mlstm_chunkwise.mosaic``) calls ``plgpu()`` when a kernel is traced, so
``import xlstm_jax.kernels`` works with any JAX, and a missing or too old Mosaic GPU API gives a
``RuntimeError`` naming what is missing only when the family is used.

The small wrappers here absorb API differences between JAX versions (``load``'s index argument
became optional and deprecated in JAX 0.11) so that kernel bodies use one spelling.
"""

from __future__ import annotations

import functools
import inspect

import jax
from jax.experimental import pallas as pl

# Every name the kernels use; checked once so that an old API fails with one clear message.
REQUIRED_NAMES = (
    "kernel", "wgmma", "wgmma_wait", "ACC", "SMEM", "Barrier", "TilingTransform", "SwizzleTransform",
    "CompilerParams", "copy_gmem_to_smem", "copy_smem_to_gmem", "barrier_wait", "commit_smem",
    "wait_smem_to_gmem", "transpose_ref", "layout_cast", "Layout", "load", "broadcasted_iota",
)


@functools.lru_cache(maxsize=None)
def plgpu():
    """The ``jax.experimental.pallas.mosaic_gpu`` module; ``RuntimeError`` if absent or too old."""
    try:
        from jax.experimental.pallas import mosaic_gpu as mod
    except ImportError as e:  # re-raised with the reason, never swallowed
        raise RuntimeError(
            f"the Mosaic GPU kernels need jax.experimental.pallas.mosaic_gpu, which JAX "
            f"{jax.__version__} cannot import: {e}"
        ) from e
    missing = [n for n in REQUIRED_NAMES if not hasattr(mod, n)]
    if missing:
        raise RuntimeError(
            f"the Mosaic GPU kernels need jax.experimental.pallas.mosaic_gpu.{{{', '.join(missing)}}}, "
            f"missing in JAX {jax.__version__} (written against JAX 0.11)"
        )
    return mod


def check_backend(kernel_name: str, interpret: bool) -> None:
    """``RuntimeError`` unless Mosaic GPU can run here: an NVIDIA GPU, or ``interpret=True``.

    Compiled Mosaic GPU kernels need a Hopper (sm_90) or newer NVIDIA GPU; everywhere else only
    Mosaic GPU's interpret mode (a CPU simulation of TMA, barriers and wgmma) can run them.
    """
    plgpu()
    if interpret:
        return
    if jax.default_backend() != "gpu":
        raise RuntimeError(
            f"mLSTM kernel {kernel_name!r} is a Mosaic GPU kernel: it needs an NVIDIA Hopper GPU "
            f"(default backend here: {jax.default_backend()!r}, JAX {jax.__version__}); use "
            f"'chunkwise_pallas' or 'chunkwise_native' on this machine, or interpret=True to "
            f"simulate the kernel on CPU (slow, tiny shapes only)"
        )


def unavailable_reason(interpret: bool) -> str | None:
    """None if the Mosaic GPU kernels can run here, else why not (for a family choice that falls
    back to Triton): Mosaic GPU's API missing or too old, or, unless ``interpret``, no NVIDIA GPU of
    compute capability 9.0 (Hopper) or newer as the default device."""
    try:
        plgpu()
    except RuntimeError as err:  # the reason is the answer (plgpu's message names what is missing)
        return str(err)
    if interpret:
        return None
    if jax.default_backend() != "gpu":
        return f"no GPU (default backend {jax.default_backend()!r})"
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return f"{dev.device_kind}: compute capability {cc!r} unknown (Mosaic GPU needs 9.0, Hopper)"
    if major < 9:
        return f"{dev.device_kind}: compute capability {cc} < 9.0 (Mosaic GPU needs Hopper or newer)"
    return None


def named_body(body, name: str):
    """``body`` (a ``functools.partial`` of a kernel function) with ``__name__`` set to ``name``:
    Mosaic GPU names the compiled kernel after its body's ``__name__`` (``anonymous`` for a
    partial), which is the name a profile shows, so that each kernel's time can be told apart."""
    body.__name__ = name
    return body


def interpret_params(interpret: bool):
    """The ``interpret`` argument of ``plgpu.kernel``: GPU interpret mode on CPU, else False."""
    if not interpret:
        return False
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


@functools.lru_cache(maxsize=None)
def _load_takes_index() -> bool:
    p = inspect.signature(plgpu().load).parameters["idx"]
    return p.default is inspect.Parameter.empty


def load(ref, layout, *, interpret: bool):
    """Load all of ``ref`` into registers with ``layout`` (plain ``ref[...]`` in interpret mode)."""
    if interpret:
        return ref[...]
    if _load_takes_index():
        return plgpu().load(ref, (), layout=layout)
    return plgpu().load(ref, layout=layout)


def layout_cast(x, layout, *, interpret: bool):
    """``plgpu.layout_cast`` when compiling; the identity in interpret mode."""
    return x if interpret else plgpu().layout_cast(x, layout)


def iota(shape, dimension: int, layout, *, interpret: bool):
    """An int32 iota along ``dimension`` in ``layout`` (no layout in interpret mode)."""
    if interpret:
        return jax.lax.broadcasted_iota(jax.numpy.int32, shape, dimension)
    return plgpu().broadcasted_iota(jax.numpy.int32, shape, dimension, layout=layout)


def dot_nn(a_ref, b_ref):
    """a @ b (float32 registers) of two shared-memory tiles (M, K), (K, N): one awaited wgmma
    (the interpreter runs this form as it is)."""
    mod = plgpu()

    def body(acc_ref):
        mod.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, mod.ACC((a_ref.shape[0], b_ref.shape[1]), jax.numpy.float32))


def dot_nt(a_ref, b_ref, *, interpret: bool):
    """a @ b^T (float32 registers) of two shared-memory tiles (M, K), (N, K): one awaited wgmma
    with b transposed in shared memory; in interpret mode (whose wgmma takes no transposed
    operand) a ``dot_general`` of the loaded tiles."""
    f32 = jax.numpy.float32
    if interpret:
        return jax.lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=f32)
    mod = plgpu()

    def body(acc_ref):
        mod.wgmma(acc_ref, a_ref, mod.transpose_ref(b_ref, (1, 0)))
        return acc_ref[...]

    return pl.run_scoped(body, mod.ACC((a_ref.shape[0], b_ref.shape[0]), f32))


def dot_acc(acc, a, b_ref, *, interpret: bool):
    """acc + a @ b: ``a`` in registers (16-bit), ``b`` a shared-memory tile, ``acc`` float32. The
    wgmma is awaited (``pl.run_state``), so b's buffer may be refilled right after; in interpret
    mode (whose wgmma takes no register operand) a ``jnp.dot``."""
    if interpret:
        return acc + jax.numpy.dot(a, b_ref[...], preferred_element_type=jax.numpy.float32)
    mod = plgpu()

    def body(acc_ref):
        mod.wgmma(acc_ref, a, b_ref)

    return pl.run_state(body)(mod.ACC.init(acc))


def dot_acc_smem(acc, a_ref, b_ref, *, transpose_a: bool = False, interpret: bool):
    """acc + a @ b, or acc + a^T @ b with ``transpose_a``, of two shared-memory tiles (16-bit;
    ``acc`` float32): one awaited wgmma (a transposed in shared memory when asked); in interpret
    mode a ``jnp.dot`` of the loaded tiles."""
    f32 = jax.numpy.float32
    if interpret:
        a = a_ref[...]
        return acc + jax.numpy.dot(a.T if transpose_a else a, b_ref[...], preferred_element_type=f32)
    mod = plgpu()
    a = mod.transpose_ref(a_ref, (1, 0)) if transpose_a else a_ref

    def body(acc_ref):
        mod.wgmma(acc_ref, a, b_ref)

    return pl.run_state(body)(mod.ACC.init(acc))
