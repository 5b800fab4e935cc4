"""Shared input handling for every mLSTM kernel: validation, gate shapes, dtypes, options.

Notation (used in every kernel module of this package):

    B      batch size                NH     number of heads
    S      sequence length           L      chunk size
    NC     number of chunks          DHQK   head dim of queries and keys
    DHV    head dim of values

    matQ, matK  (B, NH, S, DHQK)     matV   (B, NH, S, DHV)
    vecI, vecF  (B, NH, S)           input / forget gate pre-activations
    matC        (B, NH, DHQK, DHV)   memory state
    vecN        (B, NH, DHQK)        normalizer state
    scaM        (B, NH)              max (stabilizer) state

Prefixes say the rank: ``mat`` a matrix per (batch, head), ``vec`` a vector, ``sca`` a scalar.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

GradMode = Literal["exact", "tfla"]
GRAD_MODES = ("exact", "tfla")


class MLSTMState(NamedTuple):
    """The mLSTM cell state of one sequence position, per batch element and head."""

    matC: jax.Array  # (B, NH, DHQK, DHV)
    vecN: jax.Array  # (B, NH, DHQK)
    scaM: jax.Array  # (B, NH)


def _shape(x) -> str:
    return "None" if x is None else str(tuple(x.shape))


def squeeze_gate(name: str, gate: jax.Array, expected: tuple[int, ...]) -> jax.Array:
    """Accept a gate of shape ``expected`` or ``expected + (1,)``; return it as ``expected``."""
    if gate.shape == tuple(expected):
        return gate
    if gate.shape == tuple(expected) + (1,):
        return gate[..., 0]
    raise ValueError(
        f"gate {name} has shape {_shape(gate)}; expected {tuple(expected)} or {tuple(expected) + (1,)}"
    )


def validate_inputs(
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    vecF: jax.Array,  # (B, NH, S) or (B, NH, S, 1)
    matC_initial: jax.Array | None = None,  # (B, NH, DHQK, DHV)
    vecN_initial: jax.Array | None = None,  # (B, NH, DHQK)
    scaM_initial: jax.Array | None = None,  # (B, NH)
) -> tuple[jax.Array, jax.Array, MLSTMState | None]:
    """Check the shapes of a sequence call; return (vecI, vecF) as (B, NH, S) and the initial state.

    Raises ``ValueError`` naming the offending shapes. Initial states are all given or all None.
    """
    shapes = (
        f"q {_shape(matQ)}, k {_shape(matK)}, v {_shape(matV)}, i {_shape(vecI)}, f {_shape(vecF)}"
    )
    for name, x in (("q", matQ), ("k", matK), ("v", matV)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 (B, NH, S, D); got {shapes}")
    B, NH, S, DHQK = matQ.shape
    if matK.shape != matQ.shape:
        raise ValueError(f"k must have the shape of q (B, NH, S, DHQK); got {shapes}")
    if matV.shape[:3] != (B, NH, S):
        raise ValueError(f"v must have shape (B, NH, S, DHV) with B, NH, S of q; got {shapes}")
    if S < 1 or DHQK < 1 or matV.shape[3] < 1:
        raise ValueError(f"empty sequence or head dimension; got {shapes}")
    vecI = squeeze_gate("i", vecI, (B, NH, S))
    vecF = squeeze_gate("f", vecF, (B, NH, S))
    DHV = matV.shape[3]
    given = [x is not None for x in (matC_initial, vecN_initial, scaM_initial)]
    if any(given) and not all(given):
        raise ValueError(
            "give all three initial states or none: c_initial "
            f"{_shape(matC_initial)}, n_initial {_shape(vecN_initial)}, m_initial {_shape(scaM_initial)}"
        )
    state = None
    if all(given):
        want = {"c_initial": (B, NH, DHQK, DHV), "n_initial": (B, NH, DHQK), "m_initial": (B, NH)}
        got = {"c_initial": matC_initial, "n_initial": vecN_initial, "m_initial": scaM_initial}
        for name, shape in want.items():
            if tuple(got[name].shape) != shape:
                raise ValueError(
                    f"{name} has shape {_shape(got[name])}; expected {shape} for {shapes}"
                )
        state = MLSTMState(matC_initial, vecN_initial, scaM_initial)
    return vecI, vecF, state


def validate_options(
    *, eps: float, norm_val: float, grad_mode: str, qk_scale: float | None, DHQK: int
) -> float:
    """Check the scalar options shared by all kernels; return the effective ``qk_scale``."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}; got {grad_mode!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if not norm_val >= 0.0:
        raise ValueError(f"norm_val must be >= 0; got {norm_val}")
    return DHQK**-0.5 if qk_scale is None else float(qk_scale)


def validate_chunk_size(name: str, value, S: int | None = None) -> int:
    """A chunk or tile size must be a positive int (a power of two where kernels require it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = "" if S is None else f" (sequence length S={S})"
        raise ValueError(f"{name} must be a positive int; got {value!r}{where}")
    return value


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for half-precision inputs, float64 when any input is float64 (x64 references)."""
    dt = jnp.result_type(*[a for a in arrays if a is not None])
    return jnp.promote_types(dt, jnp.float32)


def normalizer_lower_bound(scaM, *, norm_val: float, stabilize_correctly: bool):
    """The lower bound of the denominator: ``norm_val * exp(-m)`` (or ``norm_val``)."""
    if stabilize_correctly:
        return norm_val * jnp.exp(-scaM)
    return jnp.full_like(scaM, norm_val)
