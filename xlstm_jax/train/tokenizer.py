"""Byte-level tokenizer: every UTF-8 byte is one token (vocabulary of 256, no unknown tokens)."""

from __future__ import annotations

from typing import Iterable

import numpy as np


class ByteTokenizer:
    """Encodes text as its UTF-8 bytes (ids 0..255) and decodes ids back to text.

    Decoding replaces incomplete or invalid UTF-8 sequences (possible in sampled text) with U+FFFD.
    """

    vocab_size: int = 256
    name: str = "bytes"

    def encode(self, text: str) -> np.ndarray:
        """Token ids (S,) uint8 of ``text``."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str; got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of the token ids (each in 0..255)."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte token ids must lie in 0..255; got min {arr.min()}, max {arr.max()}")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
