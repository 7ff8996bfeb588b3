"""One fleet-simulator worker process: many virtual devices, each the agent's real Pipeline, seq, outbox and MqttLink.

Host side (run via multiprocessing spawn); uses edge_slm and converters.datasets. Never imports TensorFlow.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_slm.errors import BrokerError
from edge_slm.mqtt import MqttLink, Topics
from edge_slm.netloop import NetworkLoop
from edge_slm.outbox import Outbox, OutboxSender, outbox_path
from edge_slm.package import ModelPackage
from edge_slm.pipeline import MqttSink, Pipeline
from edge_slm.seq import SeqCounter
from edge_slm.sources import RawInput
from edge_slm.tasks import load_task

log = logging.getLogger(__name__)

TOPIC_PREFIX = "edge-slm"


def encode_input_id(sent_at: float, k: int) -> str:
    """The input id carries the wall-clock time the device produced the input: t<seconds>-<n>."""
    return f"t{sent_at:.6f}-{k}"


def decode_input_id(input_id: object) -> float | None:
    if not isinstance(input_id, str) or not input_id.startswith("t") or "-" not in input_id:
        return None
    try:
        return float(input_id[1:input_id.index("-")])
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# a network loop shared by many links
# --------------------------------------------------------------------------------------------------
class SharedNetLoop:
    """Drives the paho clients of many MqttLinks from one thread with epoll, instead of a thread per link.

    Publishes still go out from the publishing thread (paho writes at once when no loop thread is
    registered with it); this thread reads, flushes what is left, keeps alive and reconnects with each
    link's own backoff.
    """

    def __init__(self) -> None:
        self._members: dict[int, SharedLoopMember] = {}
        self._fds: dict[int, int] = {}  # id(member) -> registered fd
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-shared-loop", daemon=True)
        self._thread.start()

    def add(self, m: SharedLoopMember) -> None:
        with self._lock:
            self._members[id(m)] = m

    def remove(self, m: SharedLoopMember) -> None:
        with self._lock:
            self._members.pop(id(m), None)
            fd = self._fds.pop(id(m), None)
        if fd is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._epoll.close()

    def _lost(self, m: SharedLoopMember, now: float) -> None:
        m._socket_open = False
        m.retry_at = now + m.backoff.next_delay()
        fd = self._fds.pop(id(m), None)
        if fd is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def _run(self) -> None:
        import paho.mqtt.client as paho

        last_misc = 0.0
        by_fd: dict[int, SharedLoopMember] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                members = list(self._members.values())
            for m in members:
                if m.stopped:  # removed (a crash or a close) after the snapshot was taken
                    continue
                if not m._socket_open:
                    if now >= m.retry_at:
                        if not m.try_connect_once():
                            m.retry_at = now + m.backoff.next_delay()
                    continue
                sock = m.client.socket()
                if sock is None:
                    self._lost(m, now)
                    continue
                fd = sock.fileno()
                if self._fds.get(id(m)) != fd:
                    old = self._fds.pop(id(m), None)
                    if old is not None:
                        try:
                            self._epoll.unregister(old)
                        except (OSError, ValueError):
                            pass
                    try:
                        self._epoll.register(fd, select.EPOLLIN)
                    except (OSError, ValueError):
                        self._lost(m, now)
                        continue
                    self._fds[id(m)] = fd
                by_fd[fd] = m
                if m.client.want_write():
                    if m.client.loop_write() != paho.MQTT_ERR_SUCCESS:
                        self._lost(m, now)
            for fd, _ in self._epoll.poll(0.05):
                m = by_fd.get(fd)
                if m is None or not m._socket_open:
                    continue
                if m.client.loop_read() != paho.MQTT_ERR_SUCCESS:
                    self._lost(m, time.monotonic())
            if now - last_misc >= 1.0:
                last_misc = now
                for m in members:
                    if m._socket_open and m.client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                        self._lost(m, now)
                by_fd = {}


class SharedLoopMember(NetworkLoop):
    """A NetworkLoop whose start() joins a SharedNetLoop instead of starting its own thread."""

    shared: SharedNetLoop

    def start(self) -> None:
        self.retry_at = 0.0
        self.stopped = False
        self.shared.add(self)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True
        self.shared.remove(self)

    def pump(self, seconds: float) -> None:
        """NetworkLoop.pump without paho's select(): a worker with hundreds of links has fds above 1023."""
        import paho.mqtt.client as paho

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock = self.client.socket()
            if sock is None:
                self._socket_open = False
                return
            p = select.poll()
            p.register(sock.fileno(), select.POLLIN | (select.POLLOUT if self.client.want_write() else 0))
            for _, ev in p.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                rc = paho.MQTT_ERR_SUCCESS
                if ev & select.POLLOUT:
                    rc = self.client.loop_write()
                if rc == paho.MQTT_ERR_SUCCESS and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    rc = self.client.loop_read()
                if rc != paho.MQTT_ERR_SUCCESS:
                    self._socket_open = False
                    return
            return  # one round per call, like client.loop(): the caller checks for CONNACK


