"""Training text: the embedded corpus, user files, the train / held-out split, resumable batches.

The default corpus is the English documentation text that ships with CPython itself
(``pydoc_data.topics``: the language reference topics behind ``help()``), so training works offline on
any machine with Python. Users pass their own UTF-8 text files instead.

Batches are windows of ``seq_len + 1`` byte tokens (inputs and next-token targets); with packing
(the default, ``packing.py``) each window also carries the segment ids of its documents (every
file, or its pieces between ``doc_separator``s, and every topic of the embedded corpus is a
document), so a document never sees another's state and no target is predicted across a border. Each epoch draws
a random offset and a random order of the non-overlapping windows from ``(seed, epoch)``; the
iterator's whole state is ``DataState(epoch, position)``, saved in every checkpoint, so a resumed run
sees exactly the batches the uninterrupted run would have seen. In a multi-process run every process
holds the same state and builds only its rows of each batch (``BatchSampler.batch(state, rows)``,
``HeldoutBatches.batch(i, rows)``), so the global batch sequence is that of one process.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from .packing import pack_windows, segment_stream
from .tokenizer import ByteTokenizer

EMBEDDED_CORPUS_NAME = "cpython-pydoc-topics"


def embedded_corpus_documents() -> list[str]:
    """The topics of CPython's ``pydoc_data.topics`` (sorted by name, stripped): one document each."""
    try:
        from pydoc_data import topics
    except ImportError as err:  # some distributions strip pydoc_data from the standard library
        raise RuntimeError(
            "the embedded corpus needs CPython's pydoc_data module, which this Python lacks; "
            "train on your own text with --data FILE [FILE ...]"
        ) from err
    return [topics.topics[name].strip() for name in sorted(topics.topics)]


def embedded_corpus_text() -> str:
    """The English text of CPython's ``pydoc_data.topics`` (topics in sorted order)."""
    return "\n\n".join(embedded_corpus_documents()) + "\n"


def load_corpus(paths: Sequence[str] = (), encode: Callable[[str], np.ndarray] | None = None) -> tuple[np.ndarray, str]:
    """Token ids (N,) of the given UTF-8 text files (concatenated, separated by a blank line), or of
    the embedded corpus when ``paths`` is empty; and a short description of the source. ``encode``:
    text -> token ids (a tokenizer's ``encode``, e.g. ``xlstm_jax.text.HFTokenizer``); default the
    byte tokenizer (uint8 ids).

    A missing, unreadable, empty or non-UTF-8 file raises ``ValueError`` naming the file (and for
    bad UTF-8 the byte offset).
    """
    tokens, _, source = load_documents(paths, encode=encode)
    return tokens, source


