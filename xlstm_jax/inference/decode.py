"""Prefill a prompt with a sequence kernel, then decode step by step from its last states.

Notation: see ``xlstm_jax.kernels._common``; additionally T is the number of decoded steps and
``L`` the number of layers of a stack. Everything here is a function over arrays and state tuples
(``MLSTMState(matC, vecN, scaM)`` per layer, a tuple of them per stack), so it composes with ``jax.jit``
and ``jax.lax.scan``; nothing holds hidden state.

One layer:

    h, state = prefill(q, k, v, i, f)                        # q (B, NH, S, DHQK) ... -> last states
    h_t, state = decode_step(state, q_t, k_t, v_t, i_t, f_t)  # q_t (B, NH, DHQK), i_t (B, NH)
    h_T, state = decode_sequence(state, q, k, v, i, f)       # T given steps in one lax.scan

A stack of layers: each layer is a pair of callables ``(in_fn, out_fn)``: ``in_fn(x)`` maps the layer
input to ``(q, k, v, i, f)`` with a sequence axis (shapes (B, NH, S, DHQK), (B, NH, S, DHV),
(B, NH, S)), ``out_fn(x, h)`` maps the input and the cell output h (B, NH, S, DHV) to the next layer's
input. The same pair serves prefill (S = prompt length) and decoding (S = 1):

    y, states = stack_prefill(layers, x_prompt)
    y_t, states = stack_decode_step(layers, x_t, states)     # x_t with S = 1
    carry, ys = decode_loop(step_fn, carry, num_steps)       # autoregressive loop, one lax.scan

Prefill uses a registered sequence kernel (``default_prefill_kernel()``: ``chunkwise_pallas`` on an
NVIDIA GPU when it is registered, else ``chunkwise_native``), decoding a registered step kernel
(``recurrent_native`` by default, or ``recurrent_pallas``). Both compute the same cell
(``xlstm_jax.kernels.CellOptions``), so prefill + decode equals the sequence kernel over the whole sequence up to
float rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from xlstm_jax.kernels import (
    CellOptions,
    MLSTMState,
    available_mlstm_kernels,
    get_mlstm_kernel,
    get_mlstm_step_kernel,
    squeeze_gate,
)

StackState = tuple[MLSTMState, ...]
"""The states of a stack of mLSTM layers: one ``MLSTMState`` per layer."""

Layer = tuple[Callable[[Any], tuple], Callable[[Any, jax.Array], Any]]
"""``(in_fn, out_fn)`` of one layer of a stack; see the module docstring."""


def default_prefill_kernel() -> str:
    """``chunkwise_pallas`` on an NVIDIA GPU when that kernel is registered, else ``chunkwise_native``."""
    if jax.default_backend() == "gpu" and "chunkwise_pallas" in available_mlstm_kernels():
        return "chunkwise_pallas"
    return "chunkwise_native"


def init_state(B: int, NH: int, DHQK: int, DHV: int, *, dtype=jnp.float32) -> MLSTMState:
    """Zero states (C0 = 0, n0 = 0, m0 = 0) for a batch of B sequences."""
    dtype = jnp.dtype(dtype)
    return MLSTMState(
        jnp.zeros((B, NH, DHQK, DHV), dtype), jnp.zeros((B, NH, DHQK), dtype), jnp.zeros((B, NH), dtype)
    )


def init_stack_state(num_layers: int, B: int, NH: int, DHQK: int, DHV: int, *, dtype=jnp.float32) -> StackState:
    """Zero states for each of ``num_layers`` layers (all with the same head shape)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; got {num_layers!r}")
    return tuple(init_state(B, NH, DHQK, DHV, dtype=dtype) for _ in range(num_layers))


def cast_state(state: MLSTMState, dtype) -> MLSTMState:
    """The state with all three arrays in ``dtype`` (e.g. bfloat16 states for decoding)."""
    return MLSTMState(*(x.astype(dtype) for x in state))


def prefill(
    q: jax.Array,  # (B, NH, S, DHQK)
    k: jax.Array,  # (B, NH, S, DHQK)
    v: jax.Array,  # (B, NH, S, DHV)
    i: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    f: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    state: MLSTMState | None = None,
    *,
    kernel: str | None = None,
    kernel_options: dict[str, Any] | None = None,
    options: CellOptions = CellOptions(),
    state_dtype=None,
) -> tuple[jax.Array, MLSTMState]:
    """Run one layer's cell over a prompt with a registered sequence kernel; return h and last states.

    ``state`` (optional) continues from earlier states. ``kernel`` names a registered sequence kernel
    (None: ``default_prefill_kernel()``), ``kernel_options`` its options (e.g. ``chunk_size``).
    Returns h (B, NH, S, DHV) in the dtype of q and the last ``MLSTMState`` in ``state_dtype`` (None:
    as the kernel returns them, float32 for float32/bfloat16 inputs).
    """
    name = default_prefill_kernel() if kernel is None else kernel
    fn = get_mlstm_kernel(name, **(kernel_options or {}))
    c0, n0, m0 = (None, None, None) if state is None else state
    h, last = fn(q, k, v, i, f, c0, n0, m0, return_last_states=True, cell_options=options)
    last = MLSTMState(*last)
    if state_dtype is not None:
        last = cast_state(last, state_dtype)
    return h, last


