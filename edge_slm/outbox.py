"""The durable outbox: result and error records wait in SQLite until the broker acknowledges them.

Standard library only; the sender drives an MqttLink it is handed and never imports paho or TensorFlow.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_slm.errors import BrokerError, ConfigError, EdgeSlmError

if TYPE_CHECKING:
    from edge_slm.mqtt import MqttLink

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
OVERFLOW_POLICIES = ("drop_oldest", "reject_new")
SYNC_MODES = ("normal", "full")
# Acked rows are deleted in one transaction once half a window of them is in, or this long after the
# first of them arrived: bounded delay, few transactions.
SETTLE_S = 0.005


def outbox_path(state_dir: str | Path, device_id: str) -> Path:
    return Path(state_dir) / f"{device_id}.outbox.sqlite"


@dataclass(frozen=True)
class Row:
    """One record waiting for its PUBACK; id orders rows (oldest first) across restarts."""

    id: int
    ts: float
    topic: str
    payload: bytes


class Outbox:
    """An ordered on-disk queue bounded by bytes and age; a row leaves by ack(), by expiry or by overflow.

    A row is *accepted* once put() returns True: its INSERT is committed to the WAL. With
    sync="normal" that survives the process being killed; with sync="full" also a power cut.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 24 * 3600.0,
        overflow: str = "drop_oldest",
        sync: str = "normal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"outbox.overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
        if sync not in SYNC_MODES:
            raise ConfigError(f"outbox.sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.overflow = overflow
        self.sync = sync
        self._clock = clock
        self._lock = threading.Lock()
        self.on_put: Callable[[Row], None] | None = None  # the sender's, called after each accepted put
        self._dropped = {"overflow": 0, "expired": 0}
        self._rejected = 0
        self._acked = 0
        self._full_warned = False
        self._drop_warned = False
        self._db = self._open()
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM outbox").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        # Ids come from this counter, not from SQLite: its default (largest id + 1) hands an id out
        # again once the newest rows are deleted, and the sender's cursor ("highest id handed over")
        # would then skip the new row. AUTOINCREMENT avoids that too, but writes sqlite_sequence's page
        # on every insert. Across a restart reuse is harmless: the new sender starts from id 0.
        self._next_id = int(row[2]) + 1
        self.expire()
        if self._depth:
            log.info("outbox %s holds %d records (%d bytes) from before; sending them again",
                     self.path, self._depth, self._bytes)

    def _open(self) -> sqlite3.Connection:
        hint = "move it away to start with an empty outbox (its unsent records are then lost)"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {self.path.parent} cannot be created: {exc.strerror}") from exc
        try:
            # One connection shared by the pipeline and sender threads, serialised by self._lock;
            # isolation_level=None so transactions are exactly the BEGIN/COMMIT written here.
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise ConfigError(f"outbox {self.path} cannot be opened ({exc}); check state_dir") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"outbox {self.path}: cannot use WAL mode (got {mode}); put state_dir on a local disk")
            db.execute(f"PRAGMA synchronous={self.sync.upper()}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute("BEGIN IMMEDIATE")
                db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, "
                           "ts REAL NOT NULL, size INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            elif version != SCHEMA_VERSION:
                raise ConfigError(f"outbox {self.path} has schema version {version}; this edge-slm reads "
                                  f"{SCHEMA_VERSION}: {hint}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise ConfigError(f"outbox {self.path} cannot be opened ({exc}); {hint}") from exc
        except ConfigError:
            db.close()
            raise
        return db

    def put(self, topic: str, payload: bytes) -> bool:
        """Append one record; False when the bound refuses it (counted as rejected).

        Raises EdgeSlmError when the disk refuses the write (full, read-only): nothing was stored.
        """
        size = len(topic.encode()) + len(payload)
        insert = "INSERT INTO outbox (id, ts, size, topic, payload) VALUES (?, ?, ?, ?, ?)"
        dropped = {"overflow": (0, 0), "expired": (0, 0)}
        with self._lock:
            if size > self.max_bytes:  # could never fit, whatever the policy drops
                return self._reject()
            try:
                ts, row_id = self._clock(), self._next_id
                if self._bytes + size <= self.max_bytes:  # the common case: one statement, its own transaction
                    self._db.execute(insert, (row_id, ts, size, topic, payload))
                else:
                    self._db.execute("BEGIN IMMEDIATE")
                    dropped["expired"] = self._delete_expired()
                    over = self._bytes - dropped["expired"][1] + size - self.max_bytes
                    if over > 0 and self.overflow == "reject_new":
                        self._db.execute("ROLLBACK")
                        return self._reject()
                    if over > 0:
                        dropped["overflow"] = self._delete_oldest(over)
                    self._db.execute(insert, (row_id, ts, size, topic, payload))
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise EdgeSlmError(f"outbox {self.path}: cannot store a record ({exc}); free space in state_dir") from exc
            # Counters change only once the transaction is committed.
            self._next_id += 1
            for reason, (n, nbytes) in dropped.items():
                self._dropped[reason] += n
                self._depth -= n
                self._bytes -= nbytes
            self._depth += 1
            self._bytes += size
            warn_drop = dropped["overflow"][0] > 0 and not self._drop_warned
            self._drop_warned |= warn_drop
            if self._bytes <= self.max_bytes // 2:  # a full spell is over: the next one warns again
                self._full_warned = self._drop_warned = False
        if warn_drop:  # once per full spell, not once per record
            log.warning("outbox %s is full (%d bytes): dropping the oldest records (overflow=drop_oldest)",
                        self.path, self.max_bytes)
        on_put = self.on_put
        if on_put is not None:
            on_put(Row(row_id, ts, topic, payload))
        return True

    def _reject(self) -> bool:
        self._rejected += 1
        if not self._full_warned:  # once per full spell, not once per record
            self._full_warned = True
            log.warning("outbox %s is full (%d of %d bytes): rejecting new records (overflow=reject_new)",
                        self.path, self._bytes, self.max_bytes)
        return False

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction was open

    def _delete_oldest(self, need: int) -> tuple[int, int]:
        """Inside a transaction: delete the oldest rows until `need` bytes are free; (rows, bytes)."""
        n = freed = 0
        last = None
        for row_id, size in self._db.execute("SELECT id, size FROM outbox ORDER BY id"):
            n, freed, last = n + 1, freed + size, row_id
            if freed >= need:
                break
        if last is not None:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (last,))
        return n, freed

    def _delete_expired(self) -> tuple[int, int]:
        """Inside a transaction: delete the run of oldest rows older than max_age_s; (rows, bytes).

        Only a prefix in id order goes, so the queue stays in order even if the wall clock stepped back.
        """
        cutoff = self._clock() - self.max_age_s
        n = freed = 0
        last = None
        for row_id, ts, size in self._db.execute("SELECT id, ts, size FROM outbox ORDER BY id"):
            if ts >= cutoff:
                break
            n, freed, last = n + 1, freed + size, row_id
        if last is not None:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (last,))
        return n, freed

    def expire(self) -> int:
        """Drop records older than max_age_s (counted as expired); returns how many went."""
        with self._lock:
            if not self._depth:
                return 0
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n, freed = self._delete_expired()
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise EdgeSlmError(f"outbox {self.path}: cannot delete expired records ({exc})") from exc
            self._dropped["expired"] += n
            self._depth -= n
            self._bytes -= freed
        if n:
            log.warning("outbox: dropped %d records older than %.0fs (outbox.max_age_s)", n, self.max_age_s)
        return n

    def read(self, after_id: int, limit: int) -> list[Row]:
        """Up to `limit` rows with id > after_id, oldest first."""
        with self._lock:
            try:
                cur = self._db.execute("SELECT id, ts, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                       (after_id, limit))
                return [Row(i, ts, topic, bytes(payload)) for i, ts, topic, payload in cur]
            except sqlite3.Error as exc:
                raise EdgeSlmError(f"outbox {self.path}: cannot read records ({exc})") from exc

    def ack(self, ids: list[int]) -> int:
        """The broker has these rows: delete them (ids already dropped are ignored); returns rows deleted."""
        if not ids:
            return 0
        deleted = freed = 0
        with self._lock:
            try:
                if self.sync == "full":
                    # A delete lost to a power cut only means a duplicate, so it need not wait for an
                    # fsync; the next insert's fsync of the WAL makes it durable anyway.
                    self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    sizes = self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING size", chunk)
                    for (size,) in sizes.fetchall():
                        deleted += 1
                        freed += size
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise EdgeSlmError(f"outbox {self.path}: cannot delete acknowledged records ({exc})") from exc
            finally:
                if self.sync == "full":
                    self._db.execute("PRAGMA synchronous=FULL")
            self._acked += len(ids)
            self._depth -= deleted
            self._bytes -= freed
        return deleted

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, Any]:
        """Numbers for the metrics message; counters are since this process opened the outbox."""
        with self._lock:
            return {
                "depth": self._depth,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "dropped": dict(self._dropped),
                "rejected": self._rejected,
                "acked": self._acked,
            }

    def close(self) -> None:
        """Close the database; rows still in it are sent again by the next Outbox on this path."""
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                log.exception("outbox %s: close failed", self.path)


