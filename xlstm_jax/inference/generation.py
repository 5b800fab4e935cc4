"""Token generation for serving: padding that leaves states untouched, sampling, the streaming loop.

Notation: B rows (prompts) per call, P padded prompt length, V vocabulary, T tokens per decode
block. This module knows nothing about a particular model: a model supplies two functions,

    prefill_fn(tokens (B, P) int32, lengths (B,) int32, seeds (B,) uint32) -> (carry, first (B,))
    decode_fn(carry) -> (carry, tokens (B, T))

(usually jitted; ``xlstm_jax.models.xlstm_lm.generate.Generator`` is the language model's), and
``stream_tokens`` runs them: it pads a list of prompts of different lengths on the right to one
length bucket and the batch to a batch bucket (so each bucket compiles once), prefills, then
decodes T tokens per device call, pulls each block to the host while the next one runs, and yields
every row's new tokens as they arrive, until each row has produced ``max_new_tokens`` tokens or
its end-of-sequence token (which it includes).

Why right padding is exact for the mLSTM: at a padded position the model sets the gates to
``PASS_THROUGH_GATES`` (``mask_gates``): the input gate is closed (i = -1e30, so exp(i - m) = 0) and
the forget gate fully open (f = +1e30, log_sigmoid(f) = 0), so m, C and n keep their values exactly
(m' = max(0 + m, -1e30) = m, C' = exp(0) C + 0). A padded row therefore ends its prompt in exactly the
state its real tokens give, the first new token comes from the logits at its last real position,
and decoding continues from there; each row's real tokens sit at the same positions as when it
runs alone (the chunk borders of a chunkwise kernel fall in the same places), so rows do not
influence each other. Sampling draws each row's randomness from its own seed and the step index
only (``sample_rows``), never from the batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAD_INPUT_GATE = -1e30
"""Input-gate pre-activation of a padded position: closed (adds nothing to the state)."""
PAD_FORGET_GATE = 1e30
"""Forget-gate pre-activation of a padded position: log_sigmoid(f) = 0, the state is kept."""
PASS_THROUGH_GATES = (PAD_INPUT_GATE, PAD_FORGET_GATE)
"""(i, f) of a position that leaves the mLSTM state untouched."""


def _gate_value(value: float, dtype) -> float:
    """``value`` clipped to the finite range of ``dtype`` (float16 cannot hold 1e30)."""
    big = float(jnp.finfo(dtype).max)
    return max(-big, min(big, value))


def mask_gates(
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    mask: jax.Array,  # (B, S) bool: True at real tokens
) -> tuple[jax.Array, jax.Array]:
    """The gates with every masked-out position set to ``PASS_THROUGH_GATES`` (state unchanged)."""
    if vecI.ndim != 3 or vecF.shape != vecI.shape:
        raise ValueError(f"mask_gates: i and f must have one shape (B, NH, S); got {vecI.shape}, {vecF.shape}")
    B, _, S = vecI.shape
    if tuple(mask.shape) != (B, S) or mask.dtype != jnp.bool_:
        raise ValueError(f"mask_gates: mask must be bool of shape (B, S) = {(B, S)}; got {mask.dtype} {mask.shape}")
    keep = mask[:, None, :]
    i = jnp.where(keep, vecI, jnp.asarray(_gate_value(PAD_INPUT_GATE, vecI.dtype), vecI.dtype))
    f = jnp.where(keep, vecF, jnp.asarray(_gate_value(PAD_FORGET_GATE, vecF.dtype), vecF.dtype))
    return i, f


# ---------------------------------------------------------------------------------------- sampling
def _check_sampling(temperature: float, top_k: int) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0; got {top_k!r}")


def _restrict_top_k(logits: jax.Array, top_k: int) -> jax.Array:  # (..., V) -> (..., V)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Next tokens (B,) int32 from logits (B, V) with one key for the batch: argmax if
    ``temperature == 0``, else a sample of ``softmax(logits / temperature)`` over the ``top_k``
    largest logits (all if ``top_k == 0``). Row b's draw depends on B and b; ``sample_rows`` does not."""
    _check_sampling(temperature, top_k)
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _restrict_top_k(logits, top_k)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def row_keys(seeds: jax.Array, step: jax.Array | int) -> jax.Array:
    """One PRNG key per row (B,) from its seed (B,) uint32 and the step index (same for all rows)."""
    keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
    return jax.vmap(jax.random.fold_in, (0, None))(keys, jnp.asarray(step, jnp.uint32))


