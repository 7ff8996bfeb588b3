"""Link-layer payloads (hello, command, log, heartbeat, ack, sensor, audio): shared vectors and
hypothesis round trips. The C helpers are checked against the same vectors in test_protocol.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_slm.errors import FrameError
from firmware_bridge.protocol import (
    MAX_PAYLOAD,
    AckStatus,
    CommandId,
    Heartbeat,
    Hello,
    LogLevel,
    StreamInfo,
    StreamKind,
    pack_ack,
    pack_audio_chunk,
    pack_command,
    pack_heartbeat,
    pack_hello,
    pack_log,
    pack_sensor_samples,
    unpack_ack,
    unpack_audio_chunk,
    unpack_command,
    unpack_heartbeat,
    unpack_hello,
    unpack_log,
    unpack_sensor_samples,
)

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "firmware_bridge" / "test_vectors.json").read_text())
PAYLOADS = [v for v in VECTORS if v["kind"] == "payload"]


def test_every_payload_kind_has_vectors() -> None:
    assert {v["payload_type"] for v in PAYLOADS} == {"hello", "command", "log", "heartbeat", "ack", "sensor", "audio"}


def _hello_from(f: dict) -> Hello:
    streams = tuple(
        StreamInfo(s["kind"], s["name"], s["sample_format"], s["sample_rate_hz"], tuple(s["channels"]), tuple(s["scales"]))
        for s in f["streams"]
    )
    return Hello(f["device_name"], f["firmware_version"], f["boot_id"], f["max_payload"], streams, f["protocol_version"])


@pytest.mark.parametrize("vector", PAYLOADS, ids=lambda v: v["name"])
def test_python_packs_and_parses_payload_vector(vector) -> None:
    payload, f, kind = bytes.fromhex(vector["payload_hex"]), vector["fields"], vector["payload_type"]
    if kind == "hello":
        assert pack_hello(_hello_from(f)) == payload
        assert unpack_hello(payload) == _hello_from(f)
    elif kind == "command":
        args = dict(f["args"])
        assert pack_command(f["name"], args) == payload
        cmd = unpack_command(payload)
        assert (cmd.command_id, cmd.name, [list(a) for a in cmd.args]) == (f["command_id"], f["name"], f["args"])
    elif kind == "log":
        assert pack_log(f["level"], f["text"]) == payload
        assert tuple(vars(unpack_log(payload)).values()) == (f["level"], f["text"])
    elif kind == "heartbeat":
        assert pack_heartbeat(Heartbeat(**f)) == payload
        assert unpack_heartbeat(payload) == Heartbeat(**f)
    elif kind == "ack":
        assert pack_ack(f["acked_seq"], f["status"]) == payload
        assert unpack_ack(payload) == (f["acked_seq"], f["status"])
    elif kind == "sensor":
        samples = np.array(f["samples"], np.int16).reshape(-1, f["channels"])
        assert pack_sensor_samples(samples, f["sample_rate_hz"], f["timestamp_us"]) == payload
        back = unpack_sensor_samples(payload)
        assert np.array_equal(back.samples, samples) and back.timestamp_us == f["timestamp_us"]
    else:
        samples = np.array(f["samples"], np.int16)
        assert pack_audio_chunk(samples, f["sample_rate"]) == payload
        assert np.array_equal(unpack_audio_chunk(payload).samples, samples)


text = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
streams = st.builds(
    lambda kind, name, fmt, rate, chans: StreamInfo(kind, name, fmt, rate, tuple(c for c, _ in chans),
                                                    tuple(s for _, s in chans)),
    st.sampled_from(list(StreamKind)), text, st.sampled_from([0, 1]), st.integers(0, 0xFFFFFFFF),
    st.lists(st.tuples(text, f32), min_size=1, max_size=8),
)


@given(text, text, st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.lists(streams, max_size=3))
def test_hello_round_trip(name, firmware, boot_id, max_payload, streams_) -> None:
    hello = Hello(name, firmware, boot_id, max_payload, tuple(streams_))
    payload = pack_hello(hello)
    assert unpack_hello(payload) == hello
    assert unpack_hello(payload + b"\x01future") == hello  # newer firmware may append fields


@given(text, st.dictionaries(text, text, max_size=6))
def test_command_round_trip(name, args) -> None:
    cmd = unpack_command(pack_command(name, args))
    assert cmd.name == name and dict(cmd.args) == args
    expected_id = CommandId[name.upper()] if name.upper() in CommandId.__members__ else CommandId.CUSTOM
    assert cmd.command_id == expected_id


@given(st.sampled_from(list(LogLevel)), st.text(max_size=400))
def test_log_round_trip(level, message) -> None:
    rec = unpack_log(pack_log(level, message))
    assert rec.level == level and rec.text == message


def test_log_is_cut_to_one_frame_on_a_character_boundary() -> None:
    payload = pack_log(LogLevel.INFO, "é" * 600)
    assert len(payload) <= MAX_PAYLOAD and unpack_log(payload).text == "é" * 511


def test_plain_text_logs_from_draft_firmware_read_as_info() -> None:
    assert unpack_log(b"boot ok") == unpack_log(pack_log(LogLevel.INFO, "boot ok"))
    assert unpack_log(b"").text == ""


@given(st.tuples(*[st.integers(0, 0xFFFFFFFF)] * 5))
def test_heartbeat_round_trip(values) -> None:
    hb = Heartbeat(*values)
    assert unpack_heartbeat(pack_heartbeat(hb)) == hb
    assert unpack_heartbeat(pack_heartbeat(hb) + b"later") == hb


def test_empty_heartbeat_is_a_keepalive_and_short_one_is_an_error() -> None:
    assert pack_heartbeat(None) == b"" and unpack_heartbeat(b"") == Heartbeat()
    with pytest.raises(FrameError, match="heartbeat payload of 7 bytes"):
        unpack_heartbeat(bytes(7))


@given(st.binary(max_size=300))
def test_new_parsers_raise_only_frame_error(payload) -> None:
    for parse in (unpack_hello, unpack_command, unpack_log, unpack_heartbeat):
        try:
            parse(payload)
        except FrameError:
            pass


def test_truncated_hello_names_the_field() -> None:
    payload = pack_hello(Hello("dev", "1.0", 7, 1024, (StreamInfo(1, "imu", 0, 100, ("ax",), (0.5,)),)))
    with pytest.raises(FrameError, match="channel scale"):
        unpack_hello(payload[:-1])
    with pytest.raises(FrameError, match="not UTF-8"):
        unpack_hello(payload[:7] + b"\x02\xff\xfe" + payload[11:])


def test_packers_refuse_what_does_not_fit() -> None:
    with pytest.raises(FrameError, match="at most 255"):
        pack_command("x" * 256)
    with pytest.raises(FrameError, match="one scale per channel"):
        pack_hello(Hello("d", "f", 0, streams=(StreamInfo(1, "s", 0, 1, ("a", "b"), (1.0,)),)))
    with pytest.raises(FrameError, match="exceeds"):
        many = tuple(StreamInfo(1, "s" * 200, 0, 1, ("a",), (1.0,)) for _ in range(6))
        pack_hello(Hello("d", "f", 0, streams=many))
    with pytest.raises(FrameError, match="u32"):
        pack_heartbeat(Heartbeat(uptime_ms=2**32))
    with pytest.raises(FrameError, match="log level"):
        pack_log(9, "x")


def test_existing_payloads_stay_compatible() -> None:
    # version-1 ack, sensor and audio layouts are unchanged by the new messages
    assert pack_ack(0x1234, AckStatus.BAD_ARGS) == struct.pack("<HB", 0x1234, 2)
    assert [int(s) for s in AckStatus] == [0, 1, 2, 3]
    frame_vectors = {v["name"]: v for v in VECTORS if v["kind"] == "frame"}
    assert unpack_ack(bytes.fromhex(frame_vectors["ack"]["payload_hex"])) == (6, 0)
    assert unpack_log(bytes.fromhex(frame_vectors["log_utf8"]["payload_hex"])).text == "boot ok, temp 21.5 °C ✓"