def decode_step(
    state: MLSTMState,
    q: jax.Array,  # (B, NH, DHQK)
    k: jax.Array,  # (B, NH, DHQK)
    v: jax.Array,  # (B, NH, DHV)
    i: jax.Array,  # (B, NH) or (B, NH, 1)
    f: jax.Array,  # (B, NH) or (B, NH, 1)
    *,
    step_kernel: str = "recurrent_native",
    step_options: dict[str, Any] | None = None,
    options: CellOptions = CellOptions(),
) -> tuple[jax.Array, MLSTMState]:
    """One decoding step of one layer with a registered step kernel.

    Returns h (B, NH, DHV) in the dtype of q and the new state (in the state's dtypes). With the
    ``recurrent_pallas`` kernel, C is updated in place inside a jitted loop.
    """
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"decode_step: q must have shape (B, NH, DHQK); got {tuple(getattr(q, 'shape', ()))}")
    BH = tuple(q.shape[:2])
    i, f = squeeze_gate("i", i, BH), squeeze_gate("f", f, BH)
    fn = get_mlstm_step_kernel(step_kernel, **(step_options or {}))
    h, new = fn(*state, q, k, v, i, f, cell_options=options)
    return h.astype(q.dtype), MLSTMState(*new)


def decode_sequence(
    state: MLSTMState,
    q: jax.Array,  # (B, NH, T, DHQK)
    k: jax.Array,  # (B, NH, T, DHQK)
    v: jax.Array,  # (B, NH, T, DHV)
    i: jax.Array,  # (B, NH, T) or (B, NH, T, 1)
    f: jax.Array,  # (B, NH, T) or (B, NH, T, 1)
    *,
    step_kernel: str = "recurrent_native",
    step_options: dict[str, Any] | None = None,
    options: CellOptions = CellOptions(),
    unroll: int = 1,
) -> tuple[jax.Array, MLSTMState]:
    """``decode_step`` over T given steps (teacher forcing) in one ``lax.scan``.

    ``unroll`` steps run per loop iteration (``lax.scan``'s option: fewer loop-control launches;
    at B=1 on an H200, unroll=8 cut the Pallas step in the loop from 16 to 6 us, docs/benchmarks.md).
    Returns h (B, NH, T, DHV) in the dtype of q and the state after the last step.
    """
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"decode_sequence: q must have shape (B, NH, T, DHQK); got {tuple(getattr(q, 'shape', ()))}")
    BHT = tuple(q.shape[:3])
    i, f = squeeze_gate("i", i, BHT), squeeze_gate("f", f, BHT)

    def body(carry, x):
        h, new = decode_step(
            MLSTMState(*carry), *x, step_kernel=step_kernel, step_options=step_options, options=options
        )
        return tuple(new), h

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f))
    last, hs = jax.lax.scan(body, tuple(state), xs, unroll=unroll)
    return jnp.moveaxis(hs, 0, 2), MLSTMState(*last)


def _check_stack(layers: Sequence[Layer], states: StackState | None) -> None:
    if len(layers) < 1:
        raise ValueError("a stack needs at least one layer")
    if states is not None and len(states) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(states)} states")


def stack_prefill(
    layers: Sequence[Layer],
    x: Any,
    states: StackState | None = None,
    *,
    kernel: str | None = None,
    kernel_options: dict[str, Any] | None = None,
    options: CellOptions = CellOptions(),
    state_dtype=None,
) -> tuple[Any, StackState]:
    """Prefill a stack: layer by layer, ``prefill`` on ``in_fn(x)``, then ``x = out_fn(x, h)``.

    Returns the last layer's output and the stack's last states.
    """
    _check_stack(layers, states)
    new_states = []
    for idx, (in_fn, out_fn) in enumerate(layers):
        q, k, v, i, f = in_fn(x)
        h, st = prefill(
            q, k, v, i, f, None if states is None else states[idx],
            kernel=kernel, kernel_options=kernel_options, options=options, state_dtype=state_dtype,
        )
        new_states.append(st)
        x = out_fn(x, h)
    return x, tuple(new_states)


def stack_decode_step(
    layers: Sequence[Layer],
    x: Any,
    states: StackState,
    *,
    step_kernel: str = "recurrent_native",
    step_options: dict[str, Any] | None = None,
    options: CellOptions = CellOptions(),
) -> tuple[Any, StackState]:
    """One decoding step of a stack: ``in_fn(x)`` must give a sequence axis of length 1.

    Returns the last layer's output (sequence axis of length 1) and the new states.
    """
    _check_stack(layers, states)
    new_states = []
    for (in_fn, out_fn), st in zip(layers, states):
        q, k, v, i, f = in_fn(x)
        if getattr(q, "ndim", None) != 4 or q.shape[2] != 1:
            raise ValueError(
                f"stack_decode_step: in_fn must give q of shape (B, NH, 1, DHQK); got {tuple(getattr(q, 'shape', ()))}"
            )
        BH1 = tuple(q.shape[:3])
        i, f = squeeze_gate("i", i, BH1), squeeze_gate("f", f, BH1)
        h, st = decode_step(
            st, q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0],
            step_kernel=step_kernel, step_options=step_options, options=options,
        )
        new_states.append(st)
        x = out_fn(x, h[:, :, None])
    return x, tuple(new_states)


def decode_loop(
    step_fn: Callable[[Any], tuple[Any, Any]], carry: Any, num_steps: int, *, unroll: int = 1
) -> tuple[Any, Any]:
    """Autoregressive loop: ``carry, y = step_fn(carry)`` ``num_steps`` times in one ``lax.scan``.

    The carry holds what the next step needs (e.g. the stack's states, the last token, an RNG key).
    Returns the final carry and the stacked outputs (leading axis ``num_steps``). jit-compatible
    (``num_steps`` must be static); ``unroll`` steps run per loop iteration.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int; got {num_steps!r}")
    return jax.lax.scan(lambda c, _: step_fn(c), carry, None, length=num_steps, unroll=unroll)
