"""Shared definitions of the mLSTM kernels: the notation, the state type and two small formulas.

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

Input validation lives in ``validation.py``, the cell options in ``options.py`` and the chunk-size
rules in ``chunking.py`` (each re-exported by ``xlstm_jax.kernels``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MLSTMState(NamedTuple):
    """The mLSTM cell state of one sequence position, per batch element and head."""

    matC: jax.Array  # (B, NH, DHQK, DHV)
    vecN: jax.Array  # (B, NH, DHQK)
    scaM: jax.Array  # (B, NH)


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for half-precision inputs, float64 when any input is float64 (x64 references)."""
    dt = jnp.result_type(*[a for a in arrays if a is not None])
    return jnp.promote_types(dt, jnp.float32)


def normalizer_lower_bound(scaM, *, norm_val: float, stabilize_correctly: bool):
    """The lower bound of the denominator: ``norm_val * exp(-m)`` (or ``norm_val``)."""
    if stabilize_correctly:
        return norm_val * jnp.exp(-scaM)
    return jnp.full_like(scaM, norm_val)
