"""The Arduino example sketch: its C copies match firmware_bridge/c, and its logic (imu_mic_app.c)
runs on a simulated board compiled with gcc, checked frame by frame by the Python decoder.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from firmware_bridge.protocol import (
    AckStatus,
    FrameDecoder,
    MsgType,
    StreamKind,
    encode_frame,
    pack_command,
    unpack_ack,
    unpack_audio_chunk,
    unpack_heartbeat,
    unpack_hello,
    unpack_log,
    unpack_sensor_samples,
)
from tests.fixtures_mcu import BRIDGE_C, compile_c, require_tool

SKETCH = BRIDGE_C.parent / "examples" / "arduino" / "edge_slm_imu_mic"
COPIES = ["edge_slm_frame.h", "edge_slm_frame.c", "edge_slm_device.h", "edge_slm_device.c", "imu_mic_app.h",
          "imu_mic_app.c"]


@pytest.mark.parametrize("name", COPIES)
def test_sketch_copies_match_the_library(name: str) -> None:
    assert (SKETCH / name).read_bytes() == (BRIDGE_C / name).read_bytes(), (
        f"{SKETCH / name} differs from firmware_bridge/c/{name}: copy it again (cp firmware_bridge/c/{name} {SKETCH}/)"
    )


def test_ino_is_thin_and_uses_only_the_app_api() -> None:
    ino = (SKETCH / "edge_slm_imu_mic.ino").read_text()
    assert len(ino.splitlines()) < 100
    called = set(re.findall(r"\b(imu_mic_\w+|edge_slm_\w+)\s*\(", ino))
    header = (SKETCH / "imu_mic_app.h").read_text() + (SKETCH / "edge_slm_device.h").read_text()
    assert called and all(re.search(rf"\b{name}\s*\(", header) for name in called)
    assert "SERIAL_BAUD" in ino and "PDM.begin" in ino and "IMU.readAcceleration" in ino
    assert (SKETCH / "README.md").is_file()


def test_sketch_sources_compile_as_c99_and_cpp(tmp_path: Path) -> None:
    # what the Arduino toolchain does: .c files as C, and the header included from C++ (.ino)
    for name in ("imu_mic_app.c", "edge_slm_device.c", "edge_slm_frame.c"):
        compile_c(tmp_path / (name + ".o"), SKETCH / name, extra=("-c", "-Wshadow"))
    cpp = tmp_path / "probe.cpp"
    cpp.write_text('#include "imu_mic_app.h"\nint probe(imu_mic_app *a) { imu_mic_poll(a); return 0; }\n')
    gxx = require_tool("g++", "the sketch includes the C headers from C++")
    proc = subprocess.run([gxx, "-std=c++11", "-Wall", "-Werror", "-c", "-I", str(SKETCH), str(cpp), "-o",
                           str(tmp_path / "probe.o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def sketch_run(tmp_path_factory) -> tuple[list, dict[int, int], FrameDecoder]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("sketch")
    harness = compile_c(tmp / "harness", Path(__file__).with_name("sketch_harness.c"), SKETCH / "imu_mic_app.c",
                        SKETCH / "edge_slm_device.c", SKETCH / "edge_slm_frame.c", extra=("-I", str(SKETCH)))
    host = [
        (MsgType.HELLO, b""),
        (MsgType.COMMAND, pack_command("ping")),
        (MsgType.COMMAND, pack_command("start", {"stream": "imu"})),
        (MsgType.COMMAND, pack_command("start", {"stream": "mic"})),
        (MsgType.COMMAND, pack_command("set_rate", {"stream": "imu", "rate": "50"})),
        (MsgType.COMMAND, pack_command("hello")),
        (MsgType.COMMAND, pack_command("launch")),
        (MsgType.COMMAND, b"\x03\x09trunc"),  # malformed: name runs past the end
    ]
    stream = b"\x00" + b"".join(encode_frame(t, seq, p) for seq, (t, p) in enumerate(host))
    (tmp / "host.bin").write_bytes(stream)
    proc = subprocess.run([str(harness), str(tmp / "host.bin"), "100", "4000"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    decoder = FrameDecoder()
    frames = decoder.feed(proc.stdout)
    acks = dict(unpack_ack(f.payload) for f in frames if f.msg_type == MsgType.ACK)
    return frames, acks, decoder


def test_sketch_answers_commands(sketch_run) -> None:
    frames, acks, decoder = sketch_run
    assert decoder.counters.resyncs == 0
    assert [f.seq for f in frames] == list(range(len(frames)))  # one seq counter, nothing dropped
    assert acks == {1: AckStatus.OK, 2: AckStatus.OK, 3: AckStatus.OK, 4: AckStatus.FAILED, 5: AckStatus.OK,
                    6: AckStatus.UNKNOWN_COMMAND, 7: AckStatus.BAD_ARGS}
    hellos = [unpack_hello(f.payload) for f in frames if f.msg_type == MsgType.HELLO]
    assert len(hellos) == 3  # boot, the empty hello request, the hello command
    assert {h.boot_id for h in hellos} == {0xB007} and hellos[0].device_name == "sim-board"
    # set_rate was refused, so the re-announced rate is still the hardware's
    assert hellos[-1].stream(StreamKind.SENSOR).sample_rate_hz == 104
    assert hellos[-1].stream(StreamKind.AUDIO).sample_rate_hz == 16000
    logs = [unpack_log(f.payload).text for f in frames if f.msg_type == MsgType.LOG]
    assert logs[0] == "boot ok"


def test_sketch_imu_blocks_survive_the_micros_wrap(sketch_run) -> None:
    frames, _, _ = sketch_run
    hello = unpack_hello(next(f.payload for f in frames if f.msg_type == MsgType.HELLO))
    scales = np.array(hello.stream(StreamKind.SENSOR).scales, np.float32)
    blocks = [unpack_sensor_samples(f.payload) for f in frames if f.msg_type == MsgType.SENSOR_SAMPLES]
    assert len(blocks) >= 25 and all(b.samples.shape == (13, 6) and b.sample_rate_hz == 104 for b in blocks)
    ts = np.array([b.timestamp_us for b in blocks], dtype=np.int64)
    assert (np.diff(ts) > 0).all(), "timestamps went backwards at the 32-bit micros() wrap"
    assert ts[0] < 2**32 < ts[-1]
    assert np.allclose(np.diff(ts), 13 * 1e6 / 104, atol=200)
    x = np.concatenate([b.samples for b in blocks]).astype(np.float32) * scales
    assert np.allclose(x[:, 1], -0.25 * 9.80665, atol=0.01) and np.allclose(x[:, 2], 9.80665, atol=0.01)
    assert np.allclose(x[:, 4], np.deg2rad(250), atol=0.01)
    assert x[:, 0].max() == pytest.approx(0.5 * 9.80665, abs=0.1) and x[:, 0].min() < -4.5


def test_sketch_audio_is_continuous_and_heartbeats_count(sketch_run) -> None:
    frames, _, _ = sketch_run
    chunks = [unpack_audio_chunk(f.payload) for f in frames if f.msg_type == MsgType.AUDIO_CHUNK]
    assert len(chunks) > 100 and {c.sample_rate for c in chunks} == {16000}
    pcm = np.concatenate([c.samples for c in chunks]).astype(np.int64)
    np.testing.assert_array_equal(pcm, np.arange(len(pcm)) % 30000)
    hbs = [unpack_heartbeat(f.payload) for f in frames if f.msg_type == MsgType.HEARTBEAT]
    assert [hb.uptime_ms for hb in hbs] == [1000, 2000, 3000]
    assert hbs[-1].rx_frames == 8 and hbs[-1].rx_errors == 0 and hbs[-1].frames_dropped == 0
    sent_before = sum(1 for f in frames if f.seq < next(f2.seq for f2 in frames if f2.msg_type == MsgType.HEARTBEAT
                                                        and unpack_heartbeat(f2.payload).uptime_ms == 3000))
    assert hbs[-1].frames_sent == sent_before