def _use_shared_loop(link: MqttLink, shared: SharedNetLoop) -> None:
    loop = link.loop
    member = SharedLoopMember(loop.client, loop.addresses, loop.backoff, loop._connect_fn)
    member.shared = shared
    member.retry_at = 0.0
    member.stopped = False
    link.loop = member


# --------------------------------------------------------------------------------------------------
# a virtual device
# --------------------------------------------------------------------------------------------------
@dataclass
class DeviceSpec:
    device_id: str
    group: int
    pipeline: str
    rate: float
    crashes: list[tuple[float, float]]  # (at_s, restart_after_s)


class SimDevice:
    """The agent's MQTT half for one device: SeqCounter, Outbox + OutboxSender, MqttLink, MqttSink, Pipeline.

    The pipeline is driven synchronously (Pipeline.handle) by the worker's feeder thread, so the
    worker's one task (one interpreter per model) is never used by two threads at once.
    """

    def __init__(self, spec: DeviceSpec, task: Any, cfg: dict[str, Any], shared: SharedNetLoop | None) -> None:
        self.spec = spec
        self.task = task
        self.cfg = cfg
        self.shared = shared
        self.topics = Topics(TOPIC_PREFIX, spec.device_id)
        self.up = False
        self.handled = 0
        self.reconnects_seen = 0
        self.reconnects_total = 0

    def start(self) -> None:
        cfg = self.cfg
        state = Path(cfg["state_dir"])
        self.seq = SeqCounter(state / f"{self.spec.device_id}.seq")
        self.link = MqttLink(cfg["proxy_url"], f"sim-{self.spec.device_id}", self.topics, qos=cfg["qos"],
                             protocol=cfg["protocol"], keepalive=10, reconnect_min_s=0.2, reconnect_max_s=2.0)
        if self.shared is not None:
            _use_shared_loop(self.link, self.shared)
        self.outbox = Outbox(outbox_path(state, self.spec.device_id)) if cfg["outbox"] else None
        sink = MqttSink(self.link, self.topics, self.outbox)
        self.pipeline = Pipeline(self.spec.pipeline, self.spec.device_id, self.task, self.seq, [sink],
                                 stream_tokens=False)
        try:
            self.link.connect(timeout=5.0)
        except BrokerError:
            self.link.loop.start()  # the broker is away (an outage): keep trying in the background
        self.sender = None
        if self.outbox is not None:
            self.sender = OutboxSender(self.outbox, self.link, window=50)
            self.sender.start()
        self.link.announce_online()
        self.reconnects_seen = 0
        self.up = True

    def submit(self, text: str, k: int) -> None:
        sent = time.time()
        payload = json.dumps({"id": encode_input_id(sent, k), "text": text}).encode()
        out = self.pipeline.handle(RawInput(payload, "sim"))
        # a text input gives one record; a streaming task zero or more: count what was actually emitted
        self.handled += len(out) if isinstance(out, list) else 1

    def poll_reconnects(self) -> int:
        """New reconnects since the last call."""
        n = self.link.reconnects - self.reconnects_seen
        self.reconnects_seen = self.link.reconnects
        self.reconnects_total += n
        return n

    def crash(self) -> None:
        """Die abruptly: no DISCONNECT, no final seq write, nothing drained; what the outbox holds stays."""
        self.up = False
        self.link.loop.stop(timeout=1.0)
        sock = self.link.client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        if self.sender is not None:
            self.sender.close(timeout=1.0)
        if self.outbox is not None:
            self.outbox.close()

    def close(self, timeout: float = 5.0) -> None:
        """Shut down like the agent does: wait (up to timeout) for acks, say offline, save seq."""
        if not self.up:
            return
        self.up = False
        deadline = time.monotonic() + timeout
        if self.sender is not None:
            self.sender.wait_drained(timeout)
            self.sender.close()
        if self.outbox is not None:
            self.outbox.close()
        self.link.close(timeout=max(0.05, deadline - time.monotonic()))
        self.seq.close()


# --------------------------------------------------------------------------------------------------
# the worker process
# --------------------------------------------------------------------------------------------------
def _text_inputs(seed: int) -> list[str]:
    from converters.datasets.smart_home import generate

    train, test = generate(per_intent=30, seed=seed)
    return test.texts + train.texts[:200]


