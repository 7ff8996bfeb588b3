"""Frame protocol tests: shared vectors, round trips, fuzzing, corruption, and Python/C parity.

The C side is compiled with gcc in a tmp dir; without gcc those tests skip (and fail when CI=true).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm.errors import FrameError
from firmware_bridge.protocol import (
    MAX_ENCODED,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    MsgType,
    cobs_decode,
    cobs_encode,
    encode_frame,
    pack_ack,
    pack_audio_chunk,
    pack_sensor_samples,
    unpack_ack,
    unpack_audio_chunk,
    unpack_sensor_samples,
)
from firmware_bridge.tools.make_vectors import V as GENERATED_VECTORS
from firmware_bridge.tools.make_vectors import render_vectors_txt
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = ROOT / "firmware_bridge"
VECTORS = json.loads((BRIDGE / "test_vectors.json").read_text(encoding="utf-8"))
FRAME_VECTORS = [v for v in VECTORS if v["kind"] == "frame"]
STREAM_VECTORS = [v for v in VECTORS if v["kind"] == "stream"]
COUNTER_ORDER = ("frames", "crc_errors", "cobs_errors", "length_errors", "oversize", "version_errors", "resyncs")


def as_tuples(frames: list[Frame]) -> list[tuple[int, int, bytes]]:
    return [(f.msg_type, f.seq, f.payload) for f in frames]


# --- shared vectors --------------------------------------------------------------------------


def test_vectors_cover_every_message_type_and_cobs_boundary():
    types = {v["type"] for v in FRAME_VECTORS}
    assert {int(t) for t in MsgType} <= types
    sizes = {len(v["payload_hex"]) // 2 for v in FRAME_VECTORS}
    assert {0, 254, 255, 256, MAX_PAYLOAD} <= sizes


@pytest.mark.parametrize("vector", FRAME_VECTORS, ids=lambda v: v["name"])
def test_encoder_matches_frame_vector(vector):
    frame = encode_frame(vector["type"], vector["seq"], bytes.fromhex(vector["payload_hex"]))
    assert frame.hex() == vector["frame_hex"]


@pytest.mark.parametrize("vector", FRAME_VECTORS, ids=lambda v: v["name"])
def test_decoder_delivers_frame_vector(vector):
    decoder = FrameDecoder()
    frames = decoder.feed(bytes.fromhex(vector["frame_hex"]))
    assert as_tuples(frames) == [(vector["type"], vector["seq"], bytes.fromhex(vector["payload_hex"]))]
    assert decoder.counters.frames == 1 and decoder.counters.resyncs == 0


@pytest.mark.parametrize("vector", STREAM_VECTORS, ids=lambda v: v["name"])
def test_decoder_matches_corrupt_stream_vector(vector):
    decoder = FrameDecoder()
    stream = bytes.fromhex(vector["stream_hex"])
    frames = decoder.feed(stream)
    assert as_tuples(frames) == [(f["type"], f["seq"], bytes.fromhex(f["payload_hex"])) for f in vector["frames"]]
    assert asdict(decoder.counters) == vector["counters"]
    # The same stream one byte at a time gives the same result.
    bytewise = FrameDecoder()
    assert as_tuples([f for b in stream for f in bytewise.feed(bytes([b]))]) == as_tuples(frames)
    assert bytewise.counters == decoder.counters


def test_text_copy_of_vectors_is_current():
    txt = BRIDGE / "test_vectors.txt"
    assert txt.read_text(encoding="ascii") == render_vectors_txt(VECTORS), (
        "test_vectors.txt is stale; regenerate: python -m firmware_bridge.tools.make_vectors"
    )
    assert json.loads(json.dumps(GENERATED_VECTORS)) == VECTORS, (
        "test_vectors.json is stale; regenerate: python -m firmware_bridge.tools.make_vectors"
    )


# --- COBS and CRC against published references -------------------------------------------------

# The worked examples of the COBS article (Cheshire & Baker's encoding, as listed on Wikipedia).
_RUN = bytes(range(1, 256))
COBS_EXAMPLES = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (_RUN[:254], b"\xff" + _RUN[:254]),
    (b"\x00" + _RUN[:254], b"\x01\xff" + _RUN[:254]),
    (_RUN, b"\xff" + _RUN[:254] + b"\x02\xff"),
    (_RUN[1:] + b"\x00", b"\xff" + _RUN[1:] + b"\x01\x01"),
    (_RUN[2:] + b"\x00\x01", b"\xfe" + _RUN[2:] + b"\x02\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_EXAMPLES)
def test_cobs_matches_published_examples(raw, encoded):
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@given(st.binary(max_size=2000))
def test_cobs_round_trips_and_never_emits_zero(data):
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert len(encoded) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(encoded) == data


@given(st.binary(max_size=600))
def test_cobs_decode_never_raises(data):
    cobs_decode(data)


def test_frame_crc_is_zlib_crc32_little_endian():
    raw = cobs_decode(encode_frame(MsgType.LOG, 0x1234, b"abc")[:-1])
    assert raw[:6] == bytes([1, 6, 0x34, 0x12, 3, 0])
    assert raw[-4:] == zlib.crc32(raw[:-4]).to_bytes(4, "little")


def test_encode_frame_rejects_out_of_range_fields():
    for args in ((256, 0, b""), (-1, 0, b""), (1, 65536, b""), (1, -1, b""), (1, 0, bytes(MAX_PAYLOAD + 1))):
        with pytest.raises(FrameError):
            encode_frame(*args)
    assert len(encode_frame(1, 0, bytes(MAX_PAYLOAD))) <= MAX_ENCODED + 1


# --- round trips and fuzzing -------------------------------------------------------------------

frame_args = st.tuples(
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.one_of(st.binary(max_size=64), st.binary(min_size=240, max_size=MAX_PAYLOAD)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frame_args, max_size=12), st.data())
def test_frames_round_trip_through_any_chunking(frames, data):
    stream = b"".join(encode_frame(*f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        got += decoder.feed(stream[start:end])
    assert as_tuples(got) == [(t, s, bytes(p)) for t, s, p in frames]
    assert asdict(decoder.counters) == dict.fromkeys(COUNTER_ORDER, 0) | {"frames": len(frames)}


def _delivered_frames_are_genuine(stream: bytes, frames: list[Frame]) -> None:
    # Every delivered frame must be a whole, CRC-valid encoding that is really in the stream.
    padded = b"\x00" + stream
    for f in frames:
        assert b"\x00" + encode_frame(f.msg_type, f.seq, f.payload) in padded


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.data())
def test_random_bytes_never_raise_or_deliver_a_bad_frame(stream, data):
    cut = data.draw(st.integers(0, len(stream)))
    decoder = FrameDecoder()
    frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
    _delivered_frames_are_genuine(stream, frames)
    c = decoder.counters
    assert c.resyncs == c.crc_errors + c.cobs_errors + c.length_errors + c.oversize + c.version_errors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(frame_args, st.binary(max_size=1500)), max_size=10))
def test_valid_frames_survive_garbage_that_ends_in_a_delimiter(items):
    stream = b""
    expected = []
    for item in items:
        if isinstance(item, tuple):
            stream += encode_frame(*item)
            expected.append((item[0], item[1], bytes(item[2])))
        else:
            stream += item + b"\x00"
    decoder = FrameDecoder()
    assert as_tuples(decoder.feed(stream)) == expected


def corrupted_stream(n_frames: int, rate: float, seed: int):
    """n_frames encoded frames with each byte replaced by another value with probability rate."""
    rng = random.Random(seed)
    frames = [(rng.choice(list(MsgType)), i % 65536, rng.randbytes(rng.randint(0, 48))) for i in range(n_frames)]
    encoded = [bytearray(encode_frame(*f)) for f in frames]
    damaged = []
    lost_delimiter = []
    for enc in encoded:
        hits = 0
        for i in range(len(enc)):
            if rng.random() < rate:
                enc[i] = (enc[i] + rng.randint(1, 255)) % 256
                hits += 1
        damaged.append(hits > 0)
        lost_delimiter.append(enc[-1] != 0)
    return frames, b"".join(encoded), damaged, lost_delimiter


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_corrupted_stream_delivers_exactly_the_undamaged_frames(seed):
    frames, stream, damaged, lost_delimiter = corrupted_stream(1000, 0.01, seed)
    # A frame is lost if it was hit, or if the frame before lost its delimiter and swallowed it:
    # the decoder is back in sync within one frame either way.
    survives = [not damaged[i] and (i == 0 or not lost_delimiter[i - 1]) for i in range(len(frames))]
    assert 0 < survives.count(False) < 400
    decoder = FrameDecoder()
    got = []
    for start in range(0, len(stream), 97):
        got += decoder.feed(stream[start : start + 97])
    assert as_tuples(got) == [(t, s, p) for (t, s, p), ok in zip(frames, survives) if ok]
    c = decoder.counters
    assert c.frames == survives.count(True)
    assert c.resyncs >= 1 and c.resyncs == c.crc_errors + c.cobs_errors + c.length_errors + c.oversize + c.version_errors
    # Every lost frame is counted, except that a lost delimiter merges two frames into one reject.
    assert c.resyncs >= survives.count(False) - sum(lost_delimiter)


# --- payload helpers ---------------------------------------------------------------------------


@given(
    st.integers(1, 8),
    st.integers(0, 30),
    st.sampled_from([np.int16, np.float32]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFFFFFFFFFF),
    st.data(),
)
def test_sensor_samples_round_trip(channels, n, dtype, rate, ts, data):
    if dtype is np.int16:
        values = data.draw(st.lists(st.integers(-32768, 32767), min_size=n * channels, max_size=n * channels))
    else:
        values = data.draw(st.lists(st.floats(width=32, allow_nan=False), min_size=n * channels, max_size=n * channels))
    samples = np.array(values, dtype=dtype).reshape(n, channels)
    payload = pack_sensor_samples(samples, rate, ts)
    assert payload[:2] == bytes([channels, 0 if dtype is np.int16 else 1])
    back = unpack_sensor_samples(payload)
    assert (back.channels, back.sample_rate_hz, back.timestamp_us) == (channels, rate, ts)
    assert back.samples.dtype == dtype and np.array_equal(back.samples, samples)


@given(st.lists(st.integers(-32768, 32767), max_size=510), st.integers(0, 0xFFFFFFFF))
def test_audio_chunk_round_trip(values, rate):
    samples = np.array(values, dtype=np.int16)
    back = unpack_audio_chunk(pack_audio_chunk(samples, rate))
    assert back.sample_rate == rate and back.samples.dtype == np.int16 and np.array_equal(back.samples, samples)


@given(st.binary(max_size=MAX_PAYLOAD))
def test_payload_parsers_raise_only_frame_error(payload):
    for parse in (unpack_sensor_samples, unpack_audio_chunk, unpack_ack):
        try:
            parse(payload)
        except FrameError:
            pass


def test_payload_helpers_refuse_what_does_not_fit():
    with pytest.raises(FrameError):
        pack_audio_chunk(np.zeros(511, np.int16), 16000)
    with pytest.raises(FrameError):
        pack_audio_chunk(np.zeros(4, np.float32), 16000)
    with pytest.raises(FrameError):
        pack_sensor_samples(np.zeros((4, 2), np.float64), 100, 0)
    with pytest.raises(FrameError):
        pack_sensor_samples(np.zeros((600, 1), np.int16), 100, 0)
    assert unpack_ack(pack_ack(65535, 2)) == (65535, 2)
    assert len(pack_audio_chunk(np.zeros(510, np.int16), 16000)) == MAX_PAYLOAD


# --- C implementation --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vector_check(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        if IN_CI:
            pytest.fail("gcc is required in CI to test firmware_bridge/c")
        pytest.skip("gcc is not installed; the C frame code is untested here")
    out = tmp_path_factory.mktemp("c") / "vector_check"
    src = BRIDGE / "c"
    subprocess.run(
        [gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(out),
         str(src / "edge_slm_frame.c"), str(src / "vector_check.c")],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out


def test_c_code_passes_every_vector(vector_check, tmp_path):
    # Render from the JSON (not the committed copy) so the C side checks the source of truth.
    txt = tmp_path / "vectors.txt"
    txt.write_text(render_vectors_txt(VECTORS), encoding="ascii")
    proc = subprocess.run([str(vector_check), str(txt)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # payload vectors: one check each, plus the parser checks of commands (2) and acks (1)
    extra = {"command": 2, "ack": 1}
    payload_checks = sum(1 + extra.get(v["payload_type"], 0) for v in VECTORS if v["kind"] == "payload")
    assert payload_checks > 0
    expected_checks = 2 * len(FRAME_VECTORS) + 2 * len(STREAM_VECTORS) + payload_checks
    assert proc.stdout.strip().splitlines()[-1] == f"{expected_checks} passed, 0 failed"


def test_c_checker_reports_a_wrong_vector(vector_check, tmp_path):
    vector = dict(FRAME_VECTORS[0], frame_hex="01" + FRAME_VECTORS[0]["frame_hex"][2:])
    txt = tmp_path / "bad.txt"
    txt.write_text(render_vectors_txt([vector]), encoding="ascii")
    proc = subprocess.run([str(vector_check), str(txt)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "FAIL empty_payload_heartbeat: encoder output differs" in proc.stdout
    assert proc.stdout.strip().endswith("0 passed, 2 failed")


def c_decode(vector_check: Path, stream: bytes) -> tuple[list[tuple[int, int, bytes]], dict]:
    proc = subprocess.run([str(vector_check), "--decode"], input=stream, capture_output=True, timeout=30, check=True)
    frames, counters = [], {}
    for line in proc.stdout.decode("ascii").splitlines():
        kind, *fields = line.split()
        if kind == "F":
            frames.append((int(fields[0]), int(fields[1]), bytes.fromhex(fields[2].replace("-", ""))))
        else:
            counters = dict(zip(COUNTER_ORDER, map(int, fields)))
    return frames, counters


@pytest.mark.parametrize("seed", [4, 5])
def test_c_decoder_agrees_with_python_on_a_corrupted_stream(vector_check, seed):
    _, stream, _, _ = corrupted_stream(1000, 0.01, seed)
    stream += bytes([0x41]) * 1500 + b"\x00" + encode_frame(MsgType.LOG, 1, b"tail")
    decoder = FrameDecoder()
    python_frames = as_tuples(decoder.feed(stream))
    frames, counters = c_decode(vector_check, stream)
    assert frames == python_frames
    assert counters == asdict(decoder.counters)


def test_c_decoder_agrees_with_python_on_random_bytes(vector_check):
    rng = random.Random(6)
    valid = [encode_frame(rng.randrange(256), rng.randrange(65536), rng.randbytes(rng.randrange(1025))) for _ in range(50)]
    stream = b"".join(rng.randbytes(rng.randrange(300)) + v for v in valid) + rng.randbytes(5000)
    decoder = FrameDecoder()
    python_frames = as_tuples(decoder.feed(stream))
    frames, counters = c_decode(vector_check, stream)
    assert frames == python_frames and counters == asdict(decoder.counters)
    assert counters["frames"] > 0 and counters["resyncs"] > 0
