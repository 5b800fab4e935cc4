"""The validation layer every mLSTM kernel, step kernel and seed entry point goes through.

Notation: see ``xlstm_jax.kernels._common``. One function per kind of call:

    validate_sequence_call   q, k, v, i, f, the initial states and ``segment_ids`` of a sequence
                             kernel, plus its cell options (``options.resolve_cell_options``):
                             shapes, dtypes; it also applies the two transformations every kernel
                             shares (packed documents, the sigmoid input gate; below)
    validate_step_call       the state and inputs of one step (decode) and its cell options
    sigmoid_step_inputs      the step's (C, n, m, i) for the sigmoid cell (below)
    floating_dtype           an ``output_dtype`` / ``state_dtype`` / ``autocast_kernel_dtype`` option
    check_shape              one array argument of a seed stage function against the others

and the shared conventions:

* every array argument must have a floating dtype (``ValueError`` naming the argument and dtype);
* a batch or head count of zero (B == 0 or NH == 0) is valid everywhere: the outputs are empty
  arrays of the right shapes and dtypes (``empty_sequence_outputs``), and so are the gradients; an
  empty sequence (S == 0) or head dimension (DHQK or DHV == 0) is an error;
* shapes that do not fit raise ``ValueError`` naming the argument and both shapes; never ``assert``.

Packed documents (``segment_ids``, (B, S) integers). A document starts at every t > 0 with
``segment_ids[b, t] != segment_ids[b, t-1]``; there the forget gate is set to exactly 0
(``f := -inf`` through ``jnp.where``, so the gradient of the given f there is 0). Every kernel is
exact for f = -inf (docs/design.md, "Extreme gates and resets"): the state before t is dropped and
m_t = i_t, which is each document run on its own in the parallel form (whose first step's forget
gate has no effect). The first document of a row starts from the initial states (or the kernel's
zero state); the last states are those of each row's last document. Ids need not be consecutive.

The sigmoid input gate (``input_gate="sigmoid"``, mLSTMsig). The sigmoid cell is the exponential
cell with ``i := log_sigmoid(i)`` (computed here, in float32 or wider) and the max state held at
m = 0; every log weight is then <= 0, so nothing overflows, and the lower bound is norm_val. Each
kernel holds m at 0 under the static flag ``CellOptions.max_state``. Given initial states (C, n, m)
are taken in the stabilized convention of the exponential cell and folded to m = 0:
``C := exp(m) C``, ``n := exp(m) n`` (states returned by a sigmoid kernel have m = 0 already).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._common import MLSTMState
from .options import CellOptions, resolve_cell_options


def shape_str(x) -> str:
    """The shape of ``x`` as text ("None" for None)."""
    if x is None:
        return "None"
    return str(tuple(x.shape)) if hasattr(x, "shape") else repr(x)


def check_floating(name: str, x, *, kernel: str = "mLSTM kernel") -> None:
    """``ValueError`` unless ``x`` is an array with a floating-point dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{kernel}: {name} must be a floating-point array; got dtype {dtype} (shape {shape_str(x)})"
        )


