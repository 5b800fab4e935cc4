"""Text generation with the xLSTM language model, built on ``xlstm_jax.inference``.

Notation: prompt tokens (B, P) int32, logits (B, V), stacked per-block states
``MLSTMState(matC (NB, B, NH, DHQK, DHV), vecN (NB, B, NH, DHQK), scaM (NB, B, NH))``.

The one prefill/decode story:

1. prefill: the whole prompt in one call of the model in sequence mode (every cell through the
   configured backend, a chunkwise kernel by default) with ``return_last_states=True``; for a batch
   of prompts of different lengths the rows are right-padded and the padded positions leave every
   state untouched (``xlstm_jax.inference.mask_gates``), and the LM head runs only at each row's last
   real position;
2. decoding: one token per step through the model in ``mode="step"``, where every cell is
   ``xlstm_jax.inference.decode_step`` with the configured step kernel, many steps per device call
   in one ``lax.scan`` (``xlstm_jax.inference.decode_loop``), states donated;
3. sampling: greedy (``temperature=0``) or ``softmax(logits / temperature)`` over the ``top_k`` most
   likely tokens, each row from its own seed (``xlstm_jax.inference.sample_rows``).

``Generator`` serves lists of prompts (different lengths, per-row EOS, streamed tokens; compiled
once per (batch bucket, length bucket) for prefill and per batch bucket for a decode block) through
``xlstm_jax.inference.stream_tokens``. ``generate`` is the one-call form for a rectangular batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.inference import check_prompts, decode_loop, sample_logits, sample_rows, stream_tokens
from xlstm_jax.kernels import MLSTMState

from .model import xLSTMLMModel

__all__ = ["Generator", "decode_step", "generate", "prefill", "sample_logits"]


def prefill(
    model: xLSTMLMModel,
    params: Any,
    tokens: jax.Array,  # (B, P) int
    lengths: jax.Array | None = None,  # (B,) int: real tokens per right-padded row; None: all P
) -> tuple[jax.Array, MLSTMState]:
    """The prompt through the model, returning the states after it.

    Without ``lengths``: logits (B, P, V) of every prompt position. With ``lengths``: the rows are
    right-padded prompts; returns the logits (B, V) at each row's last real position, and states
    equal to those of each row's real tokens alone.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"prompt tokens must have shape (B, P) with P >= 1; got {tokens.shape}")
    if lengths is None:
        return model.apply({"params": params}, tokens, return_last_states=True)
    B, P = tokens.shape
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = {(B,)}; got {lengths.shape}")
    mask = jnp.arange(P)[None, :] < lengths[:, None]
    logits, states = model.apply(
        {"params": params}, tokens, return_last_states=True, mask=mask, logits_at=lengths - 1
    )
    return logits[:, 0], states


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


