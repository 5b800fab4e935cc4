"""Text generation with the xLSTM language model: prefill, then token-by-token decoding.

Notation: prompt tokens (B, P) int32, logits (B, V), stacked per-block states
``MLSTMState(matC (NB, B, NH, DHQK, DHV), vecN (NB, B, NH, DHQK), scaM (NB, B, NH))``.

1. ``prefill``: the whole prompt in one call of the model with the configured sequence backend
   (chunkwise by default) and ``return_last_states=True``: the logits of every prompt position and the
   last state of every layer.
2. ``decode_step``: one token through the model in ``mode="step"``, i.e. the configured step kernel
   (``config.mlstm_step_kernel``) from the carried states.
3. ``generate``: both, jitted, with the decode loop as one ``lax.scan``; sampling is greedy
   (``temperature=0``) or from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
   likely tokens (``top_k=0``: all).

This module implements prefill/decode for this model itself (the embedding, feed-forward blocks and
LM head sit between the mLSTM cells, so a bare stack-of-cells inference API does not apply).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from xlstm_jax.kernels import MLSTMState

from .model import xLSTMLMModel


def prefill(model: xLSTMLMModel, params: Any, tokens: jax.Array) -> tuple[jax.Array, MLSTMState]:
    """Logits (B, P, V) of every prompt position and the states after the prompt."""
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"prompt tokens must have shape (B, P) with P >= 1; got {tokens.shape}")
    return model.apply({"params": params}, tokens, return_last_states=True)


def decode_step(
    model: xLSTMLMModel,
    params: Any,
    token: jax.Array,  # (B,) int
    states: MLSTMState,  # stacked per-block states
) -> tuple[jax.Array, MLSTMState]:
    """Logits (B, V) of the position after ``token``, and the new states (the step kernel)."""
    if token.ndim != 1:
        raise ValueError(f"token must have shape (B,); got {token.shape}")
    logits, states = model.apply({"params": params}, token[:, None], states, mode="step")
    return logits[:, 0], states


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Next tokens (B,) int32 from logits (B, V): argmax if ``temperature == 0``, else a sample of
    ``softmax(logits / temperature)`` over the ``top_k`` largest logits (all if ``top_k == 0``)."""
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0; got {temperature}, {top_k}")
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "temperature", "top_k"))
def _generate(model, params, prompt, key, *, max_new_tokens, temperature, top_k):
    logits, states = prefill(model, params, prompt)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_k)

    def body(carry, k):
        token, states = carry
        logits, states = decode_step(model, params, token, states)
        nxt = sample_logits(logits, k, temperature, top_k)
        return (nxt, states), nxt

    _, rest = jax.lax.scan(body, (first, states), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: xLSTMLMModel,
    params: Any,
    prompt: jax.Array,  # (B, P) int
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
) -> jax.Array:
    """``max_new_tokens`` new tokens (B, max_new_tokens) int32 after ``prompt`` (jitted)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape (B, P) with P >= 1; got {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0; got {temperature}, {top_k}")
    key = jax.random.key(0) if key is None else key
    return _generate(
        model, params, prompt, key, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
        top_k=int(top_k),
    )
