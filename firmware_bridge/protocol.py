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
