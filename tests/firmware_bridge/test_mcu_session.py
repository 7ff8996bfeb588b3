"""McuSession against the virtual MCU (real C, compiled with gcc) on a real pty or TCP socket.

Handshake, commands and acks, IMU and espeak-ng audio blocks, heartbeats and staleness, 1% byte
corruption with exact loss accounting, and unplug/replug with a new stream id.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_slm.errors import ConfigError, FrameError
from edge_slm.streams import AudioBlock, SensorBlock
from firmware_bridge.mcu import McuSession, link_from_url
from firmware_bridge.protocol import AckStatus, LogLevel, StreamKind
from tests.fixtures_mcu import read_wav_int16


class Recorder:
    """Collects what a session delivers, thread-safely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: list[AudioBlock | SensorBlock] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def on_block(self, block: AudioBlock | SensorBlock) -> None:
        with self.lock:
            self.blocks.append(block)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((kind, data))

    def sensor(self, stream: str | None = None) -> list[SensorBlock]:
        with self.lock:
            return [b for b in self.blocks if isinstance(b, SensorBlock) and stream in (None, b.stream)]

    def audio(self) -> list[AudioBlock]:
        with self.lock:
            return [b for b in self.blocks if isinstance(b, AudioBlock)]

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [d for k, d in self.events if k == kind]


def wait_for(cond: Callable[[], object], timeout: float = 20.0, what: str | Callable[[], str] = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.02)


@pytest.fixture
def session_for():  # noqa: ANN201
    """Factory: session_for(url, **kw) -> (session, recorder); sessions are stopped at teardown."""
    made: list[McuSession] = []

    def make(url: str, **kw: Any) -> tuple[McuSession, Recorder]:
        rec = Recorder()
        session = McuSession.from_url(url, on_block=rec.on_block, on_event=rec.on_event, **kw)
        made.append(session)
        return session, rec

    yield make
    for s in made:
        s.stop()


def test_handshake_commands_and_imu_blocks(virtual_mcu, session_for) -> None:
    # ten times real time: fast, yet paced so the host never has to drop frames on a busy machine
    mcu = virtual_mcu("--speed", "10", "--vib-hz", "25", "--fault-harmonic", "3", "--fault-amp", "0.4",
                      "--imu-rate", "400", "--boot-id", "0x1234abcd")
    session, rec = session_for(f"serial://{mcu.link}?baud=921600")
    hello = session.start(timeout=10)
    assert (hello.device_name, hello.boot_id, hello.protocol_version) == ("virtual-mcu", 0x1234ABCD, 1)
    imu = hello.stream(StreamKind.SENSOR)
    assert imu is not None and imu.name == "imu" and imu.sample_rate_hz == 400
    assert imu.channels == ("ax", "ay", "az", "gx", "gy", "gz")
    assert imu.scales[0] == pytest.approx(9.80665 / 8192, rel=1e-6)
    assert hello.stream(StreamKind.AUDIO) is None  # no --audio file: no microphone stream
    assert session.stream.startswith("virtual-mcu/1234abcd/")
    assert session.capabilities == hello

    assert session.command("ping").ok
    unknown = session.command("self_destruct", check=False)
    assert unknown.status == AckStatus.UNKNOWN_COMMAND
    with pytest.raises(FrameError, match="bad_args"):
        session.command("set_rate", {"rate": "fast"})
    with pytest.raises(FrameError, match="bad_args"):
        session.command("start", {"stream": "gps"})
    wait_for(lambda: any("unknown command self_destruct" in e["text"] for e in rec.of("log")), what="device log")
    assert any(e["level"] == LogLevel.WARNING for e in rec.of("log"))

    ack = session.command("start", {"stream": "imu"})
    assert ack.ok and ack.attempts == 1
    wait_for(lambda: sum(len(b.samples) for b in rec.sensor()) >= 4000, what="4000 IMU samples")
    session.command("stop")
    blocks = rec.sensor()
    x = np.concatenate([b.samples for b in blocks])
    assert x.shape[1] == 6 and blocks[0].channels == imu.channels and not np.isnan(x).any()
    assert all(b.sample_rate == 400 and b.stream == session.stream for b in blocks)
    # device time is continuous from block to block (no loss on a clean link)
    for a, b in zip(blocks, blocks[1:]):
        assert b.t0 == pytest.approx(a.t0 + len(a.samples) / 400, abs=1e-6)
    # physics made it through the int16 scaling: gravity on z, vibration at 25 Hz, fault at 75 Hz
    assert x[:, 2].mean() == pytest.approx(9.80665, abs=0.05)
    spectrum = np.abs(np.fft.rfft(x[:4000, 0] - x[:4000, 0].mean()))
    freqs = np.fft.rfftfreq(4000, 1 / 400)
    top2 = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert top2 == pytest.approx([25.0, 75.0], abs=0.2)

    # set_rate changes the stream and the capabilities the device re-announces
    session.command("set_rate", {"stream": "imu", "rate": 100})
    session.command("hello")
    wait_for(lambda: session.capabilities.stream(StreamKind.SENSOR).sample_rate_hz == 100, what="new hello")
    n_before = len(rec.sensor())
    session.command("start")
    wait_for(lambda: len(rec.sensor()) > n_before + 5, what="blocks at 100 Hz")
    assert {b.sample_rate for b in rec.sensor()[n_before:]} == {100.0}
    counters = session.counters
    assert counters["commands"] >= 9 and counters["acks"] >= 9 and counters["lost_frames"] == 0
    assert counters["link_resyncs"] == 0 and counters["bad_payloads"] == 0


