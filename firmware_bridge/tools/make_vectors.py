"""Generates firmware_bridge/test_vectors.json and .txt (run from the repo root:
`python -m firmware_bridge.tools.make_vectors`). Expected stream results are hand-written."""
import json
import struct
import zlib
from dataclasses import asdict

import numpy as np

from firmware_bridge.protocol import (
    CommandId,
    FrameDecoder,
    Heartbeat,
    Hello,
    LogLevel,
    MsgType,
    StreamInfo,
    StreamKind,
    cobs_encode,
    encode_frame,
    pack_ack,
    pack_audio_chunk,
    pack_command,
    pack_heartbeat,
    pack_hello,
    pack_log,
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

# --- payload vectors: fields -> payload, checked by protocol.py and by the C helpers ------------
def pv(vname, kind, payload, **fields):
    V.append({"kind": "payload", "name": vname, "payload_type": kind, "payload_hex": payload.hex(), "fields": fields})
    fv(f"frame_{vname}", {"hello": MsgType.HELLO, "command": MsgType.COMMAND, "log": MsgType.LOG,
                         "heartbeat": MsgType.HEARTBEAT, "ack": MsgType.ACK, "sensor": MsgType.SENSOR_SAMPLES,
                         "audio": MsgType.AUDIO_CHUNK}[kind], 200 + len(V), payload)

def f32(x):
    return float(np.float32(x))

def stream_fields(s):
    return {"kind": s.kind, "name": s.name, "sample_format": s.sample_format, "sample_rate_hz": s.sample_rate_hz,
            "channels": list(s.channels), "scales": list(s.scales)}

IMU = StreamInfo(StreamKind.SENSOR, "imu", 0, 416, ("ax", "ay", "az", "gx", "gy", "gz"),
                 tuple(f32(x) for x in [9.80665 / 8192] * 3 + [0.0174533 * 500 / 32768] * 3))
MIC = StreamInfo(StreamKind.AUDIO, "mic", 0, 16000, ("mic",), (f32(1 / 32768),))
for name, hello in [
    ("hello_imu_mic", Hello("nano33-ble", "edge-slm-sketch 1.0", 0xDEADBEEF, 1024, (IMU, MIC))),
    ("hello_no_streams", Hello("", "", 0, 1024, ())),
    ("hello_utf8_name", Hello("capteur-é✓", "0.0.1-rc", 1, 512, (StreamInfo(1, "t", 1, 1, ("°C",), (1.0,)),))),
]:
    pv(name, "hello", pack_hello(hello), protocol_version=hello.protocol_version, max_payload=hello.max_payload,
       boot_id=hello.boot_id, device_name=hello.device_name, firmware_version=hello.firmware_version,
       streams=[stream_fields(s) for s in hello.streams])
for name, cmd, args in [
    ("command_ping", "ping", {}),
    ("command_start_imu", "start", {"stream": "imu"}),
    ("command_set_rate", "set_rate", {"stream": "imu", "rate": "104"}),
    ("command_custom", "calibrate", {"axis": "z", "g": "1.0", "empty": ""}),
]:
    payload = pack_command(cmd, args)
    pv(name, "command", payload, command_id=payload[0], name=cmd, args=[[k, v] for k, v in args.items()])
assert CommandId.CUSTOM == 0
for name, level, text in [("log_info", LogLevel.INFO, "boot ok"), ("log_error_utf8", LogLevel.ERROR, "IMU not found ✗"),
                          ("log_debug_empty", LogLevel.DEBUG, "")]:
    pv(name, "log", pack_log(level, text), level=int(level), text=text)
for name, hb in [("heartbeat_counters", Heartbeat(123456, 70000, 3, 12, 1)),
                 ("heartbeat_max", Heartbeat(*[0xFFFFFFFF] * 5))]:
    pv(name, "heartbeat", pack_heartbeat(hb), **vars(hb))
pv("ack_ok", "ack", pack_ack(0x1234, 0), acked_seq=0x1234, status=0)
pv("ack_unknown_command", "ack", pack_ack(7, 1), acked_seq=7, status=1)
SENS = np.array([[0, 1, -1, 32767, -32768, 256], [5, 0, 7, -2, 3, 0]], np.int16)
pv("sensor_imu_int16", "sensor", pack_sensor_samples(SENS, 416, 1_234_567_890_123), channels=6, sample_format=0,
   sample_rate_hz=416, timestamp_us=1_234_567_890_123, samples=SENS.reshape(-1).tolist())
PCM = np.array([0, 1, -1, 1000, -1000, 32767, -32768], np.int16)
pv("audio_pcm16", "audio", pack_audio_chunk(PCM, 16000), sample_rate=16000, samples=PCM.tolist())

PAYLOAD_CODES = {"hello": "PH", "command": "PC", "log": "PL", "heartbeat": "PB", "ack": "PK", "sensor": "PS",
                 "audio": "PU"}
COUNTER_ORDER = ("frames", "crc_errors", "cobs_errors", "length_errors", "oversize", "version_errors", "resyncs")


def _hex(text):
    return text.encode().hex() or "-"


def render_vectors_txt(vectors):
    """The line-based copy of test_vectors.json that c/vector_check.c reads (format in its header)."""
    lines = ["# Generated from test_vectors.json; format documented in c/vector_check.c. Do not edit."]
    for v in vectors:
        if v["kind"] == "frame":
            lines.append(f"F {v['name']} {v['type']} {v['seq']} {v['payload_hex'] or '-'} {v['frame_hex']}")
        elif v["kind"] == "stream":
            lines.append(f"S {v['name']} {v['stream_hex'] or '-'}")
            lines += [f"E {f['type']} {f['seq']} {f['payload_hex'] or '-'}" for f in v["frames"]]
            lines.append("C " + " ".join(str(v["counters"][k]) for k in COUNTER_ORDER))
        else:
            f, kind = v["fields"], v["payload_type"]
            head = f"{PAYLOAD_CODES[kind]} {v['name']} {v['payload_hex'] or '-'}"
            if kind == "hello":
                parts = [f["max_payload"], f["boot_id"], _hex(f["device_name"]), _hex(f["firmware_version"]),
                         len(f["streams"])]
                for s in f["streams"]:
                    parts += [s["kind"], _hex(s["name"]), s["sample_format"], s["sample_rate_hz"], len(s["channels"])]
                    for ch, sc in zip(s["channels"], s["scales"]):
                        parts += [_hex(ch), struct.pack("<f", sc).hex()]
            elif kind == "command":
                parts = [f["command_id"], _hex(f["name"]), len(f["args"])]
                for key, value in f["args"]:
                    parts += [_hex(key), _hex(value)]
            elif kind == "log":
                parts = [f["level"], _hex(f["text"])]
            elif kind == "heartbeat":
                parts = [f[k] for k in ("uptime_ms", "frames_sent", "frames_dropped", "rx_frames", "rx_errors")]
            elif kind == "ack":
                parts = [f["acked_seq"], f["status"]]
            elif kind == "sensor":
                parts = [f["channels"], f["sample_format"], f["sample_rate_hz"], f["timestamp_us"]]
            else:
                parts = [f["sample_rate"]]
            lines.append(" ".join([head, *map(str, parts)]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open("firmware_bridge/test_vectors.json", "w", encoding="utf-8") as out:
        json.dump(V, out, indent=1)
    with open("firmware_bridge/test_vectors.txt", "w", encoding="ascii") as out:
        out.write(render_vectors_txt(V))
    print(len(V), "vectors")
