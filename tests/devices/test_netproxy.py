"""FaultProxy with real sockets: an echo server, and a real mosquitto with paho clients behind it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.netproxy import FaultProxy
from tests.conftest import Collector, free_port


class TcpServer:
    """An asyncio TCP server on its own thread. mode "echo": send back what arrives, forward EOF;
    "after_eof": read until EOF, then send sha256(data) + data back (exercises half-close)."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0,
                                                                            backlog=2048))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.mode == "echo":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            else:
                data = await reader.read()
                writer.write(hashlib.sha256(data).digest() + data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def echo():
    s = TcpServer("echo")
    yield s
    s.close()


@pytest.fixture(scope="module")
def echo_proxy(echo):
    p = FaultProxy("127.0.0.1", echo.port, jitter_ms=2.0, seed=1).start()
    yield p
    p.stop()


def exchange(port: int, chunks: list[bytes], half_close: bool = True, timeout: float = 60.0) -> bytes:
    """Send chunks on one connection while a thread reads everything that comes back until EOF."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = bytearray()

    def read() -> None:
        while d := s.recv(65536):
            got.extend(d)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    for c in chunks:
        s.sendall(c)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    t.join(timeout)
    assert not t.is_alive(), "no EOF came back through the proxy"
    s.close()
    return bytes(got)


def wait_until(cond, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 150_000), min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1))
def test_bytes_pass_unchanged_both_ways_whatever_the_chunking(echo_proxy, sizes, seed):
    rng = random.Random(seed)
    chunks = [rng.randbytes(n) for n in sizes]
    assert exchange(echo_proxy.port, chunks) == b"".join(chunks)


def test_half_close_reaches_the_server_and_its_reply_still_comes_back():
    server = TcpServer("after_eof")
    try:
        with FaultProxy("127.0.0.1", server.port, latency_ms=5) as proxy:
            data = os.urandom(700_000)  # more than the proxy's high-water mark: backpressure on the way
            got = exchange(proxy.port, [data[i:i + 50_000] for i in range(0, len(data), 50_000)])
            assert got[:32] == hashlib.sha256(data).digest()
            assert got[32:] == data
            assert wait_until(lambda: proxy.stats()["connections_open"] == 0)
            st_ = proxy.stats()
            assert st_["bytes_up"] == len(data) and st_["bytes_down"] == len(data) + 32
    finally:
        server.close()


def test_latency_adds_at_least_the_configured_delay_each_way(echo):
    with FaultProxy("127.0.0.1", echo.port, latency_ms=150) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        for latency_ms in (150, 300):
            proxy.set(latency_ms=latency_ms)
            t0 = time.monotonic()
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            assert time.monotonic() - t0 >= 2 * latency_ms / 1000 - 0.002  # up and down
        s.close()
        assert proxy.stats()["delayed_chunks"] >= 4


def test_order_is_preserved_under_jitter(echo):
    with FaultProxy("127.0.0.1", echo.port, latency_ms=20, jitter_ms=20, seed=7) as proxy:
        msgs = [f"{i:06d};".encode() for i in range(400)]
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        got = bytearray()
        reader = threading.Thread(target=lambda: [got.extend(d) for d in iter(lambda: s.recv(4096), b"")])
        reader.start()
        for m in msgs:  # one small chunk each: every one gets its own jittered delivery time
            s.sendall(m)
            time.sleep(0.001)
        s.shutdown(socket.SHUT_WR)
        reader.join(30)
        s.close()
        assert bytes(got) == b"".join(msgs)
        assert proxy.stats()["delayed_chunks"] > 40  # the kernel may coalesce some of the 400 sends


def test_loss_stalls_but_never_corrupts_or_drops_bytes(echo):
    with FaultProxy("127.0.0.1", echo.port, loss=0.2, seed=3) as proxy:
        rng = random.Random(5)
        chunks = [rng.randbytes(rng.randint(1, 20_000)) for _ in range(40)]
        t0 = time.monotonic()
        assert exchange(proxy.port, chunks) == b"".join(chunks)
        lost = proxy.stats()["lost_chunks"]
        assert lost > 0
        assert time.monotonic() - t0 >= 0.2  # at least one retransmission timeout


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="loss"):
        FaultProxy("127.0.0.1", 1, loss=1.5)
    with pytest.raises(ValueError, match="latency_ms"):
        FaultProxy("127.0.0.1", 1).set(latency_ms=-1)


def test_unreachable_upstream_closes_the_client_and_counts_it():
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        assert s.recv(10) == b""  # closed, not hung
        s.close()
        assert wait_until(lambda: proxy.stats()["upstream_failures"] == 1)


# ------------------------------------------------------------------------------------------------
# against a real mosquitto
# ------------------------------------------------------------------------------------------------
def paho_client(url_port: int, client_id: str, will_topic: str | None = None):  # noqa: ANN201
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.connects = 0
    c.disconnects = 0
    c.reconnect_delay_set(0.1, 0.5)
    if will_topic:
        c.will_set(will_topic, b"gone", qos=1)

    def on_connect(cl, u, f, rc, p) -> None:  # noqa: ANN001
        if not rc.is_failure:
            cl.connects += 1

    def on_disconnect(cl, u, f, rc, p) -> None:  # noqa: ANN001
        cl.disconnects += 1

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.connect("127.0.0.1", url_port, keepalive=30)
    c.loop_start()
    return c


def test_mqtt_messages_flow_both_ways_through_the_proxy(mosquitto):
    with FaultProxy("127.0.0.1", mosquitto.port, latency_ms=10, jitter_ms=5) as proxy:
        assert proxy.url == f"mqtt://127.0.0.1:{proxy.port}"
        behind = Collector(proxy.url, "netproxy/flow/down")  # subscriber through the proxy
        direct = Collector(mosquitto.url, "netproxy/flow/up")
        try:
            payloads = [os.urandom(n) for n in (1, 100, 5000, 200_000)]
            for p in payloads:
                direct.publish("netproxy/flow/down", p)
                behind.publish("netproxy/flow/up", p)
            assert [m[1] for m in behind.wait_for(4, topic_contains="flow/down")] == payloads
            assert [m[1] for m in direct.wait_for(4, topic_contains="flow/up")] == payloads
        finally:
            behind.close()
            direct.close()


def test_outage_drops_clients_refuses_connects_then_paho_reconnects(mosquitto):
    topic = f"netproxy/outage/{free_port()}"
    watcher = Collector(mosquitto.url, f"{topic}/#")
    with FaultProxy("127.0.0.1", mosquitto.port) as proxy:
        client = paho_client(proxy.port, f"np-outage-{free_port()}", will_topic=f"{topic}/will")
        try:
            assert wait_until(lambda: client.connects == 1)
            proxy.outage(True)
            assert wait_until(lambda: client.disconnects >= 1), "the client did not see the broker go away"
            # mosquitto saw the client vanish without DISCONNECT: it publishes the will
            assert [m[1] for m in watcher.wait_for(1, topic_contains="/will")] == [b"gone"]
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            time.sleep(0.8)  # paho retries meanwhile, and is refused
            assert client.connects == 1
            assert proxy.stats()["connections_open"] == 0
            proxy.outage(False)
            assert wait_until(lambda: client.connects == 2, 20), "paho did not reconnect after the outage"
            client.publish(f"{topic}/after", b"back", qos=1).wait_for_publish(10)
            assert [m[1] for m in watcher.wait_for(1, topic_contains="/after")] == [b"back"]
            st_ = proxy.stats()
            assert st_["outages"] == 1 and st_["connections_total"] >= 2 and not st_["down"]
        finally:
            client.loop_stop()
            client.disconnect()
            watcher.close()


def test_lossy_link_delivers_every_mqtt_message_exactly(mosquitto):
    topic = f"netproxy/loss/{free_port()}"
    watcher = Collector(mosquitto.url, topic)
    with FaultProxy("127.0.0.1", mosquitto.port, latency_ms=5, loss=0.15, seed=11) as proxy:
        client = paho_client(proxy.port, f"np-loss-{free_port()}")
        try:
            assert wait_until(lambda: client.connects == 1, 20)
            payloads = [f"{i}:".encode() + os.urandom(i * 37 % 3000) for i in range(60)]
            infos = [client.publish(topic, p, qos=1) for p in payloads]
            for info in infos:
                info.wait_for_publish(60)
            got = [m[1] for m in watcher.wait_for(60, timeout=60)]
            assert got == payloads
            assert proxy.stats()["lost_chunks"] > 0
        finally:
            client.loop_stop()
            client.disconnect()
            watcher.close()


def mqtt_connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"  # MQTT 3.1.1, clean session, keepalive 60 s
    body = var + len(cid).to_bytes(2, "big") + cid
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            break
        buf += d
    return buf


def test_500_concurrent_mqtt_connections_through_one_proxy(mosquitto):
    n = 500
    with FaultProxy("127.0.0.1", mosquitto.port, latency_ms=2, jitter_ms=1) as proxy:
        socks = []
        try:
            tag = free_port()
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
                s.sendall(mqtt_connect_packet(f"np500-{tag}-{i}"))
                socks.append(s)
            for s in socks:
                assert recv_exact(s, 4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
            assert proxy.stats()["connections_open"] == n
            for s in socks:
                s.sendall(b"\xc0\x00")  # PINGREQ
            for s in socks:
                assert recv_exact(s, 2) == b"\xd0\x00"  # PINGRESP
        finally:
            for s in socks:
                s.close()
        assert wait_until(lambda: proxy.stats()["connections_open"] == 0, 20)
        st_ = proxy.stats()
        assert st_["connections_total"] == n
        assert st_["bytes_down"] == n * 6


def test_cli_proxies_mqtt_and_takes_commands_on_stdin(mosquitto):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "devices.netproxy", "--upstream", mosquitto.url,
                             "--latency-ms", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("listening on mqtt://127.0.0.1:"), first
        port = int(first.split()[2].rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(mqtt_connect_packet(f"np-cli-{free_port()}"))
        assert recv_exact(s, 4) == b"\x20\x02\x00\x00"
        proc.stdin.write("down\n")
        proc.stdin.flush()
        assert "down=True" in proc.stdout.readline()
        assert s.recv(10) == b""  # the outage dropped the connection
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        proc.stdin.write("up\nloss 0.5\nquit\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "outages=1" in out and "down=False" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