def floating_dtype(name: str, value, *, allow_none: bool = True):
    """A dtype option (a dtype, its name or a scalar type) as a floating ``jnp.dtype``.

    ``None`` stays None if ``allow_none``; an integer, bool or unknown dtype raises ``ValueError``.
    """
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a floating dtype; got None")
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name} must name a floating dtype; got {value!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype (e.g. float32, bfloat16); got {dt.name}")
    return dt


def squeeze_gate(name: str, gate: jax.Array, expected: tuple[int, ...]) -> jax.Array:
    """Accept a gate of shape ``expected`` or ``expected + (1,)``; return it as ``expected``."""
    shape = tuple(getattr(gate, "shape", ()))
    if shape == tuple(expected):
        return gate
    if shape == tuple(expected) + (1,):
        return gate[..., 0]
    raise ValueError(
        f"gate {name} has shape {shape_str(gate)}; expected {tuple(expected)} or {tuple(expected) + (1,)}"
    )


def check_shape(kernel: str, name: str, x, expected: tuple[int, ...], because: str) -> None:
    """``ValueError`` unless ``x.shape == expected``; ``because`` names the argument(s) it follows from,
    e.g. ``"from matV (1, 2, 64, 16)"``."""
    if x is None or tuple(getattr(x, "shape", ())) != tuple(expected):
        raise ValueError(f"{kernel}: {name} has shape {shape_str(x)}; expected {tuple(expected)} {because}")


def check_segment_ids(kernel: str, segment_ids, B: int, S: int) -> None:
    """``ValueError`` unless ``segment_ids`` is an integer array of shape (B, S)."""
    shape = tuple(getattr(segment_ids, "shape", ()))
    dtype = getattr(segment_ids, "dtype", None)
    if shape != (B, S):
        raise ValueError(
            f"{kernel}: segment_ids has shape {shape_str(segment_ids)}; expected (B, S) = {(B, S)} from q"
        )
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{kernel}: segment_ids must be an integer array; got dtype {dtype} (shape {shape})")


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """(B, S) bool: t > 0 with ``segment_ids[:, t] != segment_ids[:, t-1]`` (a document starts at t)."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), changed], axis=1)


def apply_segments(vecF: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """vecF (B, NH, S) with f = -inf (a forget gate of 0) wherever a document starts."""
    starts = document_starts(segment_ids)[:, None, :]
    return jnp.where(starts, jnp.array(-jnp.inf, vecF.dtype), vecF)


def sigmoid_input_gate(vecI: jax.Array) -> jax.Array:
    """``log_sigmoid(i)`` in float32 or wider: the sigmoid cell's input gate as a log weight."""
    return jax.nn.log_sigmoid(vecI.astype(jnp.promote_types(vecI.dtype, jnp.float32)))


def fold_max_state(matC, vecN, scaM):
    """States (C, n, m) as the same states with m = 0: (exp(m) C, exp(m) n, 0) (differentiable)."""
    w = jnp.exp(scaM)
    return MLSTMState(matC * w[..., None, None].astype(matC.dtype), vecN * w[..., None].astype(vecN.dtype),
                      jnp.zeros_like(scaM))


class SequenceCall(NamedTuple):
    """A validated sequence call: gates as (B, NH, S), the initial state (or None), dims, options.

    ``vecF`` holds -inf at document starts (``segment_ids``); for ``input_gate="sigmoid"`` ``vecI``
    is ``log_sigmoid(i)`` and the state is folded to m = 0 (module docstring).
    """

    vecI: jax.Array  # (B, NH, S)
    vecF: jax.Array  # (B, NH, S)
    state: MLSTMState | None
    B: int
    NH: int
    S: int
    DHQK: int
    DHV: int
    options: CellOptions

    @property
    def empty(self) -> bool:
        """B == 0 or NH == 0: every output is an empty array."""
        return self.B * self.NH == 0

    @property
    def qk_scale(self) -> float:
        """The effective query scale."""
        return self.options.effective_qk_scale(self.DHQK)

    @property
    def max_state(self) -> bool:
        """False for the sigmoid cell: the kernel holds m = 0 (and dm = 0)."""
        return self.options.max_state


def validate_sequence_call(
    kernel: str,
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    vecF: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
    *,
    segment_ids: jax.Array | None = None,  # (B, S) integers
    cell_options: CellOptions | None = None,
    **flat_options: Any,
) -> SequenceCall:
    """Validate a sequence call (shapes, dtypes, cell options); ``ValueError`` naming the culprit.

    ``flat_options`` are the flat cell-option keywords (qk_scale, eps, norm_val,
    stabilize_correctly, grad_mode, input_gate); see ``options.resolve_cell_options``. Initial
    states are all given or all None. ``segment_ids`` (B, S) integers mark packed documents; the
    returned call has them applied to f, and the sigmoid input gate applied (module docstring).
    """
    options = resolve_cell_options(cell_options, kernel=kernel, **flat_options)
    shapes = (
        f"q {shape_str(matQ)}, k {shape_str(matK)}, v {shape_str(matV)}, i {shape_str(vecI)}, "
        f"f {shape_str(vecF)}"
    )
    for name, x in (("q", matQ), ("k", matK), ("v", matV)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 (B, NH, S, D); got {shapes}")
    B, NH, S, DHQK = matQ.shape
    if matK.shape != matQ.shape:
        raise ValueError(f"k must have the shape of q (B, NH, S, DHQK); got {shapes}")
    if matV.shape[:3] != (B, NH, S):
        raise ValueError(f"v must have shape (B, NH, S, DHV) with B, NH, S of q; got {shapes}")
    DHV = matV.shape[3]
    if S < 1 or DHQK < 1 or DHV < 1:
        raise ValueError(f"empty sequence or head dimension (S, DHQK, DHV must be >= 1); got {shapes}")
    vecI = squeeze_gate("i", vecI, (B, NH, S))
    vecF = squeeze_gate("f", vecF, (B, NH, S))
    for name, x in (("q", matQ), ("k", matK), ("v", matV), ("i", vecI), ("f", vecF)):
        check_floating(name, x, kernel=kernel)
    given = [x is not None for x in (matC_initial, vecN_initial, scaM_initial)]
    if any(given) and not all(given):
        raise ValueError(
            "give all three initial states or none: c_initial "
            f"{shape_str(matC_initial)}, n_initial {shape_str(vecN_initial)}, m_initial {shape_str(scaM_initial)}"
        )
    state = None
    if all(given):
        want = {"c_initial": (B, NH, DHQK, DHV), "n_initial": (B, NH, DHQK), "m_initial": (B, NH)}
        got = {"c_initial": matC_initial, "n_initial": vecN_initial, "m_initial": scaM_initial}
        for name, shape in want.items():
            if tuple(getattr(got[name], "shape", ())) != shape:
                raise ValueError(f"{name} has shape {shape_str(got[name])}; expected {shape} for {shapes}")
            check_floating(name, got[name], kernel=kernel)
        state = MLSTMState(matC_initial, vecN_initial, scaM_initial)
    if segment_ids is not None:
        check_segment_ids(kernel, segment_ids, B, S)
        vecF = apply_segments(vecF, segment_ids)
    if not options.max_state:
        vecI = sigmoid_input_gate(vecI)
        if state is not None:
            state = fold_max_state(*state)
    return SequenceCall(vecI, vecF, state, B, NH, S, DHQK, DHV, options)


def empty_sequence_outputs(
    call: SequenceCall, *, h_dtype, state_dtype, return_last_states: bool, return_normalizer: bool = False
):
    """The outputs of a call with B == 0 or NH == 0, all empty: h (B, NH, S, DHV), then (if asked)
    the normalizer pair (vecN, vecM) (B, NH, S) each, then the last ``MLSTMState`` (B, NH, DHQK, DHV),
    (B, NH, DHQK), (B, NH); a single h when nothing else is asked for."""
    B, NH, S, DHQK, DHV = call.B, call.NH, call.S, call.DHQK, call.DHV
    out = [jnp.zeros((B, NH, S, DHV), h_dtype)]
    if return_normalizer:
        out.append((jnp.zeros((B, NH, S), state_dtype), jnp.zeros((B, NH, S), state_dtype)))
    if return_last_states:
        out.append(MLSTMState(
            jnp.zeros((B, NH, DHQK, DHV), state_dtype),
            jnp.zeros((B, NH, DHQK), state_dtype),
            jnp.zeros((B, NH), state_dtype),
        ))
    return out[0] if len(out) == 1 else tuple(out)


class StepCall(NamedTuple):
    """A validated step call: dims and options."""

    B: int
    NH: int
    DHQK: int
    DHV: int
    options: CellOptions

    @property
    def empty(self) -> bool:
        """B == 0 or NH == 0."""
        return self.B * self.NH == 0


def validate_step_call(
    kernel: str,
    matC: jax.Array,  # (B, NH, DHQK, DHV)
    vecN: jax.Array,  # (B, NH, DHQK)
    scaM: jax.Array,  # (B, NH)
    vecQ: jax.Array,  # (B, NH, DHQK)
    vecK: jax.Array,  # (B, NH, DHQK)
    vecV: jax.Array,  # (B, NH, DHV)
    scaI: jax.Array,  # (B, NH)
    scaF: jax.Array,  # (B, NH)
    *,
    cell_options: CellOptions | None = None,
    **flat_options: Any,
) -> StepCall:
    """Validate one step (shapes, floating dtypes, cell options); ``ValueError`` naming the culprit."""
    options = resolve_cell_options(cell_options, kernel=kernel, **flat_options)
    shapes = (
        f"C {shape_str(matC)}, n {shape_str(vecN)}, m {shape_str(scaM)}, q {shape_str(vecQ)}, "
        f"k {shape_str(vecK)}, v {shape_str(vecV)}, i {shape_str(scaI)}, f {shape_str(scaF)}"
    )
    if getattr(vecQ, "ndim", None) != 3 or getattr(vecV, "ndim", None) != 3:
        raise ValueError(f"{kernel}: q must have shape (B, NH, DHQK) and v (B, NH, DHV); got {shapes}")
    B, NH, DHQK = vecQ.shape
    DHV = vecV.shape[2]
    want = {
        "C": (matC, (B, NH, DHQK, DHV)), "n": (vecN, (B, NH, DHQK)), "m": (scaM, (B, NH)),
        "k": (vecK, (B, NH, DHQK)), "v": (vecV, (B, NH, DHV)), "i": (scaI, (B, NH)), "f": (scaF, (B, NH)),
    }
    bad = [f"{name} {shape_str(x)} (expected {shape})" for name, (x, shape) in want.items()
           if tuple(getattr(x, "shape", ())) != shape]
    if bad:
        raise ValueError(f"{kernel}: mLSTM step shape mismatch: {', '.join(bad)}; got {shapes}")
    if DHQK < 1 or DHV < 1:
        raise ValueError(f"{kernel}: empty head dimension (DHQK, DHV must be >= 1); got {shapes}")
    for name, x in (("C", matC), ("n", vecN), ("m", scaM), ("q", vecQ), ("k", vecK), ("v", vecV),
                    ("i", scaI), ("f", scaF)):
        check_floating(name, x, kernel=kernel)
    return StepCall(B, NH, DHQK, DHV, options)


def sigmoid_step_inputs(matC, vecN, scaM, scaI):
    """For the sigmoid cell: (C, n, m, i) as (exp(m) C, exp(m) n, 0, log_sigmoid(i)); the step then
    runs the exponential step with m held at 0 (``CellOptions.max_state`` False)."""
    state = fold_max_state(matC, vecN, scaM)
    return state.matC, state.vecN, state.scaM, sigmoid_input_gate(scaI)


def empty_step_outputs(matC, vecN, scaM, vecV, h_dtype):
    """The outputs of a step with B == 0 or NH == 0: h (B, NH, DHV) and the (empty) state."""
    return jnp.zeros(vecV.shape, h_dtype), MLSTMState(matC, vecN, scaM)
