"""Reconnect delays: exponential backoff with full jitter, so a fleet does not reconnect in lockstep.

paho's own reconnect doubles its delay with no jitter: after a broker restart every device comes back
at the same instant. Full jitter (a uniform draw in [0, min(cap, base * 2^n)]) spreads them out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next try; each call widens the window until cap_s."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
