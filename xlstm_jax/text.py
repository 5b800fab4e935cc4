"""Tokenizers for the command line and training: the byte tokenizer, or a checkpoint's ``tokenizer.json``.

``load_tokenizer(spec, model_dir=None)`` returns an object with ``encode(text) -> ids (S,)``,
``decode(ids) -> text``, ``vocab_size``, ``name``, ``bos_token_id`` and ``eos_token_id``:

* ``"bytes"``: ``xlstm_jax.train.tokenizer.ByteTokenizer`` (UTF-8 bytes, vocabulary 256), the default
  for the embedded corpus and for models trained here;
* a path to a ``tokenizer.json`` or to a directory holding one (a transformers checkpoint such as
  NX-AI/xLSTM-7B, whose tokenizer is GPT-NeoX BPE): ``HFTokenizer`` through the ``tokenizers``
  library (the ``hf`` extra);
* None: the ``tokenizer.json`` of ``model_dir`` when it has one, else the byte tokenizer.

BOS handling: the xLSTM-7B card's usage goes through transformers' tokenizer, which starts every
text with the beginning-of-sequence token (id 0, ``<|endoftext|>``, config.json's ``bos_token_id``).
``HFTokenizer`` does the same: ``add_bos`` (default: ``tokenizer_config.json``'s ``add_bos_token``
when the file says, else True whenever a BOS id is known) prepends the BOS id unless the tokenizer's
own post-processor already put it first, so it is never doubled.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``) with the checkpoint's BOS/EOS ids.

    ``path``: the ``tokenizer.json`` file or a directory with it (and optionally
    ``tokenizer_config.json`` and ``config.json``, read for the special tokens). ``bos_token_id`` /
    ``eos_token_id`` override what the files say; ``add_bos`` as in the module docstring.
    """

    def __init__(
        self,
        path: str,
        *,
        add_bos: bool | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                "a tokenizer.json needs the `tokenizers` library: pip install 'xlstm_jax[hf]'"
            ) from err
        if os.path.isdir(path):
            directory, file = path, os.path.join(path, TOKENIZER_FILE)
        else:
            directory, file = os.path.dirname(path) or ".", path
        if not os.path.isfile(file):
            raise ValueError(f"tokenizer file {file!r} does not exist")
        self._tok = Tokenizer.from_file(file)
        self.path = file
        self.name = f"tokenizer.json ({os.path.basename(os.path.abspath(directory))})"
        tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(directory, "config.json"))
        self.bos_token_id = self._special_id(bos_token_id, tok_cfg.get("bos_token"), model_cfg.get("bos_token_id"))
        self.eos_token_id = self._special_id(eos_token_id, tok_cfg.get("eos_token"), model_cfg.get("eos_token_id"))
        if add_bos is None:
            add_bos = bool(tok_cfg["add_bos_token"]) if "add_bos_token" in tok_cfg else self.bos_token_id is not None
        if add_bos and self.bos_token_id is None:
            raise ValueError(f"add_bos=True but {file!r} names no BOS token; pass bos_token_id")
        self.add_bos = bool(add_bos)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def _special_id(self, given, token, model_id) -> int | None:
        if given is not None:
            return int(given)
        if isinstance(token, dict):  # transformers' AddedToken serialisation
            token = token.get("content")
        if isinstance(token, str) and self._tok.token_to_id(token) is not None:
            return int(self._tok.token_to_id(token))
        if isinstance(model_id, list):
            model_id = model_id[0] if model_id else None
        return None if model_id is None else int(model_id)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (S,) int32 of ``text``, starting with BOS when ``add_bos``."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str; got {type(text).__name__}")
        ids = list(self._tok.encode(text, add_special_tokens=self.add_bos).ids)
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return np.asarray(ids, np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Text of the token ids (special tokens such as BOS/EOS dropped unless asked for). Ids with no
        token (a model's vocabulary may be padded beyond the tokenizer's)
        decode to nothing, as in ``tokenizers``."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        if arr.size and arr.min() < 0:
            raise ValueError(f"token ids must be >= 0; got min {arr.min()}")
        return self._tok.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def load_tokenizer(spec: str | None = None, *, model_dir: str | None = None, add_bos: bool | None = None):
    """The tokenizer named by ``spec`` ("bytes", a tokenizer.json path or a directory with one), or
    for ``spec=None`` the one of ``model_dir`` (its tokenizer.json if present, else bytes)."""
    from xlstm_jax.train.tokenizer import ByteTokenizer

    if spec == "bytes":
        return ByteTokenizer()
    if spec is None:
        if model_dir is not None and os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):
            return HFTokenizer(model_dir, add_bos=add_bos)
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise ValueError(f"tokenizer {spec!r} is neither 'bytes' nor an existing tokenizer.json or directory")
    return HFTokenizer(spec, add_bos=add_bos)


class StreamDecoder:
    """Turns a growing list of token ids into text increments for printing as tokens arrive.

    ``feed(ids)`` returns the text added by ``ids``; text that may still change (an incomplete UTF-8
    sequence, shown as U+FFFD) is held back until the next call or ``flush()``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def _text(self) -> str:
        return self.tokenizer.decode(np.asarray(self.ids, np.int64))

    def feed(self, ids: Iterable[int]) -> str:
        """Append ``ids``; return the newly final text."""
        self.ids.extend(int(i) for i in ids)
        text = self._text()
        stable = len(text.rstrip("\ufffd"))
        new = text[self.shown:stable] if stable > self.shown else ""
        self.shown = max(self.shown, stable)
        return new

    def flush(self) -> str:
        """The rest of the text (including any trailing replacement characters)."""
        text = self._text()
        new = text[self.shown:]
        self.shown = len(text)
        return new
