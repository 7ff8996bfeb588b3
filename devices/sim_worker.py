"""One fleet-simulator worker process: many virtual devices, each the agent's real Pipeline, seq, outbox and MqttLink.

Host side (run via multiprocessing spawn); uses edge_slm and converters.datasets. Never imports TensorFlow.
"""

from __future__ import annotations

import heapq
import json
import logging
import queue
import random
import select
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.errors import BrokerError, ConfigError
from edge_slm.mqtt import MqttLink, Topics
from edge_slm.netloop import NetworkLoop
from edge_slm.outbox import Outbox, OutboxSender, outbox_path
from edge_slm.package import ModelPackage
from edge_slm.pipeline import MqttSink, Pipeline
from edge_slm.seq import SeqCounter
from edge_slm.sources import RawInput
from edge_slm.streams import SensorBlock
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
    kind: str = "text"
    condition: str = "normal"  # sensor: the simulated machine's condition (a fault from vibration.CONDITIONS)
    machine: int = 0  # sensor: the machine id given to vibration.make_machine
    mcu: dict[str, Any] = field(default_factory=dict)  # binary, link, seed, corrupt: samples from a virtual MCU


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
        self.blocks = 0
        self.error_codes: dict[str, int] = {}

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
        self._count(self.pipeline.handle(RawInput(payload, "sim")))

    def submit_raw(self, raw: RawInput) -> None:
        """A block (generated, or from the virtual MCU's SerialSource): the id carries when it arrived."""
        raw.input_id = encode_input_id(time.time(), self.blocks)
        self.blocks += 1
        self._count(self.pipeline.handle(raw))

    def _count(self, out: dict[str, Any] | list[dict[str, Any]]) -> None:
        # a text input gives one record; a streaming task zero or more (results and error records such
        # as missing_samples alike): count what was actually emitted
        if isinstance(out, list):
            self.handled += len(out)
            for r in out:
                if "error" in r:
                    self.error_codes[r["error"]] = self.error_codes.get(r["error"], 0) + 1
        else:
            self.handled += 1

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
# sensor inputs: generated machines, or a virtual MCU per device
# --------------------------------------------------------------------------------------------------
class MachineFeed:
    """Blocks of one simulated machine's vibration (converters.datasets.vibration), looped, t0 continuous."""

    LOOP_S = 4.0  # seconds simulated per device and then replayed: bounded memory for large fleets

    def __init__(self, spec: DeviceSpec, seed: int, sample_rate: float, channels: tuple[str, ...]) -> None:
        from converters.datasets import vibration

        machine = vibration.make_machine(spec.machine, seed=seed)
        gyro = any(c in vibration.GYRO_CHANNELS for c in channels)
        rec = vibration.simulate(machine, spec.condition, self.LOOP_S, seed=seed, gyro=gyro, sample_rate=sample_rate)
        self.samples = rec.samples
        self.channels = rec.channels
        self.rate = rec.sample_rate
        self.block = max(1, int(round(rec.sample_rate / spec.rate)))
        self.stream = spec.device_id
        self.pos = 0
        self.sent = 0

    def next_block(self) -> SensorBlock:
        n, total = self.block, len(self.samples)
        idx = (self.pos + np.arange(n)) % total
        self.pos = (self.pos + n) % total
        block = SensorBlock(self.samples[idx], self.rate, self.channels, t0=self.sent / self.rate, stream=self.stream)
        self.sent += n
        return block


