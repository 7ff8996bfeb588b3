"""Agent health numbers for the `metrics` topic: counts, latency percentiles, RSS, uptime.

Standard library and numpy only; cheap enough to update on every inference.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np

WINDOW = 1000  # latencies kept per pipeline for the percentiles


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    """Thread-safe counters per pipeline; snapshot() is what the agent publishes."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._latency: dict[str, deque[float]] = {}

    def record(self, pipeline: str, kind: str, latency_ms: float | None = None) -> None:
        with self._lock:
            c = self._counts.setdefault(pipeline, {"results": 0, "errors": 0})
            c["results" if kind == "result" else "errors"] += 1
            if latency_ms is not None:
                self._latency.setdefault(pipeline, deque(maxlen=WINDOW)).append(latency_ms)

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            pipelines = {}
            for name, c in self._counts.items():
                lat = np.asarray(self._latency.get(name, ()), dtype=np.float64)
                pipelines[name] = {
                    "inferences": c["results"],
                    "errors": c["errors"],
                    "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                    "latency_ms_p95": round(float(np.percentile(lat, 95)), 3) if lat.size else None,
                }
        snap = {
            "schema_version": 1,
            "ts": round(time.time(), 3),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "rss_bytes": rss_bytes(),
            "pipelines": pipelines,
            "inferences": sum(p["inferences"] for p in pipelines.values()),
            "errors": sum(p["errors"] for p in pipelines.values()),
        }
        snap.update(extra or {})
        return snap
