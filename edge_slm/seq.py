"""The per-device sequence number: monotonic across restarts and crashes, cheap per message.

Standard library only.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from edge_slm.errors import ConfigError

# Reserving blocks means one fsync per BLOCK messages. After a crash the counter resumes at the
# end of the reserved block, so receivers see a gap (never a repeat); a clean stop leaves no gap.
BLOCK = 256


class SeqCounter:
    """Hands out 1, 2, 3, ... ; the file holds the first number not yet safe to reuse."""

    def __init__(self, path: Path, block: int = BLOCK) -> None:
        self.path = Path(path)
        self.block = block
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {self.path.parent} cannot be created: {exc.strerror}") from exc
        self._next = self._read()
        self._reserved = self._next
        self._reserve(self._next + block)

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 1
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read sequence file {self.path}: {exc}") from exc
        if not text.isdigit():
            raise ConfigError(f"sequence file {self.path} is corrupt ({text[:20]!r}); delete it to restart at 1")
        return max(1, int(text))

    def _reserve(self, upto: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(str(upto))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The rename is only durable once the directory is synced; without it a power cut could
        # bring back the previous (lower) reservation and numbers would repeat.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._reserved = upto

    def next(self) -> int:
        with self._lock:
            if self._next >= self._reserved:
                self._reserve(self._next + self.block)
            value = self._next
            self._next += 1
            return value

    def close(self) -> None:
        """Record exactly where we stopped, so a clean restart continues without a gap."""
        with self._lock:
            self._reserve(self._next)
