"""Host-side session with one microcontroller: hello handshake, commands with acks, heartbeats, logs,
and sensor/audio frames turned into edge_slm.streams blocks. Never imports TensorFlow.

Transport is a SerialLink (or any object with send/get/counters/close); this module adds meaning.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge_slm.errors import ConfigError, EdgeSlmError, FrameError
from edge_slm.streams import AudioBlock, SensorBlock
from firmware_bridge.link import SerialLink
from firmware_bridge.protocol import (
    AckStatus,
    Frame,
    Hello,
    LogLevel,
    MsgType,
    StreamKind,
    pack_command,
    unpack_ack,
    unpack_audio_chunk,
    unpack_heartbeat,
    unpack_hello,
    unpack_log,
    unpack_sensor_samples,
)

__all__ = ["Ack", "Counters", "FrameLink", "McuSession", "link_from_url"]

log = logging.getLogger(__name__)
device_log = logging.getLogger("firmware_bridge.device")

_LOG_LEVELS = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}
# Longest run of lost sensor samples filled with NaN; a longer jump in device time is a new
# segment (the stream was stopped and started again), not a loss.
MAX_FILL_S = 5.0


class FrameLink(Protocol):
    """What McuSession needs from a transport; SerialLink (created without on_frame) is one."""

    def send(self, msg_type: int, payload: bytes = b"") -> int: ...

    def get(self, timeout: float | None = None) -> Frame | None: ...

    def counters(self) -> dict[str, int | bool]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Ack:
    """The device's answer to one command."""

    command: str
    seq: int  # seq of the command frame that was acked
    status: int  # AckStatus
    attempts: int
    rtt_s: float

    @property
    def ok(self) -> bool:
        return self.status == AckStatus.OK


class Counters(dict):
    """A plain dict of counters that can also be called, like SerialLink.counters()."""

    def __call__(self) -> Counters:
        return self


def link_from_url(url: str, **link_kwargs: Any) -> SerialLink:
    """SerialLink from `serial:///dev/ttyUSB0?baud=921600`, `socket://host:port`, `loop://` or a path.

    link_kwargs go to SerialLink (e.g. wait_for_device=True, reopen_max_s=2.0).
    """
    parsed = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parsed.query)
    unknown = set(query) - {"baud"}
    if parsed.scheme == "serial":
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)} in {url!r}; only baud= is understood")
        if not parsed.path:
            raise ConfigError(f"{url!r} names no device; write serial:///dev/ttyUSB0?baud=921600")
        baud = query.get("baud", ["115200"])[-1]
        try:
            link_kwargs.setdefault("baudrate", int(baud))
        except ValueError as exc:
            raise ConfigError(f"baud={baud!r} in {url!r} is not an integer") from exc
        return SerialLink(parsed.path, **link_kwargs)
    return SerialLink(url, **link_kwargs)  # pyserial URLs (socket://, rfc2217://, loop://) and plain paths


