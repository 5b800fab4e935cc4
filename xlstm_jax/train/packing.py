"""Packed documents in training: segment ids, the batch layout and the masked loss.

A corpus is a list of documents (each ``--data`` file, or its pieces between ``--doc-separator``s;
each topic of the embedded corpus). Packing (the default; ``--no-pack`` turns it off) keeps the
token stream as it is (documents joined by blank lines) and adds a parallel stream of segment ids
(the document index of every token; a blank line belongs to the document before it). Training and
evaluation windows are cut from both streams at the same places, so every row is filled to its full
length, and carry their segment ids to the model (``segment_ids``: every document starts from the
empty cell state, see ``xlstm_jax.kernels.validation``).

Batch layout: unpacked batches are tokens (B, S + 1) int32; packed batches are (B, 2, S + 1) int32,
``[:, 0]`` the tokens and ``[:, 1]`` the segment ids. ``split_batch`` turns either into the model's
inputs, targets, segment ids and loss mask. The loss is the mean next-token cross entropy over the
targets that lie in the same document as their input (a target across a document boundary is
masked out: no token is predicted from another document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def segment_stream(doc_lengths, dtype=np.int32) -> np.ndarray:
    """(N,) segment ids: document d's ``doc_lengths[d]`` tokens carry id d."""
    lengths = np.asarray(doc_lengths, np.int64)
    return np.repeat(np.arange(len(lengths), dtype=dtype), lengths)


def pack_windows(tokens: np.ndarray, segments: np.ndarray | None, starts, length: int) -> np.ndarray:
    """Windows ``[s, s + length)`` of the streams for every start: (n, length) int32 tokens, or
    (n, 2, length) int32 tokens and segment ids when ``segments`` is given."""
    win = np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)
    if segments is None:
        return win
    seg = np.stack([segments[s : s + length] for s in starts]).astype(np.int32)
    return np.stack([win, seg], axis=1)


def split_batch(batch: jax.Array):
    """(inputs (B, S), targets (B, S), segment_ids (B, S) or None, loss mask (B, S) bool or None).

    ``batch`` is (B, S + 1) tokens or (B, 2, S + 1) tokens and segment ids (module docstring); the
    mask keeps the targets in the same document as their input.
    """
    if batch.ndim == 2:
        return batch[:, :-1], batch[:, 1:], None, None
    if batch.ndim != 3 or batch.shape[1] != 2:
        raise ValueError(f"a batch is (B, S + 1) tokens or (B, 2, S + 1) tokens and segment ids; got {batch.shape}")
    tokens, seg = batch[:, 0], batch[:, 1]
    return tokens[:, :-1], tokens[:, 1:], seg[:, :-1], seg[:, 1:] == seg[:, :-1]


def masked_lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean next-token cross entropy (nats) over the targets where ``mask`` (all if None).

    logits (B, S, V), targets (B, S), mask (B, S) bool. A batch without any kept target gives 0.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if mask is None:
        return ce.mean()
    w = mask.astype(ce.dtype)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