def _decode_block(model, params, carry, num_steps: int, temperature: float, top_k: int, unroll: int):
    """``num_steps`` decode steps from ``carry = (token (B,), states, seeds (B,), step)``: the new
    carry and the sampled tokens (B, num_steps)."""

    def step(c):
        token, states, seeds, t = c
        logits, states = decode_step(model, params, token, states)
        nxt = sample_rows(logits, seeds, t, temperature, top_k)
        return (nxt, states, seeds, t + 1), nxt

    carry, toks = decode_loop(step, carry, num_steps, unroll=unroll)
    return carry, toks.T


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "temperature", "top_k"))
def _generate(model, params, prompt, seeds, *, max_new_tokens, temperature, top_k):
    logits, states = prefill(model, params, prompt)
    first = sample_rows(logits[:, -1], seeds, 0, temperature, top_k)
    carry = (first, states, seeds, jnp.ones((), jnp.int32))
    _, rest = _decode_block(model, params, carry, max_new_tokens - 1, temperature, top_k, 1)
    return jnp.concatenate([first[:, None], rest], axis=1)


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
    """``max_new_tokens`` new tokens (B, max_new_tokens) int32 after ``prompt`` (all rows of one
    length), in one jitted call; row b samples from a seed drawn from ``key`` (default key 0).
    For prompts of different lengths, end-of-sequence stops and streaming use ``Generator``."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape (B, P) with P >= 1; got {prompt.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    sample_logits(jnp.zeros((1, 2)), jax.random.key(0), temperature, top_k)  # validates both
    key = jax.random.key(0) if key is None else key
    seeds = jax.random.bits(key, (prompt.shape[0],), jnp.uint32)
    return _generate(
        model, params, prompt, seeds, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
        top_k=int(top_k),
    )


class Generator:
    """Serve a model: batches of prompts of different lengths, per-row EOS, streamed tokens.

    ``block_size`` tokens are decoded per device call (one ``lax.scan``; the host sees tokens once
    per block, while the next block already runs). Prompts are right-padded to a power-of-two length
    (at least ``min_length_bucket``) and the batch to a power-of-two size, so a serving process
    compiles one prefill per (batch, length) bucket and one decode block per batch bucket.
    ``unroll`` decode steps are unrolled in each ``lax.scan`` iteration. States are donated to the
    decode call on accelerators (``donate=None``: everywhere except the CPU).
    """

    def __init__(
        self,
        model: xLSTMLMModel,
        params: Any,
        *,
        block_size: int = 16,
        min_length_bucket: int = 16,
        unroll: int = 1,
        donate: bool | None = None,
    ):
        for name, value in (("block_size", block_size), ("min_length_bucket", min_length_bucket), ("unroll", unroll)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.model, self.params = model, params
        self.config = model.config
        self.block_size, self.min_length_bucket, self.unroll = block_size, min_length_bucket, unroll
        if donate is None:
            donate = jax.default_backend() != "cpu"

        def prefill_impl(params, tokens, lengths, seeds, temperature, top_k):
            logits, states = prefill(model, params, tokens, lengths)
            first = sample_rows(logits, seeds, 0, temperature, top_k)
            return (first, states, seeds, jnp.ones((), jnp.int32)), first

        def decode_impl(params, carry, num_steps, temperature, top_k):
            return _decode_block(model, params, carry, num_steps, temperature, top_k, unroll)

        statics = ("temperature", "top_k")
        self._prefill = jax.jit(prefill_impl, static_argnames=statics)
        self._decode = jax.jit(
            decode_impl, static_argnames=("num_steps",) + statics, donate_argnums=(1,) if donate else ()
        )

    # ------------------------------------------------------------------ device functions
    def prefill_fn(self, temperature: float = 0.0, top_k: int = 0) -> Callable:
        """``(tokens (B, P), lengths (B,), seeds (B,)) -> (carry, first tokens (B,))`` on the device."""
        return lambda tokens, lengths, seeds: self._prefill(
            self.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(seeds, jnp.uint32), temperature=temperature, top_k=top_k,
        )

    def decode_fn(self, num_steps: int | None = None, temperature: float = 0.0, top_k: int = 0) -> Callable:
        """``carry -> (carry, tokens (B, num_steps))``: one decode block (default ``block_size``)."""
        n = self.block_size if num_steps is None else int(num_steps)
        return lambda carry: self._decode(self.params, carry, num_steps=n, temperature=temperature, top_k=top_k)

    # ------------------------------------------------------------------ serving
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        seeds: Sequence[int] | None = None,
        eos_token_id: int | None | str = "config",
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row, new tokens)`` for the prompts (lists of token ids) as they are produced.

        A row ends after ``max_new_tokens`` tokens or with ``eos_token_id`` (included; default the
        config's ``eos_token_id``; None: never). Row b samples from ``seeds[b]`` (default b).
        """
        sample_logits(jnp.zeros((1, 2)), jax.random.key(0), temperature, top_k)  # validates both
        prompts = check_prompts(prompts, self.config.vocab_size)
        eos = self.config.eos_token_id if eos_token_id == "config" else eos_token_id
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        temperature, top_k = float(temperature), int(top_k)
        return stream_tokens(
            self.prefill_fn(temperature, top_k), self.decode_fn(None, temperature, top_k), prompts,
            max_new_tokens=max_new_tokens, block_size=self.block_size, eos_token_id=eos,
            pad_token_id=pad, seeds=seeds, min_length_bucket=self.min_length_bucket,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        seeds: Sequence[int] | None = None,
        eos_token_id: int | None | str = "config",
        on_tokens: Callable[[int, np.ndarray], None] | None = None,
    ) -> list[np.ndarray]:
        """The new tokens of every prompt (a list of 1-D int32 arrays, in prompt order); ``on_tokens(row,
        tokens)`` is called with each row's tokens as they arrive (streaming). See ``stream``."""
        out: list[list[np.ndarray]] = [[] for _ in range(len(prompts))]
        for row, toks in self.stream(
            prompts, max_new_tokens, temperature=temperature, top_k=top_k, seeds=seeds, eos_token_id=eos_token_id
        ):
            out[row].append(toks)
            if on_tokens is not None:
                on_tokens(row, toks)
        return [np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32) for parts in out]
