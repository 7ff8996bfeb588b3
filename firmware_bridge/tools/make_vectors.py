"""Generates firmware_bridge/test_vectors.json (run from /work/main). Expected stream results are hand-written."""
import json
import struct
import zlib
from dataclasses import asdict

import numpy as np

from firmware_bridge.protocol import (
    FrameDecoder,
    MsgType,
    cobs_encode,
    encode_frame,
    pack_ack,
    pack_audio_chunk,
    pack_sensor_samples,
)

V = []
def fv(name, t, seq, payload):
    V.append({"kind": "frame", "name": name, "type": int(t), "seq": seq, "payload_hex": payload.hex(),
              "frame_hex": encode_frame(t, seq, payload).hex()})

def raw_frame(t, seq, payload, version=1, length=None, crc_fix=True):
    h = struct.pack("<BBHH", version, t, seq, len(payload) if length is None else length) + payload
    return h + struct.pack("<I", zlib.crc32(h))

def enc(raw):
    return cobs_encode(raw) + b"\0"

def final_run(raw):
    return len(raw) - (raw.rfind(b"\0") + 1)

fv("empty_payload_heartbeat", MsgType.HEARTBEAT, 0, b"")
fv("empty_payload_hello", MsgType.HELLO, 1, b"")
fv("hello", MsgType.HELLO, 2, b"edge-slm-fw/0.1 sensor,audio")
fv("sensor_samples_int16", MsgType.SENSOR_SAMPLES, 3,
   pack_sensor_samples(np.array([[0, 1, -1], [32767, -32768, 256], [5, 0, 7], [-2, 3, 0]], np.int16), 100, 1_700_000_000_000_000))
fv("sensor_samples_float32", MsgType.SENSOR_SAMPLES, 4,
   pack_sensor_samples(np.array([[0.0, 1.5], [-2.25, 9.81]], np.float32), 50, 123456789))
fv("audio_chunk", MsgType.AUDIO_CHUNK, 5, pack_audio_chunk(np.array([0, 1, -1, 1000, -1000, 32767, -32768, 0], np.int16), 16000))
fv("command", MsgType.COMMAND, 6, b"\x01start\x00")
fv("ack", MsgType.ACK, 7, pack_ack(6, 0))
fv("log_utf8", MsgType.LOG, 8, "boot ok, temp 21.5 °C ✓".encode())
fv("heartbeat", MsgType.HEARTBEAT, 9, b"")
fv("unknown_type_delivered", 0x7F, 10, b"\x7f")
fv("seq_ffff", MsgType.HEARTBEAT, 0xFFFF, b"")
fv("seq_with_zero_bytes", MsgType.COMMAND, 0x0100, b"\x00")
fv("payload_with_zeros", MsgType.COMMAND, 11, b"\x00\x11\x00\x00\x22\x00")
fv("payload_all_zeros", MsgType.COMMAND, 12, bytes(16))
for n in (253, 254, 255, 256, 508, 509):
    fv(f"payload_{n}_nonzero", MsgType.LOG, 13, bytes([0x41]) * n)
# Runs that end the frame exactly on a COBS block boundary (the no-trailing-0x01 rule).
for target in (253, 254, 255, 508):
    found = False
    for fill in range(1, 256):
        for n in range(max(0, target - 12), min(1024, target + 1) + 1):
            p = bytes([fill]) * n
            if final_run(raw_frame(MsgType.LOG, 14, p)) == target and b"\0" in raw_frame(MsgType.LOG, 14, p):
                fv(f"final_run_{target}", MsgType.LOG, 14, p); found = True; break
        if found: break
    assert found, target
fv("max_payload_pattern", MsgType.AUDIO_CHUNK, 15, bytes((i * 7 + 1) % 256 for i in range(1024)))
fv("max_payload_nonzero", MsgType.AUDIO_CHUNK, 16, bytes([0xFF]) * 1024)
fv("max_payload_zeros", MsgType.AUDIO_CHUNK, 17, bytes(1024))

A = (MsgType.HEARTBEAT, 100, b"")
B = (MsgType.LOG, 101, b"hello")
C = (MsgType.ACK, 102, pack_ack(7, 1))
eA, eB, eC = (encode_frame(*x) for x in (A, B, C))

def sv(name, stream, frames, **counters):
    c = {"frames": len(frames), "crc_errors": 0, "cobs_errors": 0, "length_errors": 0, "oversize": 0,
         "version_errors": 0, "resyncs": 0}
    c.update(counters)
    c["resyncs"] = sum(v for k, v in c.items() if k not in ("frames", "resyncs"))
    d = FrameDecoder(); got = d.feed(stream)
    assert [(f.msg_type, f.seq, f.payload) for f in got] == [tuple(f) for f in frames], name
    assert asdict(d.counters) == c, (name, asdict(d.counters), c)
    V.append({"kind": "stream", "name": name, "stream_hex": stream.hex(),
              "frames": [{"type": int(t), "seq": s, "payload_hex": p.hex()} for t, s, p in frames],
              "counters": c})

bad = bytearray(raw_frame(*B)); bad[7] ^= 0x01
sv("crc_error_payload_bit_flip", eA + enc(bytes(bad)) + eC, [A, C], crc_errors=1)
bad = bytearray(raw_frame(*B)); bad[-1] ^= 0x80
sv("crc_error_in_crc_field", eA + enc(bytes(bad)) + eC, [A, C], crc_errors=1)
sv("cobs_error_short_block", eA + bytes.fromhex("0511223300") + eC, [A, C], cobs_errors=1)
sv("length_error_too_short", eA + bytes.fromhex("03010200") + eC, [A, C], length_errors=1)
sv("length_error_field_mismatch", eA + enc(raw_frame(MsgType.LOG, 101, b"hello", length=6)) + eC, [A, C], length_errors=1)
sv("oversize_length_field", eA + enc(raw_frame(MsgType.LOG, 101, b"hello", length=2000)) + eC, [A, C], oversize=1)
sv("oversize_run_without_delimiter", eA + bytes([0x41]) * 1100 + b"\0" + eC, [A, C], oversize=1)
sv("oversize_run_longer_than_two_buffers", bytes([0x41]) * 2500 + b"\0" + eC, [C], oversize=1)
sv("version_error", eA + enc(raw_frame(MsgType.LOG, 101, b"hello", version=2)) + eC, [A, C], version_errors=1)
sv("leading_garbage_mid_frame", bytes.fromhex("deadbeef00") + eA, [A], cobs_errors=1)
sv("truncated_frame_merges_with_next", eB[:5] + eA + eC, [C], cobs_errors=1)
sv("lost_delimiter_costs_two_frames", eA[:-1] + bytes([0x42]) + eB + eC, [C], cobs_errors=1)
sv("idle_delimiters_are_not_errors", b"\0\0" + eA + b"\0\0\0" + eB + b"\0", [A, B])
sv("partial_frame_is_not_delivered", eA + eB[:-1], [A])
sv("back_to_back_valid", eA + eB + eC, [A, B, C])
json.dump(V, open("firmware_bridge/test_vectors.json", "w"), indent=1)
print(len(V), "vectors")