def test_espeak_speech_arrives_sample_exact(virtual_mcu, session_for, speech_wav) -> None:
    pcm, rate = read_wav_int16(speech_wav)
    assert len(pcm) > rate  # more than a second of speech
    mcu = virtual_mcu("--speed", "0", "--audio", str(speech_wav), "--audio-block", "300")
    session, rec = session_for(str(mcu.link))
    hello = session.start(timeout=10)
    mic = hello.stream(StreamKind.AUDIO)
    assert mic is not None and mic.name == "mic" and mic.sample_rate_hz == rate
    session.command("start", {"stream": "mic"})
    wait_for(lambda: any(e["text"] == "audio file finished" for e in rec.of("log")), what="end of audio")
    audio = rec.audio()
    assert rec.sensor() == []  # only the microphone was started
    got = np.concatenate([b.samples for b in audio])
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768.0)
    assert {b.sample_rate for b in audio} == {rate}
    assert audio[0].t0 == 0.0
    assert audio[-1].t0 == pytest.approx((len(pcm) - len(audio[-1].samples)) / rate)
    assert max(len(b.samples) for b in audio) == 300


def test_heartbeats_and_staleness(virtual_mcu, session_for) -> None:
    mcu = virtual_mcu("--heartbeat-ms", "100")
    session, rec = session_for(str(mcu.link), stale_after_s=2.0)
    session.start(timeout=10)
    wait_for(lambda: len(rec.of("heartbeat")) >= 3, what="heartbeats")
    hbs = rec.of("heartbeat")
    assert hbs[-1]["uptime_ms"] > hbs[0]["uptime_ms"]
    assert hbs[-1]["frames_sent"] > hbs[0]["frames_sent"] and hbs[-1]["rx_frames"] >= 1
    assert session.alive and session.counters["device_frames_dropped"] == 0
    mcu.send_signal(signal.SIGSTOP)  # the firmware hangs: the port stays open but goes silent
    wait_for(lambda: rec.of("stale"), what="stale event")
    assert not session.alive and not session.counters["alive"]
    mcu.send_signal(signal.SIGCONT)
    n_alive = len(rec.of("alive"))
    wait_for(lambda: len(rec.of("alive")) > n_alive, what="alive again")
    assert session.alive and session.counters["stale"] >= 1


def test_one_percent_corruption_loses_exactly_the_damaged_frames(virtual_mcu, session_for) -> None:
    n_frames = 3000
    mcu = virtual_mcu("--speed", "0", "--corrupt", "0.01", "--seed", "11", "--imu-block", "4",
                      "--heartbeat-ms", "20", "--frames", str(n_frames), "--linger", "60")
    session, rec = session_for(str(mcu.link), hello_retry_s=0.2)
    session.start(timeout=20)
    session.command("start", {"stream": "imu"}, timeout=0.5, retries=20)
    report = mcu.report()
    assert report["sent"] == n_frames and report["dropped"] == 0
    lost = report["lost_seqs"]
    assert 0.2 * n_frames < len(lost) < 0.8 * n_frames, "corruption rate is not what the test expects"
    assert report["corrupted"] <= len(lost)
    last_delivered = max(set(range(report["last_seq"] + 1)) - lost)
    # (>=: a command retried after a lost ack can still be answered after the report)
    wait_for(lambda: session.last_seq is not None and session.last_seq >= last_delivered, timeout=60,
             what=lambda: f"the last intact frame {last_delivered}, got {session.last_seq} {session.counters}")

    first_seen = rec.of("alive")[0]["seq"]
    missing = {(g["first_seq"] + k) & 0xFFFF for g in rec.of("gap") for k in range(g["missing"])}
    missing = {s for s in missing if s < last_delivered}
    # resync within one frame: what the host misses is exactly what the MCU damaged (or the frame
    # right after a damaged delimiter), nothing more
    assert missing == {s for s in lost if first_seen < s < last_delivered}
    c = session.counters
    assert c["lost_frames"] >= len(missing) and c["bad_payloads"] == 0
    assert c["link_resyncs"] > 0 and c["link_frames"] == c["frames"]

    blocks = rec.sensor()
    x = np.concatenate([b.samples for b in blocks])
    nan_rows = np.isnan(x).all(axis=1)
    assert nan_rows.any() and not np.isnan(x[~nan_rows]).any()  # whole samples missing, never half
    assert c["nan_samples"] == int(nan_rows.sum()) * 6
    # lost sensor frames became NaN, so device time still runs without a jump
    for a, b in zip(blocks, blocks[1:]):
        assert b.t0 == pytest.approx(a.t0 + len(a.samples) / a.sample_rate, abs=1e-6)
    assert np.isfinite(x[~nan_rows, 2]).all() and abs(np.nanmean(x[:, 2]) - 9.80665) < 0.1


