"""A fault-injecting TCP proxy (latency, jitter, TCP-like loss, outages) in front of one MQTT broker.

Host-side simulation tool, standard library only; must never import TensorFlow, converters or edge_slm.

Model
-----
Every chunk the proxy reads from one side is delivered to the other side after ``latency ± jitter``
(uniform jitter, never below zero). Delivery times are kept monotonic per direction, so jitter
stretches gaps between chunks but never reorders bytes inside a TCP stream.

Loss: a TCP proxy cannot drop bytes without corrupting the stream, and real packet loss never does
that to a TCP application either: the kernel retransmits and the application sees a *stall*. So the
proxy emulates what loss does to TCP: each chunk counts as ``ceil(len / 1460)`` segments (one MSS on
Ethernet), each lost with probability ``loss``; a chunk with a lost segment is held for one
retransmission timeout (RTO) on top of its latency, and the retransmission itself may be lost again.
Like Linux, the RTO starts at 200 ms (``tcp_rto_min``) and doubles for every consecutive loss of the
same data (exponential backoff, capped at 120 s like ``TCP_RTO_MAX``); once it gets through, the next
loss starts again at 200 ms, as Linux resets the backoff when new data is acknowledged. Everything
behind a held chunk waits too (head-of-line blocking), exactly as an application behind a real lossy
link sees it. Counting segments rather than chunks keeps the
loss rate independent of how the kernel happens to split reads.

Outage: ``outage(True)`` aborts every proxied connection on both sides (clients see the broker drop
them, the broker sees the clients vanish and publishes their wills) and closes the listening socket,
keeping the port reserved by a bound but non-listening socket so that connects are *refused*
(ECONNREFUSED), as with a dead broker process. ``outage(False)`` listens again on the same port.

Everything runs in one asyncio event loop on its own thread, with protocol callbacks and timers only
(no task per connection), so thousands of connections are cheap. Half-close is forwarded (EOF is
delivered after the bytes queued before it), and backpressure is end to end: a direction stops
reading when more than 256 KiB wait in the proxy or the receiving socket's buffer is full.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import math
import random
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MSS = 1460
RTO_MIN_S = 0.2
RTO_MAX_S = 120.0
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class _Side(asyncio.Protocol):
    """One socket of a proxied connection (the client's or the broker's)."""

    def __init__(self, conn: _Conn, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.out: _Pipe | None = None  # bytes read here go into this pipe
        self.into: _Pipe | None = None  # this pipe writes into this side
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.name == "client":
            self.conn.client_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.out is not None:
            self.out.push(data)

    def eof_received(self) -> bool:
        if self.out is not None:
            self.out.push_eof()
        return True  # keep our write side open: half-close

    def pause_writing(self) -> None:
        if self.into is not None:
            self.into.dst_paused = True

    def resume_writing(self) -> None:
        if self.into is not None:
            self.into.dst_paused = False
            self.into.schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.conn.side_lost(self)


class _Pipe:
    """One direction of a connection: a time-ordered queue of chunks with their delivery times."""

    def __init__(self, proxy: FaultProxy, src: _Side, dst: _Side, direction: str) -> None:
        self.proxy = proxy
        self.src = src
        self.dst = dst
        self.direction = direction  # "up" (client -> broker) or "down"
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.pending = 0
        self.last_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.dst_paused = False
        self.src_paused = False
        self.eof_sent = False
        self.close_after = False  # src is gone: close dst once the queue is delivered

    def _deliver_at(self, nbytes: int) -> float:
        p = self.proxy
        now = p._loop.time()
        delay = p._latency_s
        if p._jitter_s > 0:
            delay += p._rng.uniform(-p._jitter_s, p._jitter_s)
        at = now + max(0.0, delay)
        if p._loss > 0 and nbytes > 0:
            segments = max(1, math.ceil(nbytes / MSS))
            lost = p._rng.random() < 1.0 - (1.0 - p._loss) ** segments
            rto = RTO_MIN_S
            while lost:
                # the retransmission (one segment) may be lost too; each time the RTO doubles
                at += rto
                p._stats["lost_chunks"] += 1
                rto = min(RTO_MAX_S, rto * 2)
                lost = p._rng.random() < p._loss
        if at > now:
            p._stats["delayed_chunks"] += 1
        at = max(at, self.last_at)  # never reorder inside the stream
        self.last_at = at
        return at

    def push(self, data: bytes) -> None:
        if self.eof_sent or self.dst.closed:
            return
        self.proxy._stats["bytes_" + self.direction] += len(data)
        self.queue.append((self._deliver_at(len(data)), data))
        self.pending += len(data)
        if self.pending > HIGH_WATER and not self.src_paused and not self.src.closed:
            self.src_paused = True
            self.src.transport.pause_reading()
        self.schedule()

    def push_eof(self) -> None:
        self.queue.append((max(self.proxy._loop.time(), self.last_at), None))
        self.schedule()

    def schedule(self) -> None:
        if self.timer is not None or not self.queue or self.dst_paused:
            return
        at = self.queue[0][0]
        if at <= self.proxy._loop.time():
            self.flush()
        else:
            self.timer = self.proxy._loop.call_at(at, self.flush)

    def flush(self) -> None:
        self.timer = None
        now = self.proxy._loop.time()
        t = self.dst.transport
        while self.queue and not self.dst_paused and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if self.dst.closed:
                self.queue.clear()
                break
            if data is None:
                self._send_eof()
                continue
            self.pending -= len(data)
            t.write(data)
        if self.src_paused and self.pending < LOW_WATER and not self.src.closed:
            self.src_paused = False
            self.src.transport.resume_reading()
        if not self.queue and self.close_after and not self.dst.closed:
            self.dst.transport.close()
        self.schedule()

    def _send_eof(self) -> None:
        self.eof_sent = True
        t = self.dst.transport
        if t.can_write_eof():
            t.write_eof()
        else:
            t.close()
        self.src.conn.maybe_done()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.pending = 0


class _Conn:
    """A client connection and its broker connection, joined by two pipes."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client: _Side | None = None
        self.upstream: _Side | None = None
        self.pipes: list[_Pipe] = []
        self.done = False

    def client_connected(self, side: _Side) -> None:
        self.client = side
        p = self.proxy
        if p._down:  # raced with an outage
            side.transport.abort()
            return
        p._conns.add(self)
        p._stats["connections_total"] += 1
        side.transport.pause_reading()  # until the broker side exists
        p._loop.create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        p = self.proxy
        try:
            _, up = await asyncio.wait_for(
                p._loop.create_connection(lambda: _Side(self, "upstream"), p.upstream_host, p.upstream_port), 10)
        except (OSError, asyncio.TimeoutError) as e:
            p._stats["upstream_failures"] += 1
            log.warning("proxy: cannot reach upstream %s:%s: %s", p.upstream_host, p.upstream_port, e)
            self.abort()
            return
        self.upstream = up
        if self.client.closed or p._down or self.done:
            up.transport.abort()
            self.abort()
            return
        self.pipes = [_Pipe(p, self.client, up, "up"), _Pipe(p, up, self.client, "down")]
        self.client.out, up.into = self.pipes[0], self.pipes[0]
        up.out, self.client.into = self.pipes[1], self.pipes[1]
        self.client.transport.resume_reading()

    def side_lost(self, side: _Side) -> None:
        if self.done:
            return
        other = self.upstream if side is self.client else self.client
        if side.out is not None and side.out.queue and other is not None and not other.closed:
            side.out.close_after = True  # bytes read before the close still arrive
        else:
            if other is not None and other.transport is not None and not other.closed:
                other.transport.close()
        if side.into is not None:
            side.into.cancel()
        if (other is None or other.closed) and side.closed:
            self._finish()

    def maybe_done(self) -> None:
        if self.pipes and all(pp.eof_sent for pp in self.pipes):
            for s in (self.client, self.upstream):
                if s is not None and not s.closed:
                    s.transport.close()

    def abort(self) -> None:
        for pp in self.pipes:
            pp.cancel()
        for s in (self.client, self.upstream):
            if s is not None and s.transport is not None and not s.closed:
                s.transport.abort()
        self._finish()

    def _finish(self) -> None:
        if (self.client is None or self.client.closed) and (self.upstream is None or self.upstream.closed):
            self.done = True
            self.proxy._conns.discard(self)


