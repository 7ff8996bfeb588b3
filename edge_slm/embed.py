"""embedding on the device: a sentence vector, and intent matching against example phrases.

A sentence encoder becomes an intent recogniser with no training: each label's examples are embedded
once at start, an input takes the label of its most similar example. numpy + runtime + tokenizers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_slm import runtime
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.text import TextEncoder


class SentenceEmbedder:
    """text -> L2-normalised vector; with examples, also the best-matching label and its cosine."""

    def __init__(
        self,
        package: ModelPackage,
        model: runtime.Model,
        examples: dict[str, list[str]] | None = None,
        threshold: float = 0.0,
        include_embedding: bool | None = None,
        top_k: int = 3,
    ) -> None:
        self.package = package
        self.model = model
        if package.tokenizer_path is None:
            raise ModelError(f"{package.path}: embedding needs tokenizer.json")
        ids_info = model.inputs[0]
        max_length = int(package.preprocessing.get("max_length", ids_info.shape[-1]))
        self.encoder = TextEncoder.from_file(package.tokenizer_path, max_length)
        self.with_mask = len(model.inputs) == 2
        self.threshold = threshold
        self.top_k = top_k
        self.include_embedding = (not examples) if include_embedding is None else include_embedding
        self.labels: list[str] = []
        self.matrix = np.zeros((0, 0), dtype=np.float32)
        if examples:
            rows, labels = [], []
            for label, phrases in examples.items():
                if not phrases:
                    raise ModelError(f"examples for {label!r} are empty")
                for phrase in phrases:
                    rows.append(self.embed(phrase)[0])
                    labels.append(label)
            self.matrix = np.stack(rows)
            self.labels = labels

    def embed(self, text: str) -> tuple[np.ndarray, bool]:
        ids, mask, truncated = self.encoder.encode_with_mask(text)
        if self.with_mask:
            out = self.model.run_named(input_ids=ids, attention_mask=mask)
        else:
            out = self.model.run(ids)
        vec = out[0].reshape(-1).astype(np.float32)
        if not np.all(np.isfinite(vec)):
            raise InputError("inference_failed", "model produced a non-finite embedding")
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm > 0 else vec), truncated

    def __call__(self, text: str, params: dict[str, Any] | None = None, on_token: Any = None) -> dict[str, Any]:
        vec, truncated = self.embed(text)
        out: dict[str, Any] = {"dim": int(vec.size)}
        if self.labels:
            sims = self.matrix @ vec
            best: dict[str, float] = {}
            for label, s in zip(self.labels, sims):
                best[label] = max(best.get(label, -1.0), float(s))
            ranked = sorted(best.items(), key=lambda kv: -kv[1])
            label, score = ranked[0]
            out["label"] = label if score >= self.threshold else "unknown"
            out["score"] = round(score, 6)
            out["top"] = [{"label": k, "score": round(v, 6)} for k, v in ranked[: self.top_k]]
        if self.include_embedding:
            out["embedding"] = [round(float(x), 6) for x in vec]
        if truncated:
            out["truncated"] = True
        return out
