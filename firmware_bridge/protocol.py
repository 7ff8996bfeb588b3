"""The serial-bridge frame protocol (PROTOCOL.md): COBS framing, header, CRC-32, payload helpers.

Standard library and numpy only; must never import TensorFlow or pyserial (transport lives elsewhere).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from edge_slm.errors import FrameError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD",
    "MAX_ENCODED",
    "MsgType",
    "Frame",
    "FrameCounters",
    "FrameDecoder",
    "SensorSamples",
    "AudioChunk",
    "cobs_encode",
    "cobs_decode",
    "encode_frame",
    "pack_sensor_samples",
    "unpack_sensor_samples",
    "pack_audio_chunk",
    "unpack_audio_chunk",
    "pack_ack",
    "unpack_ack",
    "AckStatus",
    "StreamKind",
    "StreamInfo",
    "Hello",
    "CommandId",
    "Command",
    "LogLevel",
    "LogRecord",
    "Heartbeat",
    "pack_hello",
    "unpack_hello",
    "pack_command",
    "unpack_command",
    "pack_log",
    "unpack_log",
    "pack_heartbeat",
    "unpack_heartbeat",
]

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 1024
HEADER = struct.Struct("<BBHH")  # version, type, seq, payload length
CRC = struct.Struct("<I")
OVERHEAD = HEADER.size + CRC.size  # 10
MAX_RAW = OVERHEAD + MAX_PAYLOAD  # 1034
# Longest COBS body (delimiter excluded) of a legal frame: one code byte per started 254-byte block.
MAX_ENCODED = MAX_RAW + MAX_RAW // 254 + 1  # 1039


class MsgType(IntEnum):
    """Message types of protocol version 1; a decoder delivers unknown types, the link ignores them."""

    HELLO = 0x01
    SENSOR_SAMPLES = 0x02
    AUDIO_CHUNK = 0x03
    COMMAND = 0x04
    ACK = 0x05
    LOG = 0x06
    HEARTBEAT = 0x07


@dataclass(frozen=True)
class Frame:
    """One delivered frame: it COBS-decoded, its length field matched and its CRC matched."""

    msg_type: int
    seq: int
    payload: bytes
    version: int = PROTOCOL_VERSION


@dataclass
class FrameCounters:
    """Decoder statistics; resyncs is the number of rejected frames, the other errors say why."""

    frames: int = 0
    crc_errors: int = 0
    cobs_errors: int = 0
    length_errors: int = 0
    oversize: int = 0
    version_errors: int = 0
    resyncs: int = 0


# COBS is written by hand (pyserial has none; the `cobs` PyPI package would be a device-path
# dependency) so it stays tiny and matches firmware_bridge/c/edge_slm_frame.c byte for byte:
# a full 254-byte block at the very end gets no extra 0x01 code byte.
def cobs_encode(data: bytes) -> bytes:
    """COBS-encode data (no delimiter); the result contains no 0x00 byte."""
    out = bytearray([0])
    code_pos = 0
    code = 1
    for byte in data:
        if code == 0xFF:  # previous block is full and more data follows: open a new block
            out[code_pos] = 0xFF
            code_pos = len(out)
            out.append(0)
            code = 1
        if byte == 0:
            out[code_pos] = code
            code_pos = len(out)
            out.append(0)
            code = 1
        else:
            out.append(byte)
            code += 1
    out[code_pos] = code
    return bytes(out)


def cobs_decode(data: bytes) -> bytes | None:
    """Undo cobs_encode; None when data is not valid COBS (a 0x00, or a block running past the end)."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        end = i + code
        if code == 0 or end > n or 0 in data[i + 1 : end]:
            return None
        out += data[i + 1 : end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    """Build one frame: header, payload, CRC-32, COBS-encoded and terminated by 0x00."""
    if not 0 <= msg_type <= 0xFF:
        raise FrameError(f"message type {msg_type} does not fit in one byte")
    if not 0 <= seq <= 0xFFFF:
        raise FrameError(f"sequence number {seq} does not fit in 16 bits; wrap it modulo 65536")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum; split it")
    raw = HEADER.pack(PROTOCOL_VERSION, msg_type, seq, len(payload)) + bytes(payload)
    raw += CRC.pack(zlib.crc32(raw))
    return cobs_encode(raw) + b"\x00"


class FrameDecoder:
    """Streaming decoder: feed it any slices of the byte stream, it returns the complete valid frames.

    Partial frames are kept across calls. A rejected frame is counted and dropped; decoding
    carries on after the next 0x00, so one corrupt frame never costs the one after it.
    """

    def __init__(self) -> None:
        self.counters = FrameCounters()
        self._pending = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume bytes; return the frames completed by them, in order."""
        frames: list[Frame] = []
        chunks = bytes(data).split(b"\x00")
        for chunk in chunks[:-1]:
            if self._discarding:
                self._discarding = False
                self._pending.clear()
                continue
            self._pending += chunk
            body = bytes(self._pending)
            self._pending.clear()
            if len(body) > MAX_ENCODED:
                self._reject("oversize")
            elif body:  # an empty body is an idle delimiter, not an error
                frame = self._parse(body)
                if frame is not None:
                    frames.append(frame)
        if not self._discarding:
            self._pending += chunks[-1]
            if len(self._pending) > MAX_ENCODED:
                self._reject("oversize")
                self._pending.clear()
                self._discarding = True
        return frames

    def _reject(self, reason: str) -> None:
        setattr(self.counters, reason, getattr(self.counters, reason) + 1)
        self.counters.resyncs += 1

    def _parse(self, body: bytes) -> Frame | None:
        # The order of checks is part of the protocol: the C decoder counts in the same order.
        raw = cobs_decode(body)
        if raw is None:
            self._reject("cobs_errors")
            return None
        if len(raw) < OVERHEAD:
            self._reject("length_errors")
            return None
        version, msg_type, seq, length = HEADER.unpack_from(raw)
        if length > MAX_PAYLOAD:
            self._reject("oversize")
            return None
        if len(raw) != OVERHEAD + length:
            self._reject("length_errors")
            return None
        (crc,) = CRC.unpack_from(raw, len(raw) - CRC.size)
        if crc != zlib.crc32(raw[: -CRC.size]):
            self._reject("crc_errors")
            return None
        if version != PROTOCOL_VERSION:
            self._reject("version_errors")
            return None
        self.counters.frames += 1
        return Frame(msg_type=msg_type, seq=seq, payload=raw[HEADER.size : -CRC.size], version=version)


SENSOR_HEADER = struct.Struct("<BBIQ")  # channels, sample_format, sample_rate_hz, timestamp_us
SAMPLE_DTYPES = {0: np.dtype("<i2"), 1: np.dtype("<f4")}
AUDIO_HEADER = struct.Struct("<I")
ACK = struct.Struct("<HB")


@dataclass(frozen=True)
class SensorSamples:
    """A sensor-samples payload; samples is (n_samples, channels), int16 or float32."""

    sample_rate_hz: int
    timestamp_us: int
    samples: np.ndarray = field(repr=False)

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])


@dataclass(frozen=True)
class AudioChunk:
    """An audio-chunk payload: PCM16 mono samples, shape (n,), int16."""

    sample_rate: int
    samples: np.ndarray = field(repr=False)


def pack_sensor_samples(samples: np.ndarray, sample_rate_hz: int, timestamp_us: int) -> bytes:
    """Payload for MsgType.SENSOR_SAMPLES; samples is (n, channels) int16 or float32, or (n,) for one channel."""
    arr = np.asarray(samples)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or not 1 <= arr.shape[1] <= 255:
        raise FrameError(f"sensor samples must be (n, channels) with 1-255 channels, got shape {arr.shape}")
    if arr.dtype == np.int16:
        fmt = 0
    elif arr.dtype == np.float32:
        fmt = 1
    else:
        raise FrameError(f"sensor samples must be int16 or float32, got {arr.dtype}")
    if not 0 <= sample_rate_hz <= 0xFFFFFFFF or not 0 <= timestamp_us <= 0xFFFFFFFFFFFFFFFF:
        raise FrameError("sample_rate_hz must fit in u32 and timestamp_us in u64")
    payload = SENSOR_HEADER.pack(arr.shape[1], fmt, sample_rate_hz, timestamp_us)
    payload += arr.astype(SAMPLE_DTYPES[fmt], copy=False).tobytes(order="C")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"{arr.shape[0]} samples make a {len(payload)}-byte payload; send fewer per frame")
    return payload


def unpack_sensor_samples(payload: bytes) -> SensorSamples:
    """Parse a MsgType.SENSOR_SAMPLES payload; samples come back interleaved as (n, channels)."""
    if len(payload) < SENSOR_HEADER.size:
        raise FrameError(f"sensor payload of {len(payload)} bytes is shorter than its 14-byte header")
    channels, fmt, rate, ts = SENSOR_HEADER.unpack_from(payload)
    if fmt not in SAMPLE_DTYPES:
        raise FrameError(f"sensor sample_format {fmt} is unknown (0=int16, 1=float32)")
    if channels == 0:
        raise FrameError("sensor payload declares 0 channels")
    body = payload[SENSOR_HEADER.size :]
    stride = channels * SAMPLE_DTYPES[fmt].itemsize
    if len(body) % stride:
        raise FrameError(f"sensor payload body of {len(body)} bytes is not a whole number of {channels}-channel samples")
    samples = np.frombuffer(body, dtype=SAMPLE_DTYPES[fmt]).reshape(-1, channels)
    native = np.int16 if fmt == 0 else np.float32
    return SensorSamples(sample_rate_hz=rate, timestamp_us=ts, samples=samples.astype(native))


def pack_audio_chunk(samples: np.ndarray, sample_rate: int) -> bytes:
    """Payload for MsgType.AUDIO_CHUNK; samples is (n,) int16 PCM mono."""
    arr = np.asarray(samples)
    if arr.ndim != 1 or arr.dtype != np.int16:
        raise FrameError(f"audio chunk must be 1-D int16 PCM, got {arr.dtype} shape {arr.shape}")
    if not 0 <= sample_rate <= 0xFFFFFFFF:
        raise FrameError(f"sample_rate {sample_rate} does not fit in u32")
    payload = AUDIO_HEADER.pack(sample_rate) + arr.astype("<i2", copy=False).tobytes()
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"{arr.size} samples make a {len(payload)}-byte payload; at most 510 fit in a frame")
    return payload


def unpack_audio_chunk(payload: bytes) -> AudioChunk:
    """Parse a MsgType.AUDIO_CHUNK payload."""
    if len(payload) < AUDIO_HEADER.size or (len(payload) - AUDIO_HEADER.size) % 2:
        raise FrameError(f"audio payload of {len(payload)} bytes is not a u32 rate plus whole int16 samples")
    (rate,) = AUDIO_HEADER.unpack_from(payload)
    samples = np.frombuffer(payload, dtype="<i2", offset=AUDIO_HEADER.size).astype(np.int16)
    return AudioChunk(sample_rate=rate, samples=samples)


def pack_ack(acked_seq: int, status: int = 0) -> bytes:
    """Payload for MsgType.ACK: the acknowledged sequence number and a status byte (0 = ok)."""
    if not 0 <= acked_seq <= 0xFFFF or not 0 <= status <= 0xFF:
        raise FrameError("ack needs a u16 sequence number and a u8 status")
    return ACK.pack(acked_seq, status)


def unpack_ack(payload: bytes) -> tuple[int, int]:
    """Parse a MsgType.ACK payload into (acked_seq, status)."""
    if len(payload) != ACK.size:
        raise FrameError(f"ack payload must be 3 bytes, got {len(payload)}")
    acked, status = ACK.unpack(payload)
    return acked, status


# --- link-layer payloads (PROTOCOL.md 4.4 - 4.7) ------------------------------------------------


class AckStatus(IntEnum):
    """Ack status byte; the device answers every command with one of these."""

    OK = 0
    UNKNOWN_COMMAND = 1
    BAD_ARGS = 2
    FAILED = 3


class StreamKind(IntEnum):
    SENSOR = 1
    AUDIO = 2


class CommandId(IntEnum):
    """Known commands; CUSTOM (0) means "look at the name", for firmware-specific commands."""

    CUSTOM = 0
    PING = 1
    HELLO = 2
    START = 3
    STOP = 4
    SET_RATE = 5
    RESET = 6
    SET = 7


class LogLevel(IntEnum):
    DEBUG = 0
    INFO = 1
    WARNING = 2
    ERROR = 3


@dataclass(frozen=True)
class StreamInfo:
    """One stream a device offers: physical value = int16 sample * scale (per channel)."""

    kind: int
    name: str
    sample_format: int
    sample_rate_hz: int
    channels: tuple[str, ...]
    scales: tuple[float, ...]


@dataclass(frozen=True)
class Hello:
    """Capabilities a device announces on boot and on request (PROTOCOL.md 4.4)."""

    device_name: str
    firmware_version: str
    boot_id: int
    max_payload: int = MAX_PAYLOAD
    streams: tuple[StreamInfo, ...] = ()
    protocol_version: int = PROTOCOL_VERSION

    def stream(self, kind: int, channels: int | None = None) -> StreamInfo | None:
        """The first declared stream of this kind (and channel count, when given)."""
        for s in self.streams:
            if s.kind == kind and (channels is None or len(s.channels) == channels):
                return s
        return None


@dataclass(frozen=True)
class Command:
    """A host-to-device command (PROTOCOL.md 4.5); args are ordered (key, value) text pairs."""

    command_id: int
    name: str
    args: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LogRecord:
    level: int
    text: str


@dataclass(frozen=True)
class Heartbeat:
    """Device liveness and counters (PROTOCOL.md 4.7); all zero for an empty (keepalive) heartbeat."""

    uptime_ms: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0
    rx_frames: int = 0
    rx_errors: int = 0


HEARTBEAT = struct.Struct("<IIIII")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")


class _Reader:
    """Bounds-checked cursor over a payload; every overrun is a FrameError naming the field."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.data = bytes(payload)
        self.pos = 0
        self.what = what

    def take(self, n: int, field_name: str) -> bytes:
        if self.pos + n > len(self.data):
            raise FrameError(f"{self.what} payload ends inside {field_name} (byte {self.pos} of {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, name: str) -> int:
        return self.take(1, name)[0]

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "little")

    def u32(self, name: str) -> int:
        return int.from_bytes(self.take(4, name), "little")

    def f32(self, name: str) -> float:
        return _F32.unpack(self.take(4, name))[0]

    def str8(self, name: str) -> str:
        raw = self.take(self.u8(name + " length"), name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"{self.what} field {name} is not UTF-8: {exc}") from exc


def _str8(text: str, name: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise FrameError(f"{name} is {len(raw)} bytes of UTF-8; at most 255 fit")
    return bytes([len(raw)]) + raw


def _check_payload(payload: bytes, what: str) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"{what} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}; shorten names or send fewer items")
    return payload


def pack_hello(hello: Hello) -> bytes:
    """Payload for MsgType.HELLO from a device (a host sends an empty HELLO to ask for one)."""
    if not 0 <= hello.boot_id <= 0xFFFFFFFF or not 0 <= hello.max_payload <= 0xFFFF:
        raise FrameError("hello boot_id must fit in u32 and max_payload in u16")
    if len(hello.streams) > 255:
        raise FrameError(f"hello declares {len(hello.streams)} streams; at most 255")
    out = bytearray([hello.protocol_version & 0xFF])
    out += hello.max_payload.to_bytes(2, "little") + hello.boot_id.to_bytes(4, "little")
    out += _str8(hello.device_name, "device_name") + _str8(hello.firmware_version, "firmware_version")
    out.append(len(hello.streams))
    for s in hello.streams:
        if len(s.channels) != len(s.scales) or not 1 <= len(s.channels) <= 255:
            raise FrameError(f"stream {s.name!r} needs 1-255 channels and one scale per channel")
        if s.sample_format not in SAMPLE_DTYPES or not 0 <= s.sample_rate_hz <= 0xFFFFFFFF:
            raise FrameError(f"stream {s.name!r}: sample_format must be 0 or 1 and sample_rate_hz a u32")
        out += bytes([s.kind & 0xFF]) + _str8(s.name, "stream name") + bytes([s.sample_format])
        out += s.sample_rate_hz.to_bytes(4, "little") + bytes([len(s.channels)])
        for ch, scale in zip(s.channels, s.scales):
            out += _str8(ch, "channel name") + _F32.pack(scale)
    return _check_payload(bytes(out), "hello")


def unpack_hello(payload: bytes) -> Hello:
    """Parse a device MsgType.HELLO payload; extra bytes after the streams are ignored (newer firmware)."""
    r = _Reader(payload, "hello")
    version = r.u8("protocol_version")
    max_payload = r.u16("max_payload")
    boot_id = r.u32("boot_id")
    name = r.str8("device_name")
    firmware = r.str8("firmware_version")
    streams = []
    for _ in range(r.u8("stream count")):
        kind = r.u8("stream kind")
        sname = r.str8("stream name")
        fmt = r.u8("sample_format")
        rate = r.u32("sample_rate_hz")
        n = r.u8("channel count")
        chans, scales = [], []
        for _ in range(n):
            chans.append(r.str8("channel name"))
            scales.append(r.f32("channel scale"))
        streams.append(StreamInfo(kind, sname, fmt, rate, tuple(chans), tuple(scales)))
    return Hello(name, firmware, boot_id, max_payload, tuple(streams), version)


def pack_command(name: str, args: dict[str, object] | None = None, command_id: int | None = None) -> bytes:
    """Payload for MsgType.COMMAND; the id comes from CommandId by name unless given (CUSTOM otherwise)."""
    if command_id is None:
        command_id = CommandId[name.upper()] if name.upper() in CommandId.__members__ else CommandId.CUSTOM
    items = list((args or {}).items())
    if not 0 <= command_id <= 255 or len(items) > 255:
        raise FrameError("command id must fit in u8 and a command carries at most 255 args")
    out = bytearray([int(command_id)]) + _str8(name, "command name") + bytes([len(items)])
    for key, value in items:
        out += _str8(str(key), "arg key") + _str8(str(value), f"value of arg {key!r}")
    return _check_payload(bytes(out), "command")


def unpack_command(payload: bytes) -> Command:
    """Parse a MsgType.COMMAND payload."""
    r = _Reader(payload, "command")
    cid = r.u8("command_id")
    name = r.str8("command name")
    args = tuple((r.str8("arg key"), r.str8("arg value")) for _ in range(r.u8("arg count")))
    return Command(cid, name, args)


def pack_log(level: int, text: str) -> bytes:
    """Payload for MsgType.LOG: a level byte then UTF-8 text (cut to fit one frame)."""
    if not 0 <= level <= 3:
        raise FrameError(f"log level {level} is not 0-3 (debug, info, warning, error)")
    raw = text.encode("utf-8")[: MAX_PAYLOAD - 1]
    return bytes([level]) + raw.decode("utf-8", errors="ignore").encode("utf-8")


def unpack_log(payload: bytes) -> LogRecord:
    """Parse a MsgType.LOG payload; a first byte >= 0x20 is an early-draft plain-text log, level info."""
    if not payload:
        return LogRecord(LogLevel.INFO, "")
    if payload[0] >= 0x20:
        return LogRecord(LogLevel.INFO, bytes(payload).decode("utf-8", errors="replace"))
    return LogRecord(min(payload[0], LogLevel.ERROR), bytes(payload[1:]).decode("utf-8", errors="replace"))


def pack_heartbeat(hb: Heartbeat | None = None) -> bytes:
    """Payload for MsgType.HEARTBEAT; None gives the empty keepalive a host sends."""
    if hb is None:
        return b""
    try:
        return HEARTBEAT.pack(hb.uptime_ms, hb.frames_sent, hb.frames_dropped, hb.rx_frames, hb.rx_errors)
    except struct.error as exc:
        raise FrameError(f"heartbeat counters must fit in u32: {exc}") from exc


def unpack_heartbeat(payload: bytes) -> Heartbeat:
    """Parse a MsgType.HEARTBEAT payload: empty, or 20 bytes of counters (longer: extra ignored)."""
    if not payload:
        return Heartbeat()
    if len(payload) < HEARTBEAT.size:
        raise FrameError(f"heartbeat payload of {len(payload)} bytes: expected 0 or at least {HEARTBEAT.size}")
    return Heartbeat(*HEARTBEAT.unpack_from(payload))