class FaultProxy:
    """asyncio TCP proxy on its own thread: one listening port in front of one upstream (an MQTT broker)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, latency_ms: float = 0.0, jitter_ms: float = 0.0, loss: float = 0.0,
                 seed: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.listen_host = listen_host
        self.port = int(listen_port)
        self.url = ""
        self._latency_s = 0.0
        self._jitter_s = 0.0
        self._loss = 0.0
        self._apply(latency_ms, jitter_ms, loss)
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._placeholder: socket.socket | None = None
        self._conns: set[_Conn] = set()
        self._down = False
        self._stats: dict[str, int] = collections.Counter(
            connections_total=0, bytes_up=0, bytes_down=0, outages=0, delayed_chunks=0, lost_chunks=0,
            upstream_failures=0)

    # -- public API ------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Start the event-loop thread; returns once the port is listening (port and url are set)."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        ready: dict[str, Any] = {}
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen())
            except BaseException as e:  # noqa: BLE001 - handed to the caller of start()
                ready["error"] = e
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self.upstream_port}", daemon=True)
        self._thread.start()
        started.wait()
        if "error" in ready:
            self._thread = None
            raise OSError(f"proxy cannot listen on {self.listen_host}:{self.port}: {ready['error']}; "
                          "pick another --listen port") from ready["error"]
        self.url = f"mqtt://{self.listen_host}:{self.port}"
        log.info("proxy %s -> %s:%s", self.url, self.upstream_host, self.upstream_port)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self._shutdown)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def set(self, *, latency_ms: float | None = None, jitter_ms: float | None = None,
            loss: float | None = None) -> None:
        """Change faults live (thread-safe); applies to chunks read from now on."""
        if self._loop is None:
            self._apply(latency_ms, jitter_ms, loss)
        else:
            self._call(lambda: self._apply(latency_ms, jitter_ms, loss))

    def outage(self, down: bool) -> None:
        """True: drop every proxied connection (both sides) and refuse connects; False: accept again."""
        if self._loop is None:
            raise RuntimeError("FaultProxy is not started; call start() first")
        self._call(lambda: self._go_down() if down else self._go_up(), coro=not down)

    def stats(self) -> dict:
        """A snapshot: connections_total, connections_open, bytes_up (client -> broker), bytes_down,
        outages, delayed_chunks (delivered later than read), lost_chunks (each held for an RTO;
        a chunk lost twice counts twice), upstream_failures (broker unreachable), down (bool)."""
        def snap() -> dict:
            d = dict(self._stats)
            d["connections_open"] = len(self._conns)
            d["down"] = self._down
            return d
        return snap() if self._loop is None else self._call(snap)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the loop -------------------------------------------------------------------------
    def _apply(self, latency_ms: float | None, jitter_ms: float | None, loss: float | None) -> None:
        if latency_ms is not None:
            if latency_ms < 0:
                raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
            self._latency_s = latency_ms / 1000.0
        if jitter_ms is not None:
            if jitter_ms < 0:
                raise ValueError(f"jitter_ms must be >= 0, got {jitter_ms}")
            self._jitter_s = jitter_ms / 1000.0
        if loss is not None:
            if not 0.0 <= loss < 1.0:
                raise ValueError(f"loss must be in [0, 1), got {loss}")
            self._loss = float(loss)

    def _call(self, fn: Callable[[], Any], coro: bool = False) -> Any:
        if threading.current_thread() is self._thread:
            if coro:
                raise RuntimeError("call outage(False) from outside the proxy thread")
            return fn()

        async def wrapper() -> Any:
            r = fn()
            return (await r) if coro else r

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(30)

    async def _listen(self) -> None:
        self._server = await self._loop.create_server(
            lambda: _Side(_Conn(self), "client"), self.listen_host, self.port, reuse_address=True,
            backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def _go_down(self) -> None:
        if self._down:
            return
        self._down = True
        self._stats["outages"] += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        # keep the port: bound but not listening, so SYNs get a RST (connection refused)
        ph = socket.socket(socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET, socket.SOCK_STREAM)
        ph.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ph.bind((self.listen_host, self.port))
            self._placeholder = ph
        except OSError:
            ph.close()
        for c in list(self._conns):
            c.abort()
        self._conns.clear()
        log.info("proxy %s: outage started", self.url)

    async def _go_up(self) -> None:
        if not self._down:
            return
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        await self._listen()
        self._down = False
        log.info("proxy %s: outage over", self.url)

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        for c in list(self._conns):
            c.abort()
        self._conns.clear()


def _parse_hostport(s: str) -> tuple[str, int]:
    """HOST:PORT or mqtt://HOST:PORT (only plain TCP: the proxy does not terminate TLS)."""
    s = s.removeprefix("mqtt://").rstrip("/")
    host, sep, port = s.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host or "127.0.0.1", int(port)


