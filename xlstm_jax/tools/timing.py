"""The one timer of the benchmarks (``xlstm-jax bench``, ``xlstm-jax bench-decode``) and the device
ceilings they compare with.

``time_calls(fn, arg_sets, reps=..., warmup=...)``: ``fn`` is called ``warmup`` times untimed (after
the first call, which compiles), then ``reps`` timed repetitions of ``calls_per_rep`` back-to-back
calls each, every call on the next argument set (round robin over ``arg_sets``, so that no two
consecutive calls see the same inputs), with ``jax.block_until_ready`` on the last result of each
repetition. Returns the median and the minimum seconds per call.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the minimum over the timed repetitions, and all samples."""

    median_s: float
    min_s: float
    samples_s: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        """The median in milliseconds."""
        return 1e3 * self.median_s


def time_calls(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple],
    *,
    reps: int,
    warmup: int = 3,
    calls_per_rep: int = 1,
) -> Timing:
    """Time ``fn(*args)`` with ``args`` rotated over ``arg_sets``; see the module docstring.

    ``reps`` >= 1 and ``calls_per_rep`` >= 1; ``warmup`` >= 0 calls after the compiling call.
    """
    import jax

    if reps < 1 or calls_per_rep < 1 or warmup < 0:
        raise ValueError(f"reps and calls_per_rep must be >= 1 and warmup >= 0; got {reps}, {calls_per_rep}, {warmup}")
    if not arg_sets:
        raise ValueError("arg_sets must hold at least one tuple of arguments")
    n = len(arg_sets)
    j = 0
    for _ in range(1 + warmup):  # the first call compiles
        jax.block_until_ready(fn(*arg_sets[j % n]))
        j += 1
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls_per_rep):
            out = fn(*arg_sets[j % n])
            j += 1
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls_per_rep)
    return Timing(statistics.median(samples), min(samples), tuple(samples))


def copy_bandwidths(reps: int = 7, nbytes: int = 1 << 31, calls: int = 10) -> dict[str, float]:
    """Bytes per second (read + write counted) of three ways to stream float32 data on the default
    device, each over two buffers of ``nbytes / 2`` used in turn (both far larger than any cache).

    ``copy``: ``jnp.copy`` into a new buffer (device-to-device copy); ``add_out``: ``x + 1`` into a new
    buffer; ``add_inplace``: ``x + 1`` with x donated (read and write the same buffer, the access
    pattern of an in-place state update). ``calls`` back-to-back calls per timed repetition.
    """
    import jax
    import jax.numpy as jnp

    size = max(1, nbytes // 8)  # float32 elements per buffer (two buffers)
    buffers = [jax.random.normal(jax.random.PRNGKey(s), (size,), jnp.float32) for s in (0, 1)]
    per_call = 2 * 4 * size  # bytes read + written by one call
    out = {}
    for name, f, donate in (
        ("copy", lambda x: jnp.copy(x), False),
        ("add_out", lambda x: x + 1.0, False),
        ("add_inplace", lambda x: x + 1.0, True),
    ):
        if donate:
            jf = jax.jit(f, donate_argnums=0)
            box = [b + 0.0 for b in buffers]

            def call(idx, jf=jf, box=box):
                box[idx] = jf(box[idx])
                return box[idx]
        else:
            jf = jax.jit(f)

            def call(idx, jf=jf):
                return jf(buffers[idx])

        t = time_calls(call, [(0,), (1,)], reps=reps, warmup=2, calls_per_rep=calls)
        out[name] = per_call / t.median_s
        del call
    return out


def matmul_tflops(reps: int = 10, n: int = 8192) -> float:
    """bf16 matrix-product TFLOP/s of ``n x n @ n x n`` on the default device (two input pairs)."""
    import jax
    import jax.numpy as jnp

    pairs = [
        tuple(jax.random.normal(jax.random.PRNGKey(2 * s + t), (n, n), jnp.bfloat16) for t in (0, 1))
        for s in (0, 1)
    ]
    t = time_calls(jax.jit(lambda a, b: a @ b), pairs, reps=reps, warmup=3)
    return 2 * n**3 / t.median_s / 1e12