def test_unplug_and_replug_gives_a_new_stream(virtual_mcu, session_for) -> None:
    first = virtual_mcu("--autostart", "--speed", "4", "--boot-id", "111")
    session, rec = session_for(str(first.link), stale_after_s=1.0)
    session.start(timeout=10)
    old_stream = session.stream
    wait_for(lambda: len(rec.sensor(old_stream)) >= 5, what="blocks before unplug")

    first.kill()  # yanked: no goodbye, the pty disappears
    wait_for(lambda: not session.counters["link_open"], what="link notices the unplug")
    time.sleep(0.3)  # unplugged for a moment; the link keeps retrying
    assert not first.link.exists()

    second = virtual_mcu("--speed", "4", "--boot-id", "222", link=first.link)
    wait_for(lambda: session.stream != old_stream and session.capabilities.boot_id == 222, timeout=30,
             what="hello from the replugged device")
    new_stream = session.stream
    assert new_stream.startswith("virtual-mcu/000000de/")
    session.command("start", {"stream": "imu"})
    wait_for(lambda: len(rec.sensor(new_stream)) >= 5, what="blocks after replug")
    assert rec.of("reconnect") and session.counters["reconnects"] >= 1 and session.counters["streams"] == 2
    new_blocks = rec.sensor(new_stream)
    assert not np.isnan(np.concatenate([b.samples for b in new_blocks])).any()
    second.stop()


def test_socket_url_and_inherited_fd(virtual_mcu_binary, session_for) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    session, rec = session_for(f"socket://127.0.0.1:{port}")
    conn, _ = server.accept()
    proc = subprocess.Popen([str(virtual_mcu_binary), "--fd", str(conn.fileno()), "--autostart", "--speed", "0",
                             "--frames", "400", "--linger", "30"], pass_fds=(conn.fileno(),),
                            stderr=subprocess.DEVNULL)
    try:
        session.start(timeout=10)
        wait_for(lambda: session.last_seq is not None and session.last_seq >= 399, what="400 frames over TCP")
        assert session.command("ping").ok
        assert session.counters["lost_frames"] == 0 and len(rec.sensor()) > 300
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        conn.close()
        server.close()


def test_url_parsing_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="only baud="):
        link_from_url(f"serial://{tmp_path}/tty?bauds=9600")
    with pytest.raises(ConfigError, match="not an integer"):
        link_from_url(f"serial://{tmp_path}/tty?baud=fast")
    with pytest.raises(ConfigError, match="names no device"):
        link_from_url("serial://")
    with pytest.raises(ConfigError, match="does not exist"):
        link_from_url(f"serial://{tmp_path}/ttyNOPE?baud=921600")


def test_start_times_out_with_advice_when_nothing_answers(session_for) -> None:
    session, _ = session_for("loop://")  # frames come straight back: a hello request is not a hello
    with pytest.raises(FrameError, match="no hello from the device"):
        session.start(timeout=0.6)
    with pytest.raises(FrameError, match="no ack for command 'ping'"):
        session.command("ping", timeout=0.1, retries=1)


def test_session_waits_for_a_device_plugged_in_later(virtual_mcu, session_for, tmp_path) -> None:
    link = tmp_path / "ttyLATER"
    session, rec = session_for(f"serial://{link}?baud=115200")  # nothing there yet: no error
    with pytest.raises(FrameError, match="the port is not open yet"):
        session.start(timeout=0.5)
    assert session.counters()["link_open"] is False  # counters works as a call too
    virtual_mcu("--autostart", "--speed", "2", link=link)
    hello = session.wait_hello(timeout=30)
    assert hello.device_name == "virtual-mcu" and session.stream
    wait_for(lambda: len(rec.sensor(session.stream)) >= 3, what="blocks from the late device")
