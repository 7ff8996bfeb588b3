"""A serial link that sends and receives protocol frames and survives the port going away.

Uses pyserial (any serial_for_url URL) and firmware_bridge.protocol; must never import TensorFlow.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import threading
from collections.abc import Callable

import serial

from edge_slm.errors import ConfigError, FrameError
from firmware_bridge.protocol import Frame, FrameDecoder, MsgType, encode_frame

__all__ = ["SerialLink"]

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.1  # bounds how long close() and a writer-detected failure wait for the reader
KNOWN_TYPES = frozenset(int(t) for t in MsgType)

_OPEN_HINTS = {
    errno.ENOENT: "the device does not exist: check it is plugged in and the path "
    "(ls /dev/ttyUSB* /dev/ttyACM*)",
    errno.EACCES: "permission denied: add your user to the dialout group "
    "(sudo usermod -aG dialout $USER) and log in again",
    errno.EPERM: "permission denied: add your user to the dialout group "
    "(sudo usermod -aG dialout $USER) and log in again",
    errno.EBUSY: "the port is busy: close the other program using it (screen, minicom, a monitor)",
    errno.ECONNREFUSED: "connection refused: check the host and port and that the server is running",
}


def _open_error(url: str, exc: BaseException) -> ConfigError:
    code = getattr(exc, "errno", None)
    hint = _OPEN_HINTS.get(
        code, "check the port name or URL (e.g. /dev/ttyUSB0, socket://host:port)"
    )
    return ConfigError(f"cannot open serial port {url!r}: {hint} ({exc})")


class SerialLink:
    """Frames over one serial port: a reader thread decodes, send() encodes; reopens on unplug.

    Frames of known types go to on_frame if given, else onto a queue read with get(). A read or
    write failure closes the port; the reader reopens it with exponential backoff plus jitter.
    With wait_for_device=True a port that cannot be opened yet is retried the same way instead of
    raising ConfigError (a malformed URL still raises).
    """

    def __init__(
        self,
        url: str,
        baudrate: int = 115200,
        on_frame: Callable[[Frame], None] | None = None,
        reopen_min_s: float = 0.2,
        reopen_max_s: float = 5.0,
        queue_size: int = 4096,
        wait_for_device: bool = False,
    ) -> None:
        if reopen_min_s <= 0 or reopen_max_s < reopen_min_s:
            raise ConfigError(
                f"reopen_min_s={reopen_min_s} and reopen_max_s={reopen_max_s}: "
                "need 0 < reopen_min_s <= reopen_max_s"
            )
        self.url = url
        self.baudrate = baudrate
        self._on_frame = on_frame
        self._reopen_min_s = reopen_min_s
        self._reopen_max_s = reopen_max_s
        self._decoder = FrameDecoder()
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=queue_size)
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._broken = threading.Event()  # set by a failed write; only the reader closes/reopens
        self._seq = 0
        self._stats = {
            "bytes_in": 0,
            "bytes_out": 0,
            "frames_in": 0,
            "frames_out": 0,
            "unknown_types": 0,
            "dropped": 0,
            "reopens": 0,
        }
        try:
            self._port: serial.SerialBase | None = self._open()
        except ValueError as exc:  # pyserial's answer to an unknown URL scheme or bad baudrate
            raise ConfigError(f"invalid serial port {url!r} or baudrate {baudrate}: {exc}") from exc
        except (serial.SerialException, OSError) as exc:
            if not wait_for_device:
                raise _open_error(url, exc) from exc
            # not plugged in yet: the reader thread keeps trying with backoff, send() raises meanwhile
            log.warning("%s; waiting for it to appear", _open_error(url, exc))
            self._port = None
        self._thread = threading.Thread(target=self._run, name=f"SerialLink({url})", daemon=True)
        self._thread.start()

    def _open(self) -> serial.SerialBase:
        return serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=READ_TIMEOUT_S)

    def send(self, msg_type: int, payload: bytes = b"") -> int:
        """Encode and write one frame; return its seq. Raises FrameError while the port is down."""
        with self._write_lock:
            seq = self._seq
            data = encode_frame(msg_type, seq, payload)
            port = self._port
            if port is None or self._broken.is_set():
                raise FrameError(
                    f"serial port {self.url!r} is not open (reconnecting); frame not sent"
                )
            try:
                port.write(data)
            except (serial.SerialException, OSError) as exc:
                self._broken.set()
                raise FrameError(
                    f"writing to serial port {self.url!r} failed ({exc}); reconnecting"
                ) from exc
            # seq advances only for frames actually written, so the peer sees no gaps from our outages
            self._seq = (seq + 1) & 0xFFFF
            self._stats["bytes_out"] += len(data)
            self._stats["frames_out"] += 1
            return seq

    def get(self, timeout: float | None = None) -> Frame | None:
        """Next received frame (only when no on_frame callback was given); None on timeout."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def counters(self) -> dict[str, int | bool]:
        """Decoder counters plus link traffic, reopens and whether the port is open right now."""
        out: dict[str, int | bool] = dict(vars(self._decoder.counters))
        out.update(self._stats)
        out["open"] = self._port is not None and not self._broken.is_set()
        return out

    def close(self) -> None:
        """Stop the reader thread and close the port; idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * READ_TIMEOUT_S + self._reopen_max_s)
        self._close_port()

    def __enter__(self) -> SerialLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_port(self) -> None:
        with self._write_lock:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass  # the device is already gone; nothing left to release

    def _run(self) -> None:
        while not self._stop.is_set():
            port = self._port
            if port is None or self._broken.is_set():
                if port is not None:
                    log.warning("serial port %s lost; reopening", self.url)
                    self._close_port()
                self._reopen()
                continue
            try:
                data = port.read(port.in_waiting or 1)
            except (serial.SerialException, OSError, TypeError) as exc:
                # TypeError: pyserial's socket handler reads a None socket after a concurrent close
                log.warning("serial port %s read failed: %s", self.url, exc)
                self._broken.set()
                continue
            if data:
                self._stats["bytes_in"] += len(data)
                for frame in self._decoder.feed(data):
                    self._deliver(frame)

    def _reopen(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            # full jitter on the upper half keeps many links from retrying in lockstep
            delay = min(self._reopen_max_s, self._reopen_min_s * 2**attempt)
            if self._stop.wait(delay * random.uniform(0.5, 1.0)):
                return
            try:
                port = self._open()
            except (serial.SerialException, OSError, ValueError) as exc:
                attempt = min(attempt + 1, 30)
                log.debug("reopening %s failed: %s", self.url, exc)
                continue
            # a partial frame from before the outage must not be glued to the first new bytes
            self._decoder.feed(b"\x00")
            with self._write_lock:
                self._port = port
                self._broken.clear()
            self._stats["reopens"] += 1
            log.info("serial port %s reopened after %d failed attempts", self.url, attempt)
            return

    def _deliver(self, frame: Frame) -> None:
        if frame.msg_type not in KNOWN_TYPES:
            self._stats["unknown_types"] += 1  # PROTOCOL.md 4: newer firmware may add types
            return
        self._stats["frames_in"] += 1
        if self._on_frame is not None:
            try:
                self._on_frame(frame)
            except Exception:  # a bug in the callback must not kill the reader thread
                log.exception("on_frame callback failed for %s", frame)
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._stats["dropped"] += 1
