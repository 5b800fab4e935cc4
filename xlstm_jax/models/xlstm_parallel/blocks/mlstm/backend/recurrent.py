"""Recurrent mLSTM backend (seed 004): a single step, a whole sequence, and the backend module.

Thin over the registry kernels ``recurrent_native`` (sequence and step kernel). Shapes of one step:
c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH, 1), q, k (B, NH, DHQK), v (B, NH, DHV), i, f
(B, NH, 1). The query scale is DHQK ** -0.5 and the normalizer is ``max(|q . n|, exp(-m)) + eps``
(docs/design.md, section 1). ``seed_step_fn`` adapts any registered step kernel to this step
signature (the ``recurrent_triton`` backend uses it with ``recurrent_pallas``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xlstm_jax.kernels import (
    CellOptions,
    MLSTMState,
    floating_dtype,
    get_mlstm_kernel,
    get_mlstm_step_kernel,
    validate_sequence_call,
)

from .config import mLSTMBackend, mLSTMBackendConfig


def _check_step_shapes(c, n, m, q, k, v, i, f) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must have shape (B, NH, DHQK); got {tuple(q.shape)}")
    B, NH, DHQK = q.shape
    DHV = v.shape[-1] if v.ndim == 3 else -1
    want = {
        "c": (B, NH, DHQK, DHV), "n": (B, NH, DHQK), "m": (B, NH, 1),
        "k": (B, NH, DHQK), "v": (B, NH, DHV), "i": (B, NH, 1), "f": (B, NH, 1),
    }
    got = {"c": c, "n": n, "m": m, "k": k, "v": v, "i": i, "f": f}
    bad = [f"{name} {tuple(got[name].shape)} (expected {shape})" for name, shape in want.items()
           if tuple(got[name].shape) != shape]
    if bad or v.ndim != 3:
        given = ", ".join(f"{name} {tuple(x.shape)}" for name, x in got.items())
        raise ValueError(
            f"recurrent_step_fw shape mismatch: {'; '.join(bad) or 'v must be (B, NH, DHV)'} "
            f"(given q {tuple(q.shape)}, {given})"
        )


def _seed_step(step_kernel: Callable, c, n, m, q, k, v, i, f, eps: float = 1e-6, input_gate: str = "exp"):
    """A registered step kernel (m, i, f of shape (B, NH)) in the seed-004 step signature."""
    _check_step_shapes(c, n, m, q, k, v, i, f)
    h, (c_new, n_new, m_new) = step_kernel(
        c, n, m[..., 0], q, k, v, i[..., 0], f[..., 0], eps=eps, input_gate=input_gate
    )
    return h, (c_new, n_new, m_new[..., None])


def seed_step_fn(name: str, **options: Any) -> Callable:
    """The registered step kernel ``name`` (with its ``options``) as a ``recurrent_step_fw``-style
    step: ``step(c, n, m, q, k, v, i, f, eps=1e-6, input_gate="exp")`` with m, i, f of shape (B, NH, 1)."""
    return functools.partial(_seed_step, get_mlstm_step_kernel(name, **options))


def recurrent_step_fw(
    c: jax.Array,  # (B, NH, DHQK, DHV)
    n: jax.Array,  # (B, NH, DHQK)
    m: jax.Array,  # (B, NH, 1)
    q: jax.Array,  # (B, NH, DHQK)
    k: jax.Array,  # (B, NH, DHQK)
    v: jax.Array,  # (B, NH, DHV)
    i: jax.Array,  # (B, NH, 1)
    f: jax.Array,  # (B, NH, 1)
    eps: float = 1e-6,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """One step of the mLSTM in recurrent form.

    Returns the hidden state h (B, NH, DHV) and the new states (c, n, m) with m of shape (B, NH, 1),
    in the dtype of the states.
    """
    return _seed_step(get_mlstm_step_kernel("recurrent_native"), c, n, m, q, k, v, i, f, eps=eps)


def recurrent_sequence_fw(
    queries: jax.Array,  # (B, NH, S, DHQK)
    keys: jax.Array,  # (B, NH, S, DHQK)
    values: jax.Array,  # (B, NH, S, DHV)
    igate_preact: jax.Array,  # (B, NH, S, 1) or (B, NH, S)
    fgate_preact: jax.Array,  # (B, NH, S, 1) or (B, NH, S)
    c_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    n_initial: jax.Array | None = None,  # (B, NH, DHQK)
    m_initial: jax.Array | None = None,  # (B, NH)
    return_last_states: bool = False,
    eps: float = 1e-6,
    state_dtype: str | jnp.dtype | None = None,
    use_scan: bool = False,
    mlstm_step_fn: Callable = recurrent_step_fw,
    segment_ids: jax.Array | None = None,  # (B, S) integers: packed documents
    input_gate: str = "exp",
):
    """Forward pass of the mLSTM cell in recurrent form on a full sequence.

    ``state_dtype`` None: the initial states' dtype if given, else the gate pre-activations' dtype.
    ``mlstm_step_fn`` has the signature of ``recurrent_step_fw``. Returns h (B, NH, S, DHV) (dtype of
    the queries), and with ``return_last_states`` also ``(c, n, m)`` with m of shape (B, NH).
    ``segment_ids`` (B, S) marks packed documents (each starts from the empty state);
    ``input_gate="sigmoid"`` is passed to the step (``mlstm_step_fn`` then takes ``input_gate``).
    """
    call = validate_sequence_call(
        "recurrent_sequence_fw", queries, keys, values, igate_preact, fgate_preact, c_initial, n_initial,
        m_initial, eps=eps, segment_ids=segment_ids,
    )
    CellOptions(eps=eps, input_gate=input_gate)  # validates input_gate
    step_options = {} if input_gate == "exp" else {"input_gate": input_gate}
    if step_options and mlstm_step_fn is recurrent_step_fw:  # the seed step has no input_gate keyword
        mlstm_step_fn = seed_step_fn("recurrent_native")
    state0 = call.state
    state_dtype = floating_dtype("state_dtype", state_dtype)
    if state_dtype is None:
        state_dtype = state0.matC.dtype if state0 is not None else jnp.result_type(call.vecI, call.vecF)
    eps = call.options.eps

    def step(C, N, M, q, k, v, i, f):
        h, (C, N, M) = mlstm_step_fn(C, N, M[..., None], q, k, v, i[..., None], f[..., None], eps=eps,
                                     **step_options)
        return h, MLSTMState(C, N, M[..., 0])

    kernel = get_mlstm_kernel("recurrent_native", use_scan=use_scan, state_dtype=state_dtype, step_fn=step)
    return kernel(
        queries, keys, values, call.vecI, call.vecF, *(state0 or (None, None, None)),
        return_last_states=return_last_states, eps=eps,
    )


@dataclasses.dataclass
class mLSTMBackendRecurrentConfig(mLSTMBackendConfig):
    """Config of the recurrent backend."""

    context_length: int = -1
    """Context length of the model (informational for this backend); taken from the model config."""
    eps: float = 1e-6
    """Epsilon added to the normalizer."""
    input_gate: str = "exp"
    """Input gate: "exp" (the exponential gate with max state) or "sigmoid" (mLSTMsig, no max state)."""
    state_dtype: str | None = None
    """Dtype of the states; None: see ``recurrent_sequence_fw``."""
    use_scan: bool = False
    """Loop with ``jax.lax.scan`` (fast to compile) instead of an unrolled Python loop."""

    def __post_init__(self):
        floating_dtype("state_dtype", self.state_dtype)
        super().__post_init__()

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take ``context_length`` from the model config."""
        self.context_length = model_config.context_length


class mLSTMBackendRecurrent(mLSTMBackend):
    """mLSTM backend that runs the cell step by step (``recurrent_sequence_fw``)."""

    config: mLSTMBackendRecurrentConfig
    config_class = mLSTMBackendRecurrentConfig

    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
                 segment_ids=None):
        """Run the sequence; see ``recurrent_sequence_fw``."""
        return recurrent_sequence_fw(
            q, k, v, i, f, c_initial, n_initial, m_initial,
            return_last_states=return_last_states, eps=self.config.eps,
            state_dtype=self.config.state_dtype, use_scan=self.config.use_scan,
            segment_ids=segment_ids, input_gate=self.config.input_gate,
        )

    @property
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension.

        The backend was not written to be independent of the heads dimension: False.
        """
        return False
