"""SerialLink over real byte streams: loop://, a pty pair, and a TCP server that restarts.

No mocks; every test moves real bytes through pyserial.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from edge_slm.errors import ConfigError
from firmware_bridge.link import SerialLink
from firmware_bridge.protocol import Frame, MsgType, encode_frame


def _wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _collect(link: SerialLink, n: int, timeout: float = 5.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < n and time.monotonic() < deadline:
        frame = link.get(timeout=0.05)
        if frame is not None:
            frames.append(frame)
    return frames


def test_loop_round_trip_of_every_message_type() -> None:
    rng = random.Random(1)
    sent = []
    with SerialLink("loop://") as link:
        for i in range(700):
            msg_type = list(MsgType)[i % len(MsgType)]
            payload = rng.randbytes(rng.choice([0, 1, 3, 254, 255, 1024, rng.randrange(1025)]))
            seq = link.send(msg_type, payload)
            assert seq == i
            sent.append((int(msg_type), seq, payload))
        got = _collect(link, len(sent))
        counters = link.counters()
    assert [(f.msg_type, f.seq, f.payload) for f in got] == sent
    assert counters["frames_in"] == counters["frames_out"] == 700
    assert counters["bytes_in"] == counters["bytes_out"]
    assert counters["resyncs"] == 0 and counters["open"] is True


def test_unknown_types_are_counted_not_delivered() -> None:
    with SerialLink("loop://") as link:
        link.send(0x7E, b"future")
        link.send(MsgType.HEARTBEAT)
        frame = link.get(timeout=2)
        assert frame is not None and frame.msg_type == MsgType.HEARTBEAT
        assert link.counters()["unknown_types"] == 1


def test_on_frame_callback_gets_frames_and_survives_its_own_exceptions() -> None:
    got: list[Frame] = []

    def on_frame(frame: Frame) -> None:
        got.append(frame)
        if len(got) == 1:
            raise RuntimeError("bug in user code")

    with SerialLink("loop://", on_frame=on_frame) as link:
        for _ in range(5):
            link.send(MsgType.LOG, b"hi")
        assert _wait_for(lambda: len(got) == 5)


@pytest.fixture
def pty_link():
    master, slave = os.openpty()
    link = SerialLink(os.ttyname(slave))
    yield link, master
    link.close()
    os.close(master)
    os.close(slave)


def test_pty_with_corruption_delivers_only_valid_frames_and_recovers(pty_link) -> None:
    link, master = pty_link
    rng = random.Random(7)
    frames = {}
    stream = bytearray(b"\x00")
    spans = {}  # seq -> (start, end) of its bytes, including the delimiter before and after it
    for seq in range(1500):
        msg_type = rng.choice(list(MsgType))
        payload = rng.randbytes(rng.randrange(0, 120))
        frames[seq] = (int(msg_type), payload)
        start = len(stream) - 1
        stream += encode_frame(msg_type, seq, payload)
        spans[seq] = (start, len(stream))
    clean = bytes(stream)
    for i in range(len(stream)):  # 1% of bytes hit by noise, zeros included
        if rng.random() < 0.01:
            stream[i] ^= rng.randrange(1, 256)
    # a frame survives exactly when neither its bytes nor the delimiters around it were hit
    intact = {s for s, (a, b) in spans.items() if stream[a:b] == clean[a:b]}
    tail = [(int(MsgType.HEARTBEAT), 60000 + k, b"") for k in range(20)]
    stream += b"\x00" + b"".join(encode_frame(t, s, p) for t, s, p in tail)

    i = 0
    while i < len(stream):  # random chunk sizes, from single bytes to several frames
        n = rng.choice([1, 2, 7, 64, 500, 3000])
        os.write(master, bytes(stream[i : i + n]))
        i += n

    got: list[Frame] = []
    while not got or got[-1].seq != tail[-1][1]:
        frame = link.get(timeout=5)
        assert frame is not None, f"link stopped delivering after {len(got)} frames"
        got.append(frame)
    counters = link.counters()

    tail_got = [(f.msg_type, f.seq, f.payload) for f in got if f.seq >= 60000]
    assert tail_got == tail
    for f in got:
        if f.seq < 60000:
            assert frames[f.seq] == (f.msg_type, f.payload), "a damaged frame was delivered"
    assert {f.seq for f in got if f.seq < 60000} == intact
    assert 0 < len(intact) < 1500
    assert counters["resyncs"] > 0 and counters["frames"] == len(got)
    assert counters["resyncs"] == sum(
        counters[k]
        for k in ("crc_errors", "cobs_errors", "length_errors", "oversize", "version_errors")
    )
    assert counters["bytes_in"] == len(stream)


class _RestartableServer:
    """A TCP server on a fixed port that can be stopped (as if unplugged) and started again."""

    def __init__(self) -> None:
        self.port = 0
        self.conn: socket.socket | None = None
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self.conn = None

        def accept() -> None:
            try:
                self.conn, _ = listener.accept()
            except OSError:
                pass  # stopped before anyone connected

        threading.Thread(target=accept, daemon=True).start()

    def stop(self) -> None:
        for sock in (self.conn, self._listener):
            if sock is not None:
                sock.close()
        self.conn = self._listener = None


def test_link_reopens_after_server_restart_and_delivers_new_frames() -> None:
    server = _RestartableServer()
    server.start()
    link = SerialLink(f"socket://127.0.0.1:{server.port}", reopen_min_s=0.05, reopen_max_s=0.3)
    try:
        assert _wait_for(lambda: server.conn is not None)
        server.conn.sendall(encode_frame(MsgType.LOG, 1, b"before"))
        assert link.get(timeout=5).payload == b"before"

        server.stop()  # the "unplug": the peer vanishes and refuses reconnects for a while
        assert _wait_for(lambda: not link.counters()["open"])
        time.sleep(0.5)  # several refused reopen attempts
        server.start()  # the "replug", same port
        assert _wait_for(lambda: link.counters()["open"] and server.conn is not None)

        for seq in range(2, 12):
            server.conn.sendall(encode_frame(MsgType.LOG, seq, b"after"))
        got = _collect(link, 10)
        assert [f.seq for f in got] == list(range(2, 12))
        assert link.counters()["reopens"] >= 1
        link.send(MsgType.ACK, b"\x02\x00\x00")  # the write side works again too
        server.conn.settimeout(5)
        assert server.conn.recv(64) == encode_frame(MsgType.ACK, 0, b"\x02\x00\x00")
    finally:
        link.close()
        server.stop()


def test_nonexistent_device_gives_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"/dev/ttyNOPE0.*plugged in"):
        SerialLink("/dev/ttyNOPE0")


def test_unknown_url_scheme_gives_clear_error() -> None:
    with pytest.raises(ConfigError, match="nope://x"):
        SerialLink("nope://x")