def load_documents(
    paths: Sequence[str] = (), doc_separator: str | None = None,
    encode: Callable[[str], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(tokens (N,), segment ids (N,) int32, source): the corpus of ``load_corpus`` (the same
    tokens when ``doc_separator`` is None) and the document index of every token. ``encode``: text
    -> token ids (default: the byte tokenizer, uint8 ids); each document is encoded on its own (a
    tokenizer that adds BOS adds it at every document start).

    Documents: every file, split on ``doc_separator`` if given (the separators removed, empty pieces
    dropped), or every topic of the embedded corpus. They are joined by a blank line, which belongs
    to the document before it. ``ValueError`` for bad files and for an empty ``doc_separator``.
    """
    encode = ByteTokenizer().encode if encode is None else encode
    if doc_separator is not None and (not isinstance(doc_separator, str) or not doc_separator):
        raise ValueError(f"doc_separator must be a non-empty string; got {doc_separator!r}")
    if not paths:
        docs, source = embedded_corpus_documents(), EMBEDDED_CORPUS_NAME
        if doc_separator is not None:
            docs = [p for d in docs for p in d.split(doc_separator) if p]
        return _join_documents(encode, docs, tail="\n") + (source,)
    parts = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"text file {path!r} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"text file {path!r} is not a regular file")
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as err:
            raise ValueError(f"text file {path!r} cannot be read: {err.strerror or err}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"text file {path!r} is not UTF-8 text (invalid byte 0x{raw[err.start]:02x} at byte offset {err.start})"
            ) from None
        if not text:
            raise ValueError(f"text file {path!r} is empty")
        if doc_separator is None:
            parts.append(text)
        else:
            pieces = [p for p in text.split(doc_separator) if p]
            if not pieces:
                raise ValueError(f"text file {path!r} holds only the separator {doc_separator!r}")
            parts.extend(pieces)
    return _join_documents(encode, parts, tail="") + ("files: " + ", ".join(os.path.basename(p) for p in paths),)


def _join_documents(encode: Callable[[str], np.ndarray], docs: list[str], tail: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of ``"\n\n".join(docs) + tail`` and their document ids (the separator and the tail
    belong to the document before them)."""
    pieces = [d + "\n\n" for d in docs[:-1]] + [docs[-1] + tail]
    encoded = [np.asarray(encode(p)) for p in pieces]
    tokens = np.concatenate(encoded) if encoded else np.zeros((0,), np.uint8)
    return tokens, segment_stream([len(e) for e in encoded])


def split_corpus(tokens: np.ndarray, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): the last ``heldout_fraction`` of the tokens, cut at a newline if one is near."""
    cut = split_point(tokens, heldout_fraction)
    return tokens[:cut], tokens[cut:]


def split_point(tokens: np.ndarray, heldout_fraction: float) -> int:
    """Index where ``split_corpus`` cuts (the held-out part starts there)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1); got {heldout_fraction}")
    cut = int(len(tokens) * (1.0 - heldout_fraction))
    newline = np.flatnonzero(tokens[cut : cut + 4096] == ord("\n"))
    if newline.size:
        cut += int(newline[0]) + 1
    return cut


def unigram_entropy(tokens: np.ndarray, vocab_size: int = 256) -> float:
    """Entropy in nats per token of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass(frozen=True)
class DataState:
    """Position of the batch iterator: the epoch and the index of the next batch inside it."""

    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON form."""
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "DataState":
        """Inverse of ``to_dict``."""
        return cls(int(d["epoch"]), int(d["position"]))


class BatchSampler:
    """Deterministic, resumable batches of windows (B, seq_len + 1) from a token array.

    ``batch(state)`` returns the batch at ``state`` and the state after it; nothing else is stored, so
    ``state`` (in every checkpoint) fully determines the rest of the data stream. With ``segments``
    (the segment ids of the tokens, ``packing.py``) batches are (B, 2, seq_len + 1): tokens and ids.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 segments: np.ndarray | None = None):
        self.tokens = np.asarray(tokens)
        self.segments = None if segments is None else np.asarray(segments)
        if self.segments is not None and self.segments.shape != self.tokens.shape:
            raise ValueError(f"segments has shape {self.segments.shape}; expected the tokens' {self.tokens.shape}")
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive; got {batch_size}, {seq_len}")
        if self.batches_per_epoch(0) < 1:
            raise ValueError(
                f"the training text has {len(self.tokens)} tokens: too short for one batch of "
                f"{batch_size} windows of {seq_len + 1} tokens; use more text or a smaller --batch-size/--seq-len"
            )
        self._cache: tuple[int, np.ndarray] | None = None

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(0, self.seq_len))
        n = (len(self.tokens) - offset - 1) // self.seq_len
        starts = offset + self.seq_len * rng.permutation(n)
        self._cache = (epoch, starts)
        return starts

    def batches_per_epoch(self, epoch: int) -> int:
        """Number of full batches in ``epoch`` (its random offset may drop one window)."""
        n = (len(self.tokens) - (self.seq_len - 1) - 1) // self.seq_len  # the worst offset
        return n // self.batch_size

    def batch(self, state: DataState, rows: slice | np.ndarray | None = None) -> tuple[np.ndarray, DataState]:
        """The batch (B, seq_len + 1) int32 (packed: (B, 2, seq_len + 1)) at ``state``, and the next state.

        ``rows`` (a slice of 0..B or an index array) builds only those rows of the batch (one
        process's share in a multi-process run, ``Trainer.local_rows``); the next state is the same
        either way.
        """
        epoch, pos = state.epoch, state.position
        if pos >= self.batches_per_epoch(epoch):
            epoch, pos = epoch + 1, 0
        starts = self._epoch_starts(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        if rows is not None:
            starts = starts[rows]
        windows = pack_windows(self.tokens, self.segments, starts, self.seq_len + 1)
        return windows, DataState(epoch, pos + 1)


class HeldoutBatches(Sequence):
    """Fixed evaluation batches (B, seq_len + 1) int32: consecutive non-overlapping windows of the
    held-out text. A sequence of whole batches (``batches[i]``); ``batch(i, rows)`` builds only the
    given rows of batch ``i`` (one process's share in a multi-process run). With ``segments`` the
    batches are packed, (B, 2, seq_len + 1), as the training batches."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, count: int,
                 segments: np.ndarray | None = None):
        self.tokens = np.asarray(tokens)
        self.segments = None if segments is None else np.asarray(segments)
        self.batch_size, self.seq_len, self.count = int(batch_size), int(seq_len), int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"HeldoutBatches index must be an int; got {type(i).__name__}")
        return self.batch(int(i))

    def batch(self, i: int, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (default: all B) of batch ``i`` (0 <= i < len), (rows, seq_len + 1) int32."""
        if not 0 <= i < self.count:
            raise IndexError(f"held-out batch {i} out of range 0..{self.count - 1}")
        row_ids = np.arange(i * self.batch_size, (i + 1) * self.batch_size)
        if rows is not None:
            row_ids = row_ids[rows]
        starts = self.seq_len * row_ids
        return pack_windows(self.tokens, self.segments, starts, self.seq_len + 1)


def heldout_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int,
                    segments: np.ndarray | None = None) -> HeldoutBatches:
    """The fixed evaluation batches (B, seq_len + 1) int32 of the held-out text (at most
    ``max_batches``; a last partial batch is dropped); ``ValueError`` if there is not one."""
    n = (len(tokens) - 1) // seq_len
    nb = min(max_batches, n // batch_size)
    if nb < 1:
        raise ValueError(
            f"the held-out text has {len(tokens)} tokens: too short for one evaluation batch of "
            f"{batch_size} x {seq_len + 1}; raise --heldout-fraction or lower --batch-size/--seq-len"
        )
    return HeldoutBatches(tokens, batch_size, seq_len, nb, segments)


def bits_per_byte(nats: float) -> float:
    """Convert a loss in nats per byte token to bits per byte."""
    return nats / math.log(2.0)


@dataclasses.dataclass(frozen=True)
class RunData:
    """The data of a run, prepared before it starts: the corpus, its split, the resumable training
    batches and the fixed evaluation batches."""

    source: str
    """Short description of the corpus."""
    num_tokens: int
    """Tokens of the whole corpus."""
    train_tokens: np.ndarray
    """(N_train,) uint8 token ids of the training part."""
    heldout_tokens: np.ndarray
    """(N_heldout,) uint8 token ids of the held-out part (the end of the text)."""
    unigram_entropy: float
    """Entropy of the training part's byte frequencies, nats per byte."""
    sampler: BatchSampler
    """Training batches (B, S + 1) as a function of ``DataState``."""
    eval_batches: Sequence[np.ndarray]
    """Held-out batches (B, S + 1) int32 (``HeldoutBatches``; empty: no evaluation)."""
    num_documents: int = 0
    """Documents of the corpus (0: not packed)."""


def prepare_data(
    paths: Sequence[str], *, batch_size: int, seq_len: int, seed: int, heldout_fraction: float,
    eval_batches: int, vocab_size: int = 256, encode: Callable[[str], np.ndarray] | None = None,
    pack: bool = False, doc_separator: str | None = None,
) -> RunData:
    """Load the corpus (``paths`` or the embedded one), split it, and build the batches of a run.

    ``pack``: batches carry segment ids (``packing.py``); ``doc_separator`` splits files into
    documents. Raises ``ValueError`` for unreadable files and for text too short for one training or
    one evaluation batch (naming the sizes).
    """
    tokens, segments, source = load_documents(paths, doc_separator, encode=encode)
    cut = split_point(tokens, heldout_fraction)
    train_tokens, heldout_tokens = tokens[:cut], tokens[cut:]
    train_seg, heldout_seg = (segments[:cut], segments[cut:]) if pack else (None, None)
    sampler = BatchSampler(train_tokens, batch_size, seq_len, seed, segments=train_seg)
    evals = (
        heldout_batches(heldout_tokens, batch_size, seq_len, eval_batches, segments=heldout_seg) if eval_batches
        else HeldoutBatches(heldout_tokens, batch_size, seq_len, 0, heldout_seg)
    )
    return RunData(
        source=source, num_tokens=len(tokens), train_tokens=train_tokens, heldout_tokens=heldout_tokens,
        unigram_entropy=unigram_entropy(train_tokens, vocab_size), sampler=sampler, eval_batches=evals,
        num_documents=int(segments[-1]) + 1 if pack and len(segments) else 0,
    )
