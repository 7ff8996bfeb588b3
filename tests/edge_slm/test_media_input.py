"""Audio and sensor payloads from MQTT: every accepted shape decodes, every bad one is an InputError with a code."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.errors import InputError
from edge_slm.media_input import decode_audio, decode_sensor
from edge_slm.sources import RawInput


def raw(payload: bytes | str) -> RawInput:
    return RawInput(payload.encode() if isinstance(payload, str) else payload, "mqtt:edge-slm/d/kws/input")


def test_raw_pcm16_is_a_chunk_of_the_topic_stream_at_the_model_rate():
    pcm = (np.array([0, 16384, -32768, 32767], dtype="<i2")).tobytes()
    block, whole = decode_audio(raw(pcm), 65536, 16000)
    assert not whole and block.sample_rate == 16000 and block.stream == "edge-slm/d/kws/input"
    np.testing.assert_allclose(block.samples, [0.0, 0.5, -1.0, 32767 / 32768])


def test_json_pcm16_carries_rate_stream_time_and_id():
    pcm = np.arange(-5, 5, dtype="<i2").tobytes()
    r = raw(json.dumps({"id": "clip-9", "sample_rate": 8000, "stream": "door", "t0": 1.5,
                        "pcm16": base64.b64encode(pcm).decode()}))
    block, whole = decode_audio(r, 65536, 16000)
    assert (block.sample_rate, block.stream, block.t0, r.input_id, whole) == (8000, "door", 1.5, "clip-9", False)
    assert len(block.samples) == 10


def test_raw_pcm_that_starts_like_json_or_riff_is_still_audio():
    for head in (b"{\xff", b"RIFF"):
        pcm = head + bytes(range(256)) * 4
        block, whole = decode_audio(raw(pcm), 65536, 16000)
        assert not whole and len(block.samples) == len(pcm) // 2


def test_json_float_samples():
    block, _ = decode_audio(raw('{"samples": [0.0, 0.25, -0.5]}'), 65536, 16000)
    np.testing.assert_allclose(block.samples, [0.0, 0.25, -0.5])


@pytest.mark.parametrize(("payload", "code"), [
    (b"\x01\x02\x03", "bad_audio"),                      # odd byte count
    (b"", "empty_input"),
    ('{"pcm16": "***"}', "bad_audio"),
    ('{"pcm16": 5}', "bad_audio"),
    ('{"samples": []}', "bad_request"),
    ('{"samples": [[0.1]]}', "bad_request"),
    ('{"samples": [null]}', "bad_audio"),
    ('{"samples": [0.1], "sample_rate": -5}', "bad_audio"),
    ('{"samples": [0.1], "sample_rate": 16000.5}', "bad_audio"),
    ('{"samples": [0.1], "t0": "now"}', "bad_request"),
    ('{"text": "hello"}', "bad_request"),
    ('{"samples": [0.1]', "bad_json"),
])
def test_bad_audio_payloads_have_codes(payload, code):
    with pytest.raises(InputError) as exc:
        decode_audio(raw(payload), 65536, 16000)
    assert exc.value.code == code


def test_audio_over_the_size_limit_is_refused_before_decoding():
    with pytest.raises(InputError) as exc:
        decode_audio(raw(b"\x00" * 2000), 1000, 16000)
    assert exc.value.code == "input_too_long"


def test_sensor_json_null_is_a_missing_sample():
    r = raw(json.dumps({"id": 7, "sample_rate": 800, "channels": ["ax", "ay"], "samples": [[0.1, 0.2], [None, 0.3]]}))
    block = decode_sensor(r, 65536, 1000.0, ["x", "y"])
    assert block.sample_rate == 800 and tuple(block.channels) == ("ax", "ay") and r.input_id == "7"
    assert np.isnan(block.samples[1, 0]) and block.samples[1, 1] == pytest.approx(0.3)


def test_sensor_defaults_come_from_the_model():
    block = decode_sensor(raw('{"samples": [[1, 2, 3]]}'), 65536, 1000.0, ["ax", "ay", "az"])
    assert block.sample_rate == 1000.0 and tuple(block.channels) == ("ax", "ay", "az")


@pytest.mark.parametrize(("payload", "code"), [
    ("1,2,3", "bad_request"),
    ('{"samples": [[1, 2]]}', "bad_request"),              # 2 values, 3 channels
    ('{"samples": [1, 2, 3]}', "bad_request"),              # not rows
    ('{"samples": [[1, 2, "x"]]}', "bad_request"),
    ('{"samples": [[1, 2, 1e999]]}', "bad_request"),
    ('{"samples": [[1, 2, 3]], "channels": "ax"}', "bad_request"),
    ('{"samples": [[1, 2, 3]], "sample_rate": 0}', "bad_sensor_block"),
    ('{"rows": []}', "bad_request"),
])
def test_bad_sensor_payloads_have_codes(payload, code):
    with pytest.raises(InputError) as exc:
        decode_sensor(raw(payload), 65536, 1000.0, ["ax", "ay", "az"])
    assert exc.value.code == code


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_payload_decodes_or_is_an_input_error(payload):
    for decode in (lambda r: decode_audio(r, 65536, 16000), lambda r: decode_sensor(r, 65536, 100.0, ["a"])):
        try:
            decode(raw(payload))
        except InputError as exc:
            assert exc.code and str(exc)