def sample_rows(
    logits: jax.Array,  # (B, V)
    seeds: jax.Array,  # (B,) uint32
    step: jax.Array | int,
    temperature: float,
    top_k: int,
) -> jax.Array:
    """Next tokens (B,) int32, each row drawn from its own seed and the step index only, so a row's
    tokens do not depend on the other rows or the batch size (greedy when ``temperature == 0``)."""
    _check_sampling(temperature, top_k)
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = row_keys(seeds, step)
    draw = lambda k, lg: jax.random.categorical(k, _restrict_top_k(lg, top_k) / temperature)  # noqa: E731
    return jax.vmap(draw)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------------------- buckets
def bucket(n: int, minimum: int = 1) -> int:
    """The bucket of a size n >= 1: the next power of two >= max(n, minimum)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"bucket: size must be a positive int; got {n!r}")
    return 1 << (max(int(n), int(minimum)) - 1).bit_length()


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    length: int,
    batch: int,
    pad_token_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``prompts`` to ``length`` tokens and the batch to ``batch`` rows.

    Returns tokens (batch, length) int32 and lengths (batch,) int32; rows past ``len(prompts)`` are
    one pad token long (placeholders whose outputs are dropped).
    """
    if len(prompts) > batch:
        raise ValueError(f"pad_prompts: {len(prompts)} prompts do not fit a batch of {batch}")
    tokens = np.full((batch, length), pad_token_id, np.int32)
    lengths = np.ones((batch,), np.int32)
    for row, p in enumerate(prompts):
        p = np.asarray(p, np.int64).reshape(-1)
        if p.size > length:
            raise ValueError(f"pad_prompts: prompt {row} has {p.size} tokens > length {length}")
        tokens[row, : p.size] = p
        lengths[row] = p.size
    return tokens, lengths


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[np.ndarray]:
    """The prompts as 1-D int arrays; ValueError for an empty list, an empty prompt or a bad id."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if len(prompts) == 0:
        raise ValueError("prompts: give at least one prompt")
    out = []
    for row, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"prompts[{row}] must be a non-empty 1-D sequence of token ids; got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompts[{row}] must hold integer token ids; got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(
                f"prompts[{row}] has token ids in [{arr.min()}, {arr.max()}]; the vocabulary is [0, {vocab_size})"
            )
        out.append(arr.astype(np.int32))
    return out


# ---------------------------------------------------------------------------------------- the loop
def stream_tokens(
    prefill_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, jax.Array]],
    decode_fn: Callable[[Any], tuple[Any, jax.Array]],
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    block_size: int,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    seeds: Sequence[int] | None = None,
    min_length_bucket: int = 16,
    min_batch_bucket: int = 1,
) -> Iterator[tuple[int, np.ndarray]]:
    """Generate for every prompt and yield ``(row, new_tokens)`` as blocks arrive (see module doc).

    ``decode_fn`` must return ``block_size`` tokens per row per call. A row's stream ends after
    ``max_new_tokens`` tokens or with its ``eos_token_id``. ``seeds[b]`` (default b) seeds row b's
    sampling. Prompts are padded to ``bucket(max length, min_length_bucket)`` tokens and the batch to
    ``bucket(len(prompts), min_batch_bucket)`` rows.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    n = len(prompts)
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n or any(not 0 <= s < 2**32 for s in seeds):
        raise ValueError(f"seeds must be {n} ints in [0, 2**32); got {seeds}")
    B = bucket(n, min_batch_bucket)
    P = bucket(max(len(p) for p in prompts), min_length_bucket)
    tokens, lengths = pad_prompts(prompts, length=P, batch=B, pad_token_id=pad_token_id)
    seed_arr = np.zeros((B,), np.uint32)
    seed_arr[:n] = seeds

    produced = [0] * n
    live = set(range(n))

    def emit(block: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:  # block (B, t)
        for row in sorted(live):
            take = block[row, : max_new_tokens - produced[row]]
            if eos_token_id is not None:
                hit = np.flatnonzero(take == eos_token_id)
                if hit.size:
                    take = take[: hit[0] + 1]
                    live.discard(row)
            produced[row] += take.size
            if produced[row] >= max_new_tokens:
                live.discard(row)
            if take.size:
                yield row, take

    carry, first = prefill_fn(tokens, lengths, seed_arr)
    pending = first[:, None]
    remaining = max_new_tokens - 1  # tokens still to decode after the first
    while True:
        nxt = None
        if remaining > 0:
            carry, nxt = decode_fn(carry)  # dispatched before the host waits for `pending`
            remaining -= block_size
        yield from emit(np.asarray(jax.device_get(pending)))
        if nxt is None or not live:
            return
        pending = nxt