@dataclass
class _InFlight:
    row_id: int
    ack_mark: int  # acks counted before publish() began: an ack numbered at or below this is not ours
    sent_at: float


class OutboxSender:
    """Publishes outbox rows in id order through an MqttLink, at most `window` unacknowledged, and
    deletes each row once its PUBACK arrives.

    A new row goes out from the putting thread when nothing older is waiting; otherwise (a backlog,
    a full window) the sender's thread sends it. paho keeps what it was handed across reconnects, so
    rows are handed over even while disconnected (up to the window) and a reconnect resends them; a
    restarted process sends every row still in the outbox again (at least once: `seq` spots repeats).
    """

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        *,
        window: int = 100,
        resend_after_s: float = 60.0,
        poll_s: float = 0.5,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window
        self.resend_after_s = resend_after_s
        self.poll_s = poll_s
        # Guards _inflight, _early, _ack_count, _acked_rows, _first_ack_at and _rewind_to (the paho thread
        # touches them); never held across publish() or SQLite.
        self._lock = threading.Lock()
        self._inflight: dict[int, _InFlight] = {}  # mid -> row handed to the link
        self._early: dict[int, int] = {}  # mid -> ack number, for acks that beat publish() returning
        self._ack_count = 0
        self._acked_rows: list[int] = []  # PUBACKed, to be deleted by the thread in one transaction
        self._first_ack_at = 0.0  # when _acked_rows last became non-empty
        self._sent = 0
        self._rewind_to: int | None = None  # set by a resend: move the cursor back to here
        # Held by whoever hands rows to the link (the sender thread, or a pipeline thread on the fast
        # path), so rows go out in id order; guards _cursor and _sent.
        self._send_lock = threading.Lock()
        self._cursor = 0  # the highest row id handed to the link
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected_since: float | None = None
        self._reconnects_seen = link.reconnects
        # Refill the window only once half of it is free: one read of many rows instead of one
        # SELECT and one thread wake-up per PUBACK.
        self._refill_at = max(1, window // 2)
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)

    def start(self) -> None:
        self.link.on_ack = self._on_ack
        self.outbox.on_put = self._on_put
        self._thread.start()

    def _on_put(self, row: Row) -> None:
        # The pipeline's thread, right after the row is committed. With nothing older still to send
        # and room in the window, hand it over here: no thread switch per result. Otherwise the
        # thread sends it in order; with less than _refill_at free, the ack that frees enough wakes it.
        busy = not self._send_lock.acquire(blocking=False)
        if not busy:
            try:
                with self._lock:
                    next_in_line = (self._rewind_to is None and self._cursor == row.id - 1
                                    and len(self._inflight) < self.window)
                if next_in_line and self._hand_over(row, time.monotonic()):
                    return
            finally:
                self._send_lock.release()
        if busy or self.window - len(self._inflight) >= self._refill_at:
            self._wake.set()

    def _on_ack(self, mid: int) -> None:
        # paho's network thread, under paho's message lock: no SQLite here. A DELETE per PUBACK made
        # here contended with the pipeline's INSERTs for the one connection (3,000 transactions for
        # 3,000 results instead of ~300); the thread deletes acked rows in batches (a crash in between
        # means duplicates, never loss).
        with self._lock:
            self._ack_count += 1
            entry = self._inflight.get(mid)
            # A mid is reused after 65535 publishes; only an ack counted after our publish() began is ours.
            if entry is None or self._ack_count <= entry.ack_mark:
                self._early[mid] = self._ack_count
                return
            del self._inflight[mid]
            self._acked_rows.append(entry.row_id)
            pending = len(self._acked_rows)
            if pending == 1:
                self._first_ack_at = time.monotonic()
            refill = len(self._inflight) == self.window - self._refill_at  # just crossed: room to refill
            wake = pending == 1 or pending >= self._refill_at or refill
        if wake:
            self._wake.set()

    def _settle(self, now: float | None = None) -> float:
        """Delete the rows acknowledged since the last pass, once there are enough of them or the first
        has waited SETTLE_S (given now); returns how long the pass may sleep before it must settle."""
        with self._lock:
            if not self._acked_rows:
                return self.poll_s
            if now is not None and len(self._acked_rows) < self._refill_at:
                left = SETTLE_S - (now - self._first_ack_at)
                if left > 0:
                    return left
            done, self._acked_rows = self._acked_rows, []
        try:
            self.outbox.ack(done)
        except Exception:
            with self._lock:  # the rows stay until a later pass manages to delete them
                self._acked_rows[:0] = done
            raise
        return self.poll_s

    def resend_unacked(self) -> None:
        """Forget every mid handed to the link and publish those rows again.

        Call it before anything else is published whenever paho's in-flight messages are lost (a new
        Client object): a new client reuses mids from 1, and a forgotten mid's ack must not delete a row.
        """
        self._rewind("asked to")
        self._wake.set()

    def _run(self) -> None:
        last_expiry = 0.0
        while not self._stop.is_set():
            # Cleared before the work, so a put or an ack during the work is not slept through.
            self._wake.clear()
            sleep = self.poll_s
            try:
                now = time.monotonic()
                if now - last_expiry >= 1.0:
                    last_expiry = now
                    self.outbox.expire()
                self._check_stale(now)
                self._fill_window(now)
                sleep = self._settle(now)
            except Exception:  # a full disk or a bug: the sender must outlive it, rows stay on disk
                log.exception("outbox sender failed; retrying in 1s")
                self._stop.wait(1.0)
            # Even after sending: a put during this pass has set _wake again, and when the window
            # filled up, the ack that frees half of it sets it. A second pass here would mostly find nothing.
            self._wake.wait(sleep)
        try:
            self._settle()  # what was acked before stopping need not be sent again
        except Exception:
            log.exception("outbox: could not delete the last acknowledged records; they are sent again")

    def _check_stale(self, now: float) -> None:
        if not self.link.connected:
            self._connected_since = None
            return
        # A drop and reconnect between two passes would not be seen by polling `connected` alone.
        if self._connected_since is None or self.link.reconnects != self._reconnects_seen:
            self._connected_since = now
            self._reconnects_seen = self.link.reconnects
        with self._lock:
            oldest = min((e.sent_at for e in self._inflight.values()), default=None)
        # Connected for resend_after_s and still no PUBACK: paho no longer holds the message
        # (a new client, a lost session); publish again rather than wait for a restart.
        if oldest is not None and now - max(oldest, self._connected_since) > self.resend_after_s:
            self._rewind(f"no ack for {self.resend_after_s:.0f}s, so")

    def _rewind(self, why: str) -> None:
        with self._lock:
            if not self._inflight:
                return
            first = min(e.row_id for e in self._inflight.values()) - 1
            n = len(self._inflight)
            self._inflight.clear()
            self._rewind_to = first if self._rewind_to is None else min(self._rewind_to, first)
        log.warning("outbox: %s resending %d unacknowledged records", why, n)

    def _fill_window(self, now: float) -> int:
        with self._send_lock:
            with self._lock:
                if self._rewind_to is not None:
                    self._cursor = min(self._cursor, self._rewind_to)
                    self._rewind_to = None
                room = self.window - len(self._inflight)
            if room < self._refill_at:
                return 0
            rows = self.outbox.read(self._cursor, room)
            sent = 0
            for row in rows:
                if not self._hand_over(row, now):
                    break
                sent += 1
            return sent

    def _hand_over(self, row: Row, now: float) -> bool:
        """Publish one row (the caller holds _send_lock); False when the rows after it must wait."""
        with self._lock:
            mark = self._ack_count
            if len(self._early) > 1000:  # acks of status/token publishes; none can be for a later publish
                self._early = {m: n for m, n in self._early.items() if n > mark}
        try:
            mid = self.link.publish(row.topic, row.payload)
        except BrokerError:
            return False  # paho's queue refused it (a mid still in use): try again on the next pass
        self._sent += 1
        with self._lock:
            number = self._early.pop(mid, None)
            lost = None
            if number is not None and number > mark:  # its PUBACK was handled before publish() returned
                self._acked_rows.append(row.id)
                if len(self._acked_rows) == 1:
                    self._first_ack_at = now
                self._wake.set()
            else:
                lost = self._inflight.pop(mid, None)
                self._inflight[mid] = _InFlight(row.id, mark, now)
        if lost is not None:
            # paho reuses a mid only once it has forgotten the message that had it: send that row again.
            self._cursor = min(self._cursor, lost.row_id - 1)
            return False
        self._cursor = row.id
        return True

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def stats(self) -> dict[str, Any]:
        return self.outbox.stats() | {"sent": self._sent, "inflight": self.inflight, "window": self.window}

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every row is acknowledged (or dropped by the bounds); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; unacknowledged rows stay in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.link.on_ack == self._on_ack:
            self.link.on_ack = None
        self.outbox.on_put = None
