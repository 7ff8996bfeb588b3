"""Next-token choice for text generation: greedy, temperature, top-k, top-p, seeded. numpy only.

Written by hand (a few lines of numpy) because the device must not pull in a framework for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_slm.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> SamplingParams:
        if not (0.0 <= self.temperature <= 10.0):
            raise InputError("bad_request", "temperature must be between 0 and 10")
        if self.top_k < 0:
            raise InputError("bad_request", "top_k must be >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError("bad_request", "top_p must be in (0, 1]")
        return self


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from a (vocab,) float array of logits."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits / params.temperature
    if params.top_k and params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - np.max(z)
    probs = np.exp(z)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
