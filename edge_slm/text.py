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
        # The tokenizer's own padding setting wins; else the usual BERT / sentencepiece pad tokens.
        padding = tokenizer.padding
        pad_id = padding["pad_id"] if padding else None
        for token in ("[PAD]", "<pad>"):
            if pad_id is None:
                pad_id = tokenizer.token_to_id(token)
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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
            raise InputError("bad_encoding", f"input text has an unpaired surrogate at {exc.start}") from exc
        ids = self.tokenizer.encode(text).ids
        truncated = len(ids) > self.max_length
        ids = ids[: self.max_length]
        out = np.full((1, self.max_length), self.pad_id, dtype=np.int32)
        out[0, : len(ids)] = ids
        return out, truncated

    def encode_with_mask(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(ids (1, max_length) int32, attention mask (1, max_length) int32, truncated).

        Uses the tokenizer's own truncation, so special tokens a post-processor adds ([CLS] ... [SEP])
        survive truncation as they do in transformers.
        """
        if not text.strip():
            raise InputError("empty_input", "input text is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError("bad_encoding", f"input text has an unpaired surrogate at {exc.start}") from exc
        ids, mask, truncated = self._encode_masked([text])
        return ids, mask, bool(truncated[0])

    def encode_batch_with_mask(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, max_length) ids and masks for training and evaluation; same rules as encode_with_mask()."""
        ids, mask, _ = self._encode_masked(list(texts))
        return ids, mask

    def _encode_masked(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        self.tokenizer.enable_truncation(self.max_length)
        try:
            encodings = self.tokenizer.encode_batch(texts)
        finally:
            self.tokenizer.no_truncation()
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), self.max_length), dtype=np.int32)
        truncated = []
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[i, :n] = enc.ids
            mask[i, :n] = 1
            truncated.append(bool(enc.overflowing))
        return ids, mask, truncated

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """(N, max_length) int32 ids for training and evaluation; same rules as encode()."""
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = enc.ids[: self.max_length]
            out[i, : len(ids)] = ids
        return out