class McuSession:
    """One conversation with a device over a FrameLink; a thread reads frames and calls back.

    on_block(block) gets SensorBlock / AudioBlock; on_event(kind, data) gets "hello", "log",
    "heartbeat", "gap", "stale", "alive", "reconnect", "bad_payload". Both run on the session
    thread: keep them short and never call command() from them (it would wait on itself).
    """

    def __init__(
        self,
        link: FrameLink,
        on_block: Callable[[AudioBlock | SensorBlock], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        stale_after_s: float = 3.0,
        hello_retry_s: float = 0.5,
        owns_link: bool = False,
    ) -> None:
        if stale_after_s <= 0 or hello_retry_s <= 0:
            raise ConfigError(f"stale_after_s={stale_after_s} and hello_retry_s={hello_retry_s} must be positive seconds")
        self.link = link
        self.on_block = on_block
        self.on_event = on_event
        self.stale_after_s = stale_after_s
        self.hello_retry_s = hello_retry_s
        self._owns_link = owns_link
        self.capabilities: Hello | None = None
        self.stream = ""  # changes with every new device boot or reconnect
        self.last_heartbeat: dict[str, int] = {}
        self._cond = threading.Condition()
        self._acks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream_count = 0
        self._last_seq: int | None = None
        self._last_rx = 0.0
        self._alive = False
        self._reopens = 0
        self._need_new_stream = True
        self._hello_asked = 0.0
        self._sensor_next_us: dict[int, float] = {}  # channels -> expected timestamp of the next sample
        self._gap_since_sensor = False
        self._gap_since_audio = False
        self._audio_next_s: float | None = 0.0  # stream time of the next audio sample; None once unknown
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "frames", "hellos", "streams", "sensor_blocks", "audio_blocks", "sensor_samples", "audio_samples",
                "nan_samples", "lost_frames", "gaps", "audio_gaps", "logs", "heartbeats", "acks",
                "commands", "command_retries", "command_timeouts", "bad_payloads", "before_hello",
                "reconnects", "stale",
            ),
            0,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        on_block: Callable[[AudioBlock | SensorBlock], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        wait_for_device: bool = True,
        **session_kwargs: Any,
    ) -> McuSession:
        """Open a SerialLink from a URL (see link_from_url); stop() closes it.

        With wait_for_device (default) a device that is not plugged in yet is waited for: start()
        then raises after its timeout but the session keeps trying until stop().
        """
        link = link_from_url(url, wait_for_device=wait_for_device)
        return cls(link, on_block=on_block, on_event=on_event, owns_link=True, **session_kwargs)

    # --- public API ---------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> Hello:
        """Start the reader thread, ask for the device's hello, and wait for it (FrameError on timeout)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="McuSession", daemon=True)
            self._thread.start()
        return self.wait_hello(timeout)

    def wait_hello(self, timeout: float = 5.0) -> Hello:
        """Block until capabilities are known; the reader thread re-asks every hello_retry_s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.capabilities is None or self._need_new_stream:
                left = deadline - time.monotonic()
                if left <= 0:
                    port = "" if self.link.counters().get("open", True) else " (the port is not open yet)"
                    raise FrameError(
                        f"no hello from the device within {timeout:.1f} s{port}: check the port, the baud rate "
                        "and that the firmware speaks the edge-slm protocol"
                    )
                self._cond.wait(min(left, 0.1))
            return self.capabilities

    def stop(self) -> None:
        """Stop the reader thread (and close the link when the session opened it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._owns_link:
            self.link.close()

    def __enter__(self) -> McuSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(
        self,
        name: str,
        args: dict[str, object] | None = None,
        timeout: float = 1.0,
        retries: int = 2,
        check: bool = True,
    ) -> Ack:
        """Send a command and wait for its ack, resending up to `retries` times on timeout.

        Raises FrameError when no ack came, or (check=True) when the device refused it.
        """
        if self._thread is not None and threading.current_thread() is self._thread:
            raise FrameError("command() called from an on_block/on_event callback; call it from another thread")
        payload = pack_command(name, args)
        sent: list[int] = []  # a late ack of an earlier attempt counts too
        for attempt in range(1, retries + 2):
            started = time.monotonic()
            try:
                seq = self.link.send(MsgType.COMMAND, payload)
            except FrameError:
                if attempt > retries:
                    raise
                time.sleep(timeout)  # the port is reconnecting; try again after a while
                continue
            sent.append(seq)
            self._counters["commands"] += 1
            if attempt > 1:
                self._counters["command_retries"] += 1
            with self._cond:
                self._cond.wait_for(lambda: any(s in self._acks for s in sent), timeout)
                acked = next((s for s in sent if s in self._acks), None)
                status = self._acks.pop(acked) if acked is not None else None
            if status is not None:
                ack = Ack(name, acked, status, attempt, time.monotonic() - started)
                if check and not ack.ok:
                    reason = AckStatus(status).name.lower() if status in AckStatus._value2member_map_ else status
                    raise FrameError(f"device refused command {name!r} {args or {}}: {reason}")
                return ack
        self._counters["command_timeouts"] += 1
        raise FrameError(
            f"no ack for command {name!r} after {retries + 1} tries of {timeout:.1f} s; is the device connected?"
        )

    @property
    def last_seq(self) -> int | None:
        """Seq of the last frame received from the device (None before the first, and after a reconnect)."""
        return self._last_seq

    @property
    def alive(self) -> bool:
        """True while frames keep arriving (at most stale_after_s apart)."""
        return self._alive and time.monotonic() - self._last_rx <= self.stale_after_s

    @property
    def counters(self) -> Counters:
        """Session counters, the device's last heartbeat (device_*) and the link's (link_*).

        A fresh dict each time; `session.counters()` works too.
        """
        out = Counters(self._counters)
        out.update({f"device_{k}": v for k, v in self.last_heartbeat.items()})
        out.update({f"link_{k}": v for k, v in self.link.counters().items()})
        out["alive"] = self.alive
        return out

    # --- reader thread ------------------------------------------------------------------------

    def _emit(self, kind: str, **data: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, data)
            except Exception:  # a bug in the callback must not stop the session
                log.exception("on_event callback failed for %s", kind)

    def _deliver(self, block: AudioBlock | SensorBlock) -> None:
        if self.on_block is not None:
            try:
                self.on_block(block)
            except Exception:
                log.exception("on_block callback failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._maintain()
            try:
                frame = self.link.get(timeout=0.05)
            except EdgeSlmError as exc:  # a transport with its own failure modes; keep going
                log.warning("link read failed: %s", exc)
                continue
            if frame is not None:
                self._handle(frame)

    def _maintain(self) -> None:
        now = time.monotonic()
        reopens = int(self.link.counters().get("reopens", 0))
        if reopens != self._reopens:  # the port came back: the device may have rebooted
            self._reopens = reopens
            self._counters["reconnects"] += 1
            self._last_seq = None  # frames lost while the port was down are not counted as gaps
            self._lose_continuity()
            self._need_new_stream = True
            self._hello_asked = 0.0
            self._emit("reconnect", reopens=reopens)
        if self._alive and now - self._last_rx > self.stale_after_s:
            self._alive = False
            self._counters["stale"] += 1
            self._emit("stale", silent_s=now - self._last_rx)
        if (self.capabilities is None or self._need_new_stream) and now - self._hello_asked >= self.hello_retry_s:
            self._hello_asked = now
            try:
                self.link.send(MsgType.HELLO)
            except FrameError:
                pass  # port down; the next retry asks again

    def _lose_continuity(self) -> None:
        self._sensor_next_us.clear()
        self._audio_next_s = 0.0

    def _handle(self, frame: Frame) -> None:
        self._counters["frames"] += 1
        self._last_rx = time.monotonic()
        if not self._alive:
            self._alive = True
            self._emit("alive", seq=frame.seq)
        try:
            hello = unpack_hello(frame.payload) if frame.msg_type == MsgType.HELLO else None
        except FrameError as exc:
            self._bad_payload(frame, exc)
            hello = None
        lost = 0
        rebooted = hello is not None and self.capabilities is not None and hello.boot_id != self.capabilities.boot_id
        if self._last_seq is not None and not rebooted:  # a rebooted device starts its seq afresh
            lost = (frame.seq - self._last_seq - 1) & 0xFFFF
            if lost:
                self._counters["lost_frames"] += lost
                self._counters["gaps"] += 1
                self._emit("gap", first_seq=(self._last_seq + 1) & 0xFFFF, missing=lost)
                # the lost frames may have been samples; the next sensor/audio frame finds out
                self._gap_since_sensor = self._gap_since_audio = True
        self._last_seq = frame.seq
        try:
            if hello is not None:
                self._on_hello(hello)
            elif frame.msg_type == MsgType.ACK:
                acked, status = unpack_ack(frame.payload)
                self._counters["acks"] += 1
                with self._cond:
                    self._acks[acked] = status
                    if len(self._acks) > 256:  # acks nobody waits for (late duplicates)
                        self._acks.pop(next(iter(self._acks)))
                    self._cond.notify_all()
            elif frame.msg_type == MsgType.LOG:
                rec = unpack_log(frame.payload)
                self._counters["logs"] += 1
                device_log.log(_LOG_LEVELS.get(rec.level, logging.INFO), "%s: %s", self._device_name(), rec.text)
                self._emit("log", level=int(rec.level), text=rec.text)
            elif frame.msg_type == MsgType.HEARTBEAT:
                hb = unpack_heartbeat(frame.payload)
                self._counters["heartbeats"] += 1
                self.last_heartbeat = dict(vars(hb))
                self._emit("heartbeat", **self.last_heartbeat)
            elif frame.msg_type == MsgType.SENSOR_SAMPLES:
                self._on_sensor(frame)
            elif frame.msg_type == MsgType.AUDIO_CHUNK:
                self._on_audio(frame)
        except FrameError as exc:
            self._bad_payload(frame, exc)

    def _bad_payload(self, frame: Frame, exc: FrameError) -> None:
        # a CRC-valid frame with a payload this host cannot read: newer firmware, or a firmware bug
        self._counters["bad_payloads"] += 1
        log.warning("dropping frame of type %#04x seq %d: %s", frame.msg_type, frame.seq, exc)
        self._emit("bad_payload", seq=frame.seq, error=str(exc))

    def _device_name(self) -> str:
        return self.capabilities.device_name if self.capabilities else self.link.__class__.__name__

    def _on_hello(self, hello: Hello) -> None:
        self._counters["hellos"] += 1
        with self._cond:
            new = self._need_new_stream or self.capabilities is None or hello.boot_id != self.capabilities.boot_id
            if new or hello != self.capabilities:
                self._lose_continuity()
            self.capabilities = hello
            if new:
                self._stream_count += 1
                self._counters["streams"] += 1
                self.stream = f"{hello.device_name}/{hello.boot_id:08x}/{self._stream_count}"
            self._need_new_stream = False
            self._cond.notify_all()
        self._emit("hello", hello=hello, stream=self.stream, new_stream=new)

    def _on_sensor(self, frame: Frame) -> None:
        data = unpack_sensor_samples(frame.payload)
        caps = self.capabilities
        info = caps.stream(StreamKind.SENSOR, data.channels) if caps else None
        if caps is None or self._need_new_stream:
            self._counters["before_hello"] += 1  # no scale yet; the hello is on its way
            return
        n, ch = data.samples.shape
        values = data.samples.astype(np.float32)
        if info is not None and data.samples.dtype == np.int16:
            values *= np.asarray(info.scales, dtype=np.float32)
        names = info.channels if info is not None else ()
        rate = float(data.sample_rate_hz)
        t_us = float(data.timestamp_us)
        expected = self._sensor_next_us.get(ch)
        lost, self._gap_since_sensor = self._gap_since_sensor, False
        if lost and expected is not None and rate > 0:
            missing = int(round((t_us - expected) * rate / 1e6))
            if 0 < missing <= MAX_FILL_S * rate:  # the lost frames held these samples: say so with NaN
                values = np.concatenate([np.full((missing, ch), np.nan, np.float32), values])
                t_us = expected
                self._counters["nan_samples"] += missing * ch
        self._sensor_next_us[ch] = float(data.timestamp_us) + n * 1e6 / rate if rate > 0 else float(data.timestamp_us)
        if rate <= 0:
            self._counters["bad_payloads"] += 1
            return
        self._counters["sensor_blocks"] += 1
        self._counters["sensor_samples"] += n
        self._deliver(SensorBlock(values, rate, channels=names, t0=t_us / 1e6, stream=self.stream, units="si"))

    def _on_audio(self, frame: Frame) -> None:
        chunk = unpack_audio_chunk(frame.payload)
        if self.capabilities is None or self._need_new_stream:
            self._counters["before_hello"] += 1
            return
        if chunk.sample_rate <= 0 or chunk.samples.size == 0:
            self._counters["bad_payloads"] += int(chunk.sample_rate <= 0)
            return
        lost, self._gap_since_audio = self._gap_since_audio, False
        if lost and self._audio_next_s is not None:
            # Audio chunks carry no timestamp (v1), so how much audio lost frames held is unknown:
            # blocks after the gap have t0=None (unknown) until the next stream, and the gap is counted.
            self._counters["audio_gaps"] += 1
            self._audio_next_s = None
        t0 = self._audio_next_s
        if t0 is not None:
            self._audio_next_s = t0 + chunk.samples.size / chunk.sample_rate
        self._counters["audio_blocks"] += 1
        self._counters["audio_samples"] += int(chunk.samples.size)
        samples = chunk.samples.astype(np.float32) / 32768.0
        self._deliver(AudioBlock(samples, chunk.sample_rate, t0=t0, stream=self.stream))