def run_worker(spec: dict[str, Any], out_q: Any, go: Any, t0: Any, shutdown: Any) -> None:
    """Entry point of a worker process (multiprocessing spawn). Talks to the simulator through out_q."""
    logging.basicConfig(level=spec.get("log_level", "WARNING"))
    worker = spec["worker"]
    try:
        tasks = {}
        for gi, g in enumerate(spec["groups"]):
            tasks[gi] = load_task(ModelPackage.open(g["model"]), threads=1)
        texts = _text_inputs(spec["seed"] + worker)
        shared = SharedNetLoop() if spec["net_loop"] == "shared" else None
        devices = [SimDevice(DeviceSpec(**d), tasks[d["group"]], spec, shared) for d in spec["devices"]]
        for k, dev in enumerate(devices):
            dev.start()
            if k % 25 == 24:
                out_q.put({"type": "connecting", "worker": worker, "started": k + 1})
    except Exception as exc:  # handed to the simulator, which reports it and stops
        log.exception("worker %d failed to start", worker)
        out_q.put({"type": "failed", "worker": worker, "error": f"{type(exc).__name__}: {exc}"})
        return
    out_q.put({"type": "ready", "worker": worker, "devices": len(devices)})
    go.wait()
    start = t0.value
    rng = random.Random(spec["seed"] * 1000 + worker)
    duration = spec["duration_s"]
    # (when, order, action, device index, argument)
    heap: list[tuple[float, int, str, int, float]] = []
    order = 0
    for i, dev in enumerate(devices):
        heap.append((start + rng.uniform(0, 1.0 / dev.spec.rate), order, "input", i, 0.0))
        order += 1
        for at_s, restart_after in dev.spec.crashes:
            heap.append((start + at_s, order, "crash", i, restart_after))
            order += 1
    heapq.heapify(heap)
    end = start + duration
    events: list[dict[str, Any]] = []
    inputs_sent = 0
    next_report = time.time()
    errors = 0
    while heap:
        now = time.time()
        if now >= next_report:
            next_report = now + 0.5
            for dev in devices:
                if dev.up:
                    for _ in range(dev.poll_reconnects()):
                        events.append({"t": round(now - start, 3), "kind": "reconnect", "device": dev.spec.device_id})
            out_q.put({"type": "stats", "worker": worker, "t": now - start, "inputs": inputs_sent,
                       "connected": sum(1 for d in devices if d.up and d.link.connected),
                       "reconnects": sum(d.reconnects_total for d in devices), "events": events})
            events = []
        when, _, action, i, arg = heap[0]
        if when > now:
            time.sleep(min(when - now, max(0.0, next_report - now), 0.05))
            continue
        heapq.heappop(heap)
        dev = devices[i]
        if action == "input":
            if when >= end:
                continue
            if dev.up:
                try:
                    dev.submit(texts[(inputs_sent + i) % len(texts)], dev.handled)
                    inputs_sent += 1
                except Exception:  # a bug in the simulated device: count it, keep the fleet going
                    errors += 1
                    log.exception("device %s failed on an input", dev.spec.device_id)
            heapq.heappush(heap, (when + 1.0 / dev.spec.rate, order, "input", i, 0.0))
        elif action == "crash" and dev.up:
            dev.crash()
            events.append({"t": round(when - start, 3), "kind": "crash", "device": dev.spec.device_id})
            heapq.heappush(heap, (when + arg, order, "restart", i, 0.0))
        elif action == "restart":
            try:
                dev.start()
                events.append({"t": round(time.time() - start, 3), "kind": "restart", "device": dev.spec.device_id})
            except Exception as exc:
                errors += 1
                events.append({"t": round(time.time() - start, 3), "kind": "restart_failed",
                               "device": dev.spec.device_id, "error": str(exc)})
        order += 1
    out_q.put({"type": "stats", "worker": worker, "t": time.time() - start, "inputs": inputs_sent,
               "connected": sum(1 for d in devices if d.up and d.link.connected),
               "reconnects": sum(d.reconnects_total for d in devices), "events": events})
    out_q.put({"type": "inputs_done", "worker": worker, "expected": {d.spec.device_id: d.handled for d in devices},
               "errors": errors})
    while not shutdown.wait(0.5):
        now = time.time()
        ev = []
        for dev in devices:
            if dev.up:
                for _ in range(dev.poll_reconnects()):
                    ev.append({"t": round(now - start, 3), "kind": "reconnect", "device": dev.spec.device_id})
        out_q.put({"type": "stats", "worker": worker, "t": now - start, "inputs": inputs_sent,
                   "connected": sum(1 for d in devices if d.up and d.link.connected),
                   "reconnects": sum(d.reconnects_total for d in devices), "events": ev})
    unacked = 0
    deadline = time.monotonic() + 5.0  # for the whole fleet, not per device: an outage may still be on
    for dev in devices:
        if dev.outbox is not None and dev.up:
            unacked += dev.outbox.depth
        dev.close(max(0.05, deadline - time.monotonic()))
    if shared is not None:
        shared.close()
    out_q.put({"type": "closed", "worker": worker, "unacked_at_close": unacked})
