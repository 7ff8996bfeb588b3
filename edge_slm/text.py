"""Text preprocessing shared by training (converters) and the device: tokenizer.json to fixed-length ids.

Imports numpy and tokenizers only; converters import this so training and device never drift.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_slm.errors import InputError, ModelError


class TextEncoder:
    """Turns text into a (1, max_length) int32 id array with the package's own tokenizer.

    Truncates to max_length tokens and pads with the tokenizer's pad id (0 when it has none).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        if max_length < 1:
            raise ModelError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad_id = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_length: int) -> TextEncoder:
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"tokenizer not found: {p}")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelError(f"{p}: not a valid tokenizer.json ({exc})") from exc
        return cls(tok, max_length)

    def encode(self, text: str) -> tuple[np.ndarray, bool]:
        """Return (ids of shape (1, max_length) int32, whether the text was truncated)."""
        if not text.strip():
            raise InputError("empty_input", "input text is empty")
        ids = self.tokenizer.encode(text).ids
        truncated = len(ids) > self.max_length
        ids = ids[: self.max_length]
        out = np.full((1, self.max_length), self.pad_id, dtype=np.int32)
        out[0, : len(ids)] = ids
        return out, truncated

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """(N, max_length) int32 ids for training and evaluation; same rules as encode()."""
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = enc.ids[: self.max_length]
            out[i, : len(ids)] = ids
        return out
