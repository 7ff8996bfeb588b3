"""The virtual MCU program itself: options, audio file handling, and its device-side decoder under
hostile input (built with AddressSanitizer + UBSan), over a socketpair and the plain SerialLink.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from firmware_bridge.link import SerialLink
from firmware_bridge.protocol import (
    AckStatus,
    FrameDecoder,
    MsgType,
    encode_frame,
    pack_command,
    unpack_ack,
    unpack_audio_chunk,
    unpack_hello,
)
from tests.fixtures_mcu import BRIDGE_C, compile_c


def run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30)


def test_help_and_option_errors_say_what_to_fix(virtual_mcu_binary, tmp_path) -> None:
    assert run(virtual_mcu_binary, "--help").returncode == 0
    cases = [
        ((), "exactly one of --pty LINK or --fd N"),
        (("--pty", str(tmp_path / "t"), "--imu-block", "100"), "imu-block <= 84"),
        (("--pty", str(tmp_path / "t"), "--bogus", "1"), "unknown option --bogus"),
        (("--pty",), "--pty needs a value"),
        (("--pty", str(tmp_path / "t"), "--audio", str(tmp_path / "missing.wav")), "cannot read audio file"),
    ]
    for args, message in cases:
        proc = run(virtual_mcu_binary, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_stereo_wav_is_refused_with_advice(virtual_mcu_binary, tmp_path) -> None:
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(400))
    proc = run(virtual_mcu_binary, "--pty", str(tmp_path / "t"), "--audio", str(path))
    assert proc.returncode == 2 and "not 16-bit mono PCM" in proc.stderr and "sox" in proc.stderr


def _exchange(sock: socket.socket, decoder: FrameDecoder, want: int, timeout: float = 10.0) -> list:
    """Read from sock until `want` frames arrived."""
    sock.settimeout(timeout)
    frames = []
    while len(frames) < want:
        data = sock.recv(65536)
        assert data, "virtual MCU closed the connection"
        frames += decoder.feed(data)
    return frames


def test_raw_pcm_over_a_socketpair(virtual_mcu_binary, tmp_path) -> None:
    pcm = (np.arange(1000) * 37 % 65536 - 32768).astype("<i2")
    raw = tmp_path / "tone.raw"
    raw.write_bytes(pcm.tobytes())
    host, dev = socket.socketpair()
    proc = subprocess.Popen([str(virtual_mcu_binary), "--fd", str(dev.fileno()), "--audio", str(raw),
                             "--audio-rate", "8000", "--audio-block", "100", "--speed", "0", "--heartbeat-ms", "0"],
                            pass_fds=(dev.fileno(),), stderr=subprocess.DEVNULL)
    dev.close()
    try:
        decoder = FrameDecoder()
        boot = _exchange(host, decoder, 2)
        hello = unpack_hello(boot[0].payload)
        assert [s.name for s in hello.streams] == ["imu", "mic"] and hello.streams[1].sample_rate_hz == 8000
        host.sendall(encode_frame(MsgType.COMMAND, 0, pack_command("start", {"stream": "mic"})))
        frames = _exchange(host, decoder, 13)  # ack, log, 10 chunks, "audio file finished"
        chunks = [unpack_audio_chunk(f.payload) for f in frames if f.msg_type == MsgType.AUDIO_CHUNK]
        np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), pcm)
        assert [unpack_ack(f.payload) for f in frames if f.msg_type == MsgType.ACK] == [(0, AckStatus.OK)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        host.close()


def test_device_decoder_survives_hostile_host_bytes_under_sanitizers(tmp_path) -> None:
    binary = compile_c(tmp_path / "virtual_mcu_asan", BRIDGE_C / "virtual_mcu.c", BRIDGE_C / "edge_slm_device.c",
                       BRIDGE_C / "edge_slm_frame.c",
                       extra=("-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"))
    host, dev = socket.socketpair()
    env = dict(os.environ, ASAN_OPTIONS="abort_on_error=0:exitcode=66", UBSAN_OPTIONS="exitcode=67")
    proc = subprocess.Popen([str(binary), "--fd", str(dev.fileno()), "--heartbeat-ms", "0"],
                            pass_fds=(dev.fileno(),), stderr=subprocess.PIPE, text=True, env=env)
    dev.close()
    rng = random.Random(5)
    decoder = FrameDecoder()
    try:
        _exchange(host, decoder, 2)  # boot hello + log
        expected = {}
        for seq in range(60):
            # garbage, oversize runs, truncated frames and malformed commands between valid pings
            junk = rng.choice([rng.randbytes(rng.randrange(1, 300)), bytes([0x41]) * 1500,
                               encode_frame(MsgType.COMMAND, 9999, rng.randbytes(rng.randrange(0, 40)))[:-1],
                               encode_frame(MsgType.COMMAND, 9999, rng.randbytes(rng.randrange(0, 40))),
                               encode_frame(MsgType.COMMAND, 9999, bytes([5, 8]) + b"set_rate" + bytes([1, 4])
                                            + b"rate" + bytes([9]) + b"999999999")])
            host.sendall(junk + b"\x00" + encode_frame(MsgType.COMMAND, seq, pack_command("ping")))
            expected[seq] = AckStatus.OK
        host.sendall(encode_frame(MsgType.COMMAND, 100, b"\x07"))  # no name at all
        expected[100] = AckStatus.BAD_ARGS
        acks: dict[int, int] = {}
        while not set(expected) <= set(acks):
            for f in _exchange(host, decoder, 1):
                if f.msg_type == MsgType.ACK:
                    seq, status = unpack_ack(f.payload)
                    acks[seq] = status
        assert {s: acks[s] for s in expected} == expected
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        host.close()
    assert proc.returncode == 0, err
    assert "runtime error" not in err and "AddressSanitizer" not in err


def test_serial_link_reads_the_virtual_mcu_pty(virtual_mcu) -> None:
    mcu = virtual_mcu("--autostart", "--speed", "0", "--frames", "500", "--linger", "30")
    with SerialLink(str(mcu.link)) as link:
        link.send(MsgType.HELLO)
        seen = []
        while len(seen) < 300:
            frame = link.get(timeout=10)
            assert frame is not None, "no frames from the virtual MCU"
            seen.append(frame)
        assert any(f.msg_type == MsgType.SENSOR_SAMPLES for f in seen)
        assert link.counters()["resyncs"] <= 1  # at most the frame cut by the open-time flush


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_report_counts_match_a_python_decode(virtual_mcu_binary, rate) -> None:
    host, dev = socket.socketpair()
    proc = subprocess.Popen([str(virtual_mcu_binary), "--fd", str(dev.fileno()), "--autostart", "--speed", "0",
                             "--imu-block", "8", "--corrupt", str(rate), "--seed", "3", "--frames", "2000",
                             "--linger", "0"], pass_fds=(dev.fileno(),), stderr=subprocess.PIPE, text=True)
    dev.close()
    data = bytearray()
    host.settimeout(30)
    while chunk := host.recv(65536):
        data += chunk
    _, err = proc.communicate(timeout=30)
    host.close()
    report = dict(kv.split("=", 1) for kv in err.split("report ", 1)[1].split())
    lost = {int(x) for x in report["lost_seqs"].split(",") if x}
    decoder = FrameDecoder()
    got = {f.seq for f in decoder.feed(bytes(data) + b"\x00")}
    assert got == set(range(2000)) - lost
    assert int(report["corrupted"]) <= len(lost) and (len(lost) > 100) == (rate > 0)