def _stats_line(stats: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devices.netproxy", description=(
        "Fault-injecting TCP proxy in front of an MQTT broker. While it runs, type commands on stdin: "
        "down | up | latency MS | jitter MS | loss P | stats | quit"))
    ap.add_argument("--upstream", required=True, type=_parse_hostport, help="broker HOST:PORT or mqtt://HOST:PORT")
    ap.add_argument("--listen", type=int, default=0, help="port to listen on (default: a free one)")
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0, help="segment loss probability, 0..1 (TCP stall model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        proxy = FaultProxy(*args.upstream, listen_host=args.listen_host, listen_port=args.listen,
                           latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, loss=args.loss,
                           seed=args.seed).start()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"listening on {proxy.url} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd, rest = words[0].lower(), words[1:]
            try:
                if cmd in ("quit", "exit"):
                    break
                elif cmd == "down":
                    proxy.outage(True)
                elif cmd == "up":
                    proxy.outage(False)
                elif cmd in ("latency", "jitter", "loss") and len(rest) == 1:
                    key = {"latency": "latency_ms", "jitter": "jitter_ms", "loss": "loss"}[cmd]
                    proxy.set(**{key: float(rest[0])})
                elif cmd != "stats":
                    print("commands: down | up | latency MS | jitter MS | loss P | stats | quit", flush=True)
                    continue
            except ValueError as e:
                print(f"error: {e}", flush=True)
                continue
            print(_stats_line(proxy.stats()), flush=True)
        else:
            # stdin closed (e.g. run in the background): serve until interrupted
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        print(_stats_line(proxy.stats()), flush=True)
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