class McuFeed:
    """A virtual MCU process on a pty, read by the agent's SerialSource; blocks go to the worker's queue.

    The source's reader thread only enqueues: the worker's feeder thread runs the pipeline, so the
    group's interpreter is never used by two threads at once.
    """

    def __init__(self, index: int, spec: DeviceSpec, out: queue.Queue) -> None:
        self.index = index
        self.spec = spec
        self.out = out
        self.proc: subprocess.Popen | None = None
        self.source: Any = None
        self.stderr_tail: list[str] = []

    def start(self, timeout: float = 15.0) -> None:
        self.start_mcu(float(self.spec.mcu["corrupt"]), timeout)
        from edge_slm.serial_source import SerialSource

        self.source = SerialSource(f"serial://{self.spec.mcu['link']}?hello_timeout_s=10", kind="sensor")
        self.source.start(lambda raw: self.out.put((self.index, raw)), lambda: None)

    def replug(self, corrupt: float, timeout: float = 15.0) -> None:
        """Unplug the MCU and plug in one whose serial line corrupts bytes at `corrupt`; the source reopens."""
        self.stop_mcu()
        self.start_mcu(corrupt, timeout)

    def start_mcu(self, corrupt: float, timeout: float = 15.0) -> None:
        m = self.spec.mcu
        link = Path(m["link"])
        self.boots = getattr(self, "boots", 0) + 1
        args = [m["binary"], "--pty", str(link), "--imu-rate", "3200", "--imu-block", "64", "--speed", "1",
                "--seed", str(m["seed"] + 7 * (self.boots - 1)), "--corrupt", repr(float(corrupt)),
                "--boot-id", str(m["seed"] * 100 + self.boots)]
        if self.spec.condition != "normal":
            args += ["--fault-amp", "0.5"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def pump(proc: subprocess.Popen) -> None:
            for line in proc.stderr:
                if "ready" in line:
                    ready.set()
                self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-5:]

        threading.Thread(target=pump, args=(self.proc,), name=f"vmcu-{self.spec.device_id}", daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"virtual MCU for {self.spec.device_id} did not come up: {' | '.join(self.stderr_tail)}")

    def counters(self) -> dict[str, Any]:
        if self.source is None:
            return {}
        c = self.source.counters()
        return {k: v for k, v in c.items() if isinstance(v, (int, float, bool))}

    def stop(self) -> None:
        if self.source is not None:
            self.source.stop()
        self.stop_mcu()

    def stop_mcu(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _sensor_task(base: Any) -> Any:
    """A device's own sensor task (its own window buffer) on the group's shared interpreter."""
    return type(base)(base.package, base.model, hop=base.hop) if getattr(base, "input_kind", "text") == "sensor" else base


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
    mcus: dict[int, McuFeed] = {}
    try:
        tasks = {}
        for gi, g in enumerate(spec["groups"]):
            tasks[gi] = load_task(ModelPackage.open(g["model"]), threads=1)
        for gi, g in enumerate(spec["groups"]):
            got = getattr(tasks[gi], "input_kind", "text")
            if got != g.get("kind", "text"):
                raise ConfigError(f"devices[{gi}]: kind = {g.get('kind', 'text')!r} but {g['model']} is a "
                                  f"{tasks[gi].package.task} package, which takes {got} inputs; fix kind or model")
        texts = _text_inputs(spec["seed"] + worker) if any(g.get("kind", "text") == "text"
                                                            for g in spec["groups"]) else []
        shared = SharedNetLoop() if spec["net_loop"] == "shared" else None
        devices = [SimDevice(DeviceSpec(**d), _sensor_task(tasks[d["group"]]), spec, shared)
                   for d in spec["devices"]]
        feeds: dict[int, MachineFeed] = {}
        mcu_q: queue.Queue = queue.Queue()
        for i, dev in enumerate(devices):
            if dev.spec.kind == "sensor" and not dev.spec.mcu:
                feeds[i] = MachineFeed(dev.spec, spec["seed"], dev.task.sample_rate, tuple(dev.task.channels))
        for k, dev in enumerate(devices):
            dev.start()
            if dev.spec.mcu:
                mcus[k] = McuFeed(k, dev.spec, mcu_q)
                mcus[k].start()
            if k % 25 == 24:
                out_q.put({"type": "connecting", "worker": worker, "started": k + 1})
    except Exception as exc:  # handed to the simulator, which reports it and stops
        log.exception("worker %d failed to start", worker)
        for m in mcus.values():
            m.stop()
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
        if not dev.spec.mcu:  # an MCU-backed device streams at the MCU's own rate
            heap.append((start + rng.uniform(0, 1.0 / dev.spec.rate), order, "input", i, 0.0))
            order += 1
        for at_s, restart_after in dev.spec.crashes:
            heap.append((start + at_s, order, "crash", i, restart_after))
            order += 1
        if dev.spec.mcu:  # serial_noise windows: replug with the window's rate, and back at its end
            for at_s, end_s, corrupt in spec.get("serial_windows", []):
                heap.append((start + at_s, order, "replug", i, corrupt))
                heap.append((start + end_s, order + 1, "replug", i, float(dev.spec.mcu["corrupt"])))
                order += 2
    end = start + duration
    heap.append((end, order, "end", 0, 0.0))
    order += 1
    heapq.heapify(heap)

    def drain_mcus() -> None:
        nonlocal inputs_sent, errors
        while True:
            try:
                i, raw = mcu_q.get_nowait()
            except queue.Empty:
                return
            dev = devices[i]
            if dev.up:  # a crashed device reads nothing
                try:
                    dev.submit_raw(raw)
                    inputs_sent += 1
                except Exception:
                    errors += 1
                    log.exception("device %s failed on a block", dev.spec.device_id)
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
        if mcus:
            drain_mcus()
        when, _, action, i, arg = heap[0]
        if when > now:
            time.sleep(min(when - now, max(0.0, next_report - now), 0.01 if mcus else 0.05))
            continue
        heapq.heappop(heap)
        dev = devices[i]
        if action == "input":
            if when >= end:
                continue
            if dev.up:
                try:
                    if i in feeds:
                        dev.submit_raw(RawInput(b"", "sim", data=feeds[i].next_block()))
                    else:
                        dev.submit(texts[(inputs_sent + i) % len(texts)], dev.handled)
                    inputs_sent += 1
                except Exception:  # a bug in the simulated device: count it, keep the fleet going
                    errors += 1
                    log.exception("device %s failed on an input", dev.spec.device_id)
            heapq.heappush(heap, (when + 1.0 / dev.spec.rate, order, "input", i, 0.0))
        elif action == "replug" and i in mcus:
            if when < end:
                try:
                    mcus[i].replug(arg)
                    events.append({"t": round(time.time() - start, 3), "kind": "replug", "device": dev.spec.device_id,
                                   "corrupt": arg})
                except Exception as exc:
                    errors += 1
                    events.append({"t": round(time.time() - start, 3), "kind": "replug_failed",
                                   "device": dev.spec.device_id, "error": str(exc)})
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
    mcu_counters = {}
    for k, m in mcus.items():  # unplug: what was already read is still handled and counted
        mcu_counters[devices[k].spec.device_id] = m.counters()
        m.stop()
    drain_mcus()
    out_q.put({"type": "stats", "worker": worker, "t": time.time() - start, "inputs": inputs_sent,
               "connected": sum(1 for d in devices if d.up and d.link.connected),
               "reconnects": sum(d.reconnects_total for d in devices), "events": events})
    out_q.put({"type": "inputs_done", "worker": worker, "expected": {d.spec.device_id: d.handled for d in devices},
               "errors": errors, "error_codes": {d.spec.device_id: d.error_codes for d in devices if d.error_codes},
               "mcu": mcu_counters})
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
