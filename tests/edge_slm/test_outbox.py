"""The durable outbox: order, acks, restarts, bounds, and results surviving broker restarts and agent crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm.agent import Agent
from edge_slm.config import AgentConfig, MqttConfig, OutboxConfig, PipelineConfig, load_agent_config
from edge_slm.errors import ConfigError
from edge_slm.mqtt import MqttLink, Topics
from edge_slm.outbox import Outbox, OutboxSender, outbox_path
from edge_slm.sources import RawInput
from tests.conftest import Collector, Mosquitto, start_agent_process, write_agent_toml

TOPIC = "t/x"


class Clock:
    """A wall clock the test moves by hand, for expiry."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def payloads(outbox: Outbox) -> list[bytes]:
    return [r.payload for r in outbox.read(0, 10**9)]


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# --- the queue on its own ------------------------------------------------------------------------
def test_rows_come_back_in_the_order_they_were_put(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for i in range(50):
        assert ob.put(TOPIC, f"r{i}".encode())
    rows = ob.read(0, 20)
    assert [r.payload for r in rows] == [f"r{i}".encode() for i in range(20)]
    rest = ob.read(rows[-1].id, 100)
    assert [r.payload for r in rest] == [f"r{i}".encode() for i in range(20, 50)]
    assert ob.depth == 50 and ob.bytes == sum(len(TOPIC) + len(f"r{i}") for i in range(50))
    ob.close()


def test_ack_deletes_exactly_the_acknowledged_rows(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for i in range(10):
        ob.put(TOPIC, f"r{i}".encode())
    ids = [r.id for r in ob.read(0, 10)]
    assert ob.ack([ids[0], ids[3], ids[9]]) == 3
    assert ob.ack([ids[3]]) == 0, "a second ack of the same row deletes nothing"
    assert payloads(ob) == [f"r{i}".encode() for i in (1, 2, 4, 5, 6, 7, 8)]
    s = ob.stats()
    assert s["depth"] == 7 and s["acked"] == 4 and s["bytes"] == 7 * (len(TOPIC) + 2)
    ob.close()


def test_unacked_rows_survive_a_reopen(tmp_path):
    path = tmp_path / "o.sqlite"
    ob = Outbox(path)
    for i in range(5):
        ob.put(TOPIC, f"r{i}".encode())
    first = ob.read(0, 5)
    ob.ack([first[0].id, first[1].id])
    ob.close()
    ob = Outbox(path)
    assert payloads(ob) == [b"r2", b"r3", b"r4"] and ob.depth == 3
    ob.put(TOPIC, b"r5")
    assert payloads(ob) == [b"r2", b"r3", b"r4", b"r5"]
    ob.close()


def test_ids_never_go_back_while_the_outbox_is_open(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for i in range(3):
        ob.put(TOPIC, f"r{i}".encode())
    ids = [r.id for r in ob.read(0, 3)]
    ob.ack(ids[1:])  # the newest rows go first: SQLite's own rowid would hand ids[1] out again
    ob.put(TOPIC, b"new")
    # The sender's cursor is "highest id handed over": a reused id would be skipped.
    assert ob.read(ids[-1], 10)[0].payload == b"new"
    ob.ack([ids[0]])
    ob.put(TOPIC, b"newer")
    assert [r.payload for r in ob.read(ids[-1], 10)] == [b"new", b"newer"]
    ob.close()


def test_drop_oldest_makes_room_and_counts_overflow(tmp_path):
    size = len(TOPIC) + 10
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=5 * size, overflow="drop_oldest")
    for i in range(8):
        assert ob.put(TOPIC, f"{i:010d}".encode())
    assert payloads(ob) == [f"{i:010d}".encode() for i in range(3, 8)]
    s = ob.stats()
    assert s["dropped"] == {"overflow": 3, "expired": 0} and s["rejected"] == 0
    assert s["depth"] == 5 and s["bytes"] == 5 * size
    ob.close()


def test_reject_new_refuses_and_counts(tmp_path):
    size = len(TOPIC) + 10
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=5 * size, overflow="reject_new")
    accepted = [ob.put(TOPIC, f"{i:010d}".encode()) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert payloads(ob) == [f"{i:010d}".encode() for i in range(5)]
    s = ob.stats()
    assert s["rejected"] == 3 and s["dropped"] == {"overflow": 0, "expired": 0}
    ob.ack([ob.read(0, 1)[0].id])
    assert ob.put(TOPIC, b"9999999999"), "room again once the broker acknowledged a row"
    ob.close()


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_a_record_bigger_than_the_whole_bound_is_rejected_and_nothing_is_dropped(tmp_path, policy):
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=1024, overflow=policy)
    ob.put(TOPIC, b"small")
    assert not ob.put(TOPIC, b"x" * 2000)
    assert payloads(ob) == [b"small"] and ob.stats()["rejected"] == 1
    ob.close()


def test_expired_rows_are_dropped_and_counted(tmp_path):
    clock = Clock()
    path = tmp_path / "o.sqlite"
    ob = Outbox(path, max_age_s=60.0, clock=clock)
    ob.put(TOPIC, b"old1")
    ob.put(TOPIC, b"old2")
    clock.now += 30
    ob.put(TOPIC, b"young")
    clock.now += 31
    assert ob.expire() == 2
    assert payloads(ob) == [b"young"]
    assert ob.stats()["dropped"] == {"overflow": 0, "expired": 2}
    ob.close()
    clock.now += 100
    ob = Outbox(path, max_age_s=60.0, clock=clock)  # what outlived max_age_s while the agent was off
    assert ob.depth == 0 and ob.stats()["dropped"]["expired"] == 1
    ob.close()


def test_a_full_outbox_expires_before_it_drops_or_rejects(tmp_path):
    clock = Clock()
    size = len(TOPIC) + 4
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=3 * size, max_age_s=10.0, overflow="reject_new", clock=clock)
    for p in (b"old0", b"old1", b"new0"):
        ob.put(TOPIC, p)
        clock.now += 6
    assert ob.put(TOPIC, b"new1"), "old0 and old1 are past max_age_s, so there is room"
    assert payloads(ob) == [b"new0", b"new1"]
    assert ob.stats()["dropped"] == {"overflow": 0, "expired": 2} and ob.stats()["rejected"] == 0
    ob.close()


def test_unknown_policy_or_sync_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="overflow"):
        Outbox(tmp_path / "a.sqlite", overflow="drop_newest")
    with pytest.raises(ConfigError, match="sync"):
        Outbox(tmp_path / "b.sqlite", sync="off")


def test_a_corrupt_outbox_file_is_one_clear_error(tmp_path):
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="move it away"):
        Outbox(path)


# --- hypothesis: any interleaving of put / send / ack / restart / time ----------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from([1, 7, 17, 37]) | st.integers(1, 40)),
        st.tuples(st.just("send"), st.integers(1, 6)),
        st.tuples(st.just("ack"), st.integers(0, 50)),
        st.tuples(st.just("restart"), st.just(0)),
        st.tuples(st.just("tick"), st.integers(1, 40)),
        st.tuples(st.just("expire"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, max_bytes=st.integers(40, 200), policy=st.sampled_from(["drop_oldest", "reject_new"]),
       sync=st.sampled_from(["normal", "full"]))
def test_interleavings_never_lose_or_reorder_accepted_rows(ops, max_bytes, policy, sync):
    """A model of the queue says exactly which rows the bounds drop; every other accepted row must be
    in the outbox, in order, until acked: across reopens, and for a sender reading from its cursor."""
    max_age = 100.0
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "o.sqlite"

        def open_outbox() -> Outbox:
            return Outbox(path, max_bytes=max_bytes, max_age_s=max_age, overflow=policy, sync=sync, clock=clock)

        ob = open_outbox()
        model: list[tuple[int, float, bytes]] = []  # (id, ts, payload) accepted, not acked, not dropped
        last_id = 0
        cursor, inflight = 0, []  # what a sender has read and not seen acked
        totals = Counter()  # over every process lifetime
        counters = Counter()  # since the last reopen, as stats() reports them

        def size(p: bytes) -> int:
            return len(TOPIC) + len(p)

        def expire(rows: list) -> int:
            """Drop the run of oldest rows past max_age from rows, in place, as the outbox does."""
            n = 0
            while rows and rows[0][1] < clock.now - max_age:
                rows.pop(0)
                n += 1
            return n

        try:
            for n, (op, arg) in enumerate(ops):
                if op == "put":
                    p = bytes([65 + n % 26]) * arg  # sizes often add up exactly to the bound
                    after, expired, overflow = list(model), 0, 0
                    accepted = size(p) <= max_bytes
                    if accepted and sum(size(r[2]) for r in after) + size(p) > max_bytes:
                        expired = expire(after)  # a full outbox first lets go of what is too old
                        if sum(size(r[2]) for r in after) + size(p) > max_bytes and policy == "reject_new":
                            accepted = False  # and the expiry is rolled back with the refused insert
                        while accepted and sum(size(r[2]) for r in after) + size(p) > max_bytes:
                            after.pop(0)
                            overflow += 1
                    assert ob.put(TOPIC, p) == accepted, (op, arg)
                    if accepted:
                        last_id += 1
                        model = after + [(last_id, clock.now, p)]
                        counters["expired"] += expired
                        counters["overflow"] += overflow
                        totals["accepted"] += 1
                    else:
                        counters["rejected"] += 1
                elif op == "send":
                    rows = ob.read(cursor, arg)
                    expect = [r for r in model if r[0] > cursor][:arg]
                    assert [(r.id, r.payload) for r in rows] == [(i, p) for i, _, p in expect]
                    if rows:
                        cursor = rows[-1].id
                    inflight += [r.id for r in rows]
                elif op == "ack" and inflight:
                    row_id = inflight.pop(arg % len(inflight))
                    deleted = ob.ack([row_id])
                    in_model = any(r[0] == row_id for r in model)
                    assert deleted == int(in_model)
                    model = [r for r in model if r[0] != row_id]
                    counters["acked"] += 1
                    totals["acked_rows"] += deleted
                elif op == "restart":
                    ob.close()
                    for k in ("expired", "overflow"):
                        totals[k] += counters[k]
                    counters = Counter()
                    ob = open_outbox()
                    last_id = model[-1][0] if model else 0  # a new process numbers on from the largest id left
                    counters["expired"] += expire(model)
                    cursor, inflight = 0, []  # a new process sends everything again
                elif op == "tick":
                    clock.now += arg
                elif op == "expire":
                    n_expired = expire(model)
                    assert ob.expire() == n_expired
                    counters["expired"] += n_expired
                # The invariants, after every step.
                assert [(r.id, r.payload) for r in ob.read(0, 10**6)] == [(i, p) for i, _, p in model]
                s = ob.stats()
                assert s["depth"] == len(model) and s["bytes"] == sum(size(r[2]) for r in model)
                assert s["dropped"] == {"overflow": counters["overflow"], "expired": counters["expired"]}
                assert s["rejected"] == counters["rejected"] and s["acked"] == counters["acked"]
                dropped = totals["expired"] + totals["overflow"] + counters["expired"] + counters["overflow"]
                assert totals["accepted"] == len(model) + totals["acked_rows"] + dropped, "a row went missing"
        finally:
            ob.close()


# --- the sender's ack bookkeeping: races a real broker cannot be made to produce on demand --------
class ScriptedLink:
    """Stands in for MqttLink the way paho behaves: mids count up and wrap (here after a few), a mid
    still unacknowledged is refused, and a PUBACK may be handled before publish() has returned."""

    def __init__(self, mid_space: int) -> None:
        self.mid_space = mid_space
        self.connected = True
        self.reconnects = 0
        self.on_ack = None
        self.held: dict[int, bytes] = {}  # mid -> payload, published and not yet acknowledged
        self.delivered: list[bytes] = []
        self._last = 0
        self.ack_inside_publish = False

    def publish(self, topic: str, payload: bytes, **_) -> int:  # noqa: ANN003
        from edge_slm.errors import BrokerError

        self._last = self._last % self.mid_space + 1
        if self._last in self.held:
            raise BrokerError("MQTT client queue is full")
        self.held[self._last] = payload
        self.delivered.append(payload)
        if self.ack_inside_publish:
            self.ack(self._last)
        return self._last

    def ack(self, mid: int) -> None:
        del self.held[mid]
        self.on_ack(mid)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["put", "fill", "ack", "early", "foreign"]), st.integers(0, 30)),
                      max_size=80),
       mid_space=st.integers(2, 9), window=st.integers(1, 12))
def test_a_row_is_deleted_only_by_its_own_ack_whatever_the_timing(steps, mid_space, window):
    with tempfile.TemporaryDirectory() as tmp:
        ob = Outbox(Path(tmp) / "o.sqlite")
        link = ScriptedLink(mid_space)
        sender = OutboxSender(ob, link, window=window)  # driven by hand: no thread
        link.on_ack = sender._on_ack
        ob.on_put = sender._on_put  # a put may hand its row straight to the link
        put, acked = [], set()
        n = 0
        try:
            for op, arg in steps:
                if op == "put":
                    link.ack_inside_publish = arg % 2 == 1
                    for _ in range(arg % 4 + 1):
                        n += 1
                        put.append(b"%d" % n)
                        assert ob.put(TOPIC, put[-1])
                    link.ack_inside_publish = False
                elif op in ("fill", "early"):
                    link.ack_inside_publish = op == "early"
                    sender._fill_window(time.monotonic())
                    link.ack_inside_publish = False
                elif op == "ack" and link.held:
                    mid = sorted(link.held)[arg % len(link.held)]
                    acked.add(link.held[mid])
                    link.ack(mid)
                elif op == "foreign":  # a status or QoS 0 publish completing with a free mid
                    free = [m for m in range(1, mid_space + 1) if m not in link.held]
                    if free:
                        sender._on_ack(free[arg % len(free)])
                sender._settle()  # the thread's first step on every pass
                acked |= {p for p in link.delivered if p not in link.held.values()}
                left = payloads(ob)
                assert left == [p for p in put if p not in acked], "only acknowledged rows leave, in order"
            for _ in range(4 * len(put) + 10):  # then the broker acknowledges everything
                sender._fill_window(time.monotonic())
                for mid in list(link.held):
                    link.ack(mid)
                sender._settle()
            assert ob.depth == 0
            first_seen = list(dict.fromkeys(link.delivered))
            assert first_seen == put, "every row went out, first time in order"
        finally:
            ob.close()


# --- the sender against a real mosquitto ----------------------------------------------------------
@pytest.fixture
def broker(own_mosquitto: Mosquitto) -> Mosquitto:
    """own_mosquitto whose persistent sessions really survive a restart.

    Started as root, mosquitto switches to the `mosquitto` user, which cannot write its persistence
    file into pytest's 0700 tmp dir; every restart then forgets the subscriber's session and whatever
    it was queued, and a test passes or fails on who reconnects first. Staying root avoids that.
    """
    if os.geteuid() == 0 and "user root" not in own_mosquitto.conf.read_text():
        own_mosquitto.conf.write_text(own_mosquitto.conf.read_text() + "user root\n")
        own_mosquitto.stop()
        own_mosquitto.start()
    return own_mosquitto


def open_link(url: str, name: str) -> MqttLink:
    link = MqttLink(url, f"outbox-test-{name}", Topics("edge-slm", name))
    link.connect(timeout=10)
    return link


def test_sender_publishes_in_order_and_acks_empty_the_outbox(mosquitto, tmp_path):
    col = Collector(mosquitto.url, "ob-order/#")
    link = open_link(mosquitto.url, "ob-order")
    ob = Outbox(tmp_path / "o.sqlite")
    sender = OutboxSender(ob, link, window=20)
    sender.start()
    try:
        for i in range(500):
            assert ob.put("ob-order/r", json.dumps({"seq": i}).encode())
        got = col.wait_for(500, timeout=30)
        assert [json.loads(p)["seq"] for _, p, _ in got] == list(range(500))
        assert sender.wait_drained(10)
        s = sender.stats()
        assert s["depth"] == 0 and s["bytes"] == 0 and s["sent"] == 500 and s["acked"] == 500
        assert s["inflight"] == 0
    finally:
        sender.close()
        ob.close()
        link.close(timeout=2)
        col.close()


def test_unacked_rows_are_sent_again_after_a_process_restart(broker, tmp_path):
    path = tmp_path / "o.sqlite"
    link = open_link(broker.url, "ob-restart")
    ob = Outbox(path)
    sender = OutboxSender(ob, link, window=100)
    sender.start()
    broker.stop()
    wait_until(lambda: not link.connected, what="the link to notice the broker is gone")
    for i in range(50):
        ob.put("ob-restart/r", str(i).encode())
    wait_until(lambda: sender.inflight == 50, what="rows handed to paho while disconnected")
    # The process "dies": paho's in-memory copies go with it, the rows stay on disk.
    sender.close()
    ob.close()
    link.loop.stop()  # the agent's own network thread: with it gone this client never reconnects
    broker.start()
    col = Collector(broker.url, "ob-restart/#")
    ob = Outbox(path)
    assert ob.depth == 50
    link = open_link(broker.url, "ob-restart-2")
    sender = OutboxSender(ob, link)
    sender.start()
    try:
        got = col.wait_for(50, timeout=30)
        assert [int(p) for _, p, _ in got] == list(range(50))
        assert sender.wait_drained(10) and ob.depth == 0
    finally:
        sender.close()
        ob.close()
        link.close(timeout=2)
        col.close()


def test_rows_handed_over_during_an_outage_are_acked_after_the_broker_returns(broker, tmp_path):
    col = Collector(broker.url, "ob-outage/#", persistent=True)
    link = open_link(broker.url, "ob-outage")
    ob = Outbox(tmp_path / "o.sqlite")
    sender = OutboxSender(ob, link, window=10)
    sender.start()
    try:
        broker.stop()
        wait_until(lambda: not link.connected, what="the link to notice the broker is gone")
        for i in range(200):
            ob.put("ob-outage/r", str(i).encode())
        time.sleep(0.5)
        assert sender.inflight == 10 and ob.depth == 200, "only the window goes to paho; the rest waits on disk"
        broker.start()
        got = col.wait_for(200, timeout=60)
        assert sorted({int(p) for _, p, _ in got}) == list(range(200))
        assert sender.wait_drained(30)
    finally:
        sender.close()
        ob.close()
        link.close(timeout=2)
        col.close()


# --- configuration -----------------------------------------------------------------------------------
def test_outbox_config_defaults_and_errors_name_the_key(text_model, tmp_path):
    cfg = write_agent_toml(tmp_path / "a.toml", "cfg-ob", "mqtt://127.0.0.1:1", text_model.package, tmp_path / "s")
    o = load_agent_config(cfg).outbox
    assert o == OutboxConfig() and o.enabled and o.max_bytes == 64 * 1024 * 1024 and o.overflow == "drop_oldest"
    for extra, key in [("[outbox]\noverflow = 'drop_newest'", "outbox.overflow"),
                       ("[outbox]\nsync = 'off'", "outbox.sync"),
                       ("[outbox]\nwindow = 0", "outbox.window"),
                       ("[outbox]\nmax_bytes = 10", "outbox.max_bytes"),
                       ("[outbox]\nmax_age_s = -1", "outbox.max_age_s"),
                       ("[outbox]\nenabled = 'yes'", "outbox.enabled"),
                       ("[outbox]\ncolour = 1", "outbox.colour")]:
        write_agent_toml(tmp_path / "a.toml", "cfg-ob", "mqtt://127.0.0.1:1", text_model.package, tmp_path / "s",
                         extra=extra)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_agent_config(cfg)


# --- the agent --------------------------------------------------------------------------------------
def agent_in_process(url: str, package, state_dir, device_id: str, outbox: OutboxConfig) -> Agent:  # noqa: ANN001
    cfg = AgentConfig(device_id=device_id, mqtt=MqttConfig(broker=url, connect_timeout_s=5.0),
                      pipelines=[PipelineConfig(name="intent", model=str(package), source="mqtt://")],
                      state_dir=str(state_dir), outbox=outbox)
    agent = Agent(cfg)
    agent.start()
    return agent


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_new"])
def test_drops_and_rejections_are_reported_in_outbox_stats(broker, text_model, tmp_path, policy):
    dev = f"ob-stats-{policy}"
    col = Collector(broker.url, f"edge-slm/{dev}/intent/result", persistent=True)
    # window=1: one record sits in paho's memory, every other one only in the outbox
    agent = agent_in_process(broker.url, text_model.package, tmp_path, dev,
                             OutboxConfig(max_bytes=4096, overflow=policy, window=1, drain_timeout_s=30))
    pipe = agent.pipelines[0]
    try:
        broker.stop()
        wait_until(lambda: not agent.link.connected, what="the agent to notice the broker is gone")
        for i in range(40):
            pipe.submit(RawInput(f"dim the lights in room {i}".encode(), "test", input_id=f"in{i}"))
        wait_until(lambda: pipe.counts["results"] == 40, what="40 results")
        s = agent.outbox_stats()
        assert s["bytes"] <= 4096 and s["inflight"] == 1
        if policy == "drop_oldest":
            assert s["dropped"]["overflow"] > 0 and s["rejected"] == 0
            lost = s["dropped"]["overflow"]
        else:
            assert s["rejected"] > 0 and s["dropped"]["overflow"] == 0
            lost = s["rejected"]
        assert s["depth"] + lost == 40, "each record is in the outbox or counted as dropped/rejected"
        broker.start()
        wait_until(lambda: agent.outbox_stats()["depth"] == 0, timeout=60, what="the outbox to drain")
        got = {json.loads(p)["input_id"] for _, p, _ in col.wait_for(40 - lost + (policy == "drop_oldest"), 30)}
        if policy == "drop_oldest":  # the newest survive, plus the first one paho already held
            assert {f"in{i}" for i in range(lost, 40)} <= got and len(got) >= 40 - lost
        else:  # the oldest were kept, the newest refused
            assert got == {f"in{i}" for i in range(40 - lost)}
    finally:
        agent.stop()
        agent.close()
        col.close()


def test_agent_without_outbox_publishes_directly(mosquitto, text_model, tmp_path):
    dev = "ob-off"
    col = Collector(mosquitto.url, f"edge-slm/{dev}/intent/result")
    agent = agent_in_process(mosquitto.url, text_model.package, tmp_path, dev, OutboxConfig(enabled=False))
    try:
        assert agent.outbox_stats() is None and not outbox_path(tmp_path, dev).exists()
        agent.pipelines[0].submit(RawInput(b"open the garage door", "test", input_id="direct"))
        (m,) = col.wait_for(1)
        assert json.loads(m[1])["input_id"] == "direct"
    finally:
        agent.stop()
        agent.close()
        col.close()


def result_records(col: Collector) -> list[dict]:
    return col.json("/intent/result")


class OutboxProgress:
    """Reads a running agent's outbox file as a second process may (WAL lets a reader in)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.accepted = 0

    def read(self) -> tuple[int, int]:
        """(records accepted so far, records still waiting for their PUBACK).

        One agent process on a fresh state_dir numbers its rows 1, 2, 3, ...: the largest id seen is
        how many it has accepted."""
        if self.db is None:
            if not self.path.exists():
                return 0, 0
            self.db = sqlite3.connect(self.path, timeout=10)
        newest, waiting = self.db.execute("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM outbox").fetchone()
        self.accepted = max(self.accepted, int(newest))
        return self.accepted, int(waiting)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def test_every_result_arrives_while_the_broker_restarts_five_times(broker, text_model, tmp_path):
    """10,000 inputs from a file; the broker is stopped and started again five times while the agent
    still has results waiting in its outbox. Every result arrives; by seq none is missing; duplicates
    are allowed and counted."""
    dev = "ob-storm"
    n = 10_000
    inputs = tmp_path / "in.txt"
    texts = text_model.test_texts
    inputs.write_text("".join(f"{texts[i % len(texts)]} {i}\n" for i in range(n)))
    state = tmp_path / "state"
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, broker.url, text_model.package, state,
                           source=f"file://{inputs}", extra="[outbox]\ndrain_timeout_s = 120.0\n")
    col = Collector(broker.url, f"edge-slm/{dev}/intent/result", persistent=True)
    progress = OutboxProgress(outbox_path(state, dev))
    t0 = time.monotonic()
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    log_tail = lambda: (tmp_path / "agent.log").read_text()[-3000:]  # noqa: E731
    outages = []  # (accepted, waiting) as each outage began
    try:
        assert len(col.wait_for(200, timeout=60, topic_contains="/result")) >= 200, log_tail()
        for k in range(1, 6):
            broker.stop()
            accepted, waiting = progress.read()
            # Mid-stream for the agent: inputs still to read, or results the broker has not acknowledged.
            assert accepted < n or waiting > 0, f"outage {k} came after the agent had delivered everything"
            outages.append((accepted, waiting))
            assert proc.poll() is None, log_tail()
            assert (broker.conf.parent / "mosquitto.db").exists(), "the broker must keep the collector's queue"
            time.sleep(0.7)
            broker.start()
            if k < 5:  # let the agent deliver a few hundred more before the next outage
                acked_at_restart = accepted - waiting
                wait_until(lambda a=acked_at_restart: (lambda x: x[0] - x[1])(progress.read()) >= a + 500,
                           timeout=60, what=f"the agent to deliver after restart {k}")
        assert proc.wait(120) == 0, log_tail()
        deadline = time.monotonic() + 60
        while len({r["seq"] for r in result_records(col)}) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        recs = result_records(col)
        seqs = Counter(r["seq"] for r in recs)
        missing = sorted(set(range(1, n + 1)) - set(seqs))
        assert not missing, f"{len(missing)} results missing, first {missing[:10]}"
        assert {r["input_id"] for r in recs} == {f"file:in.txt:{i}" for i in range(1, n + 1)}
        dups = sum(c - 1 for c in seqs.values())
        print(f"\n{n} results through {len(outages)} broker restarts in {time.monotonic() - t0:.1f}s; "
              f"{len(recs)} delivered, {dups} duplicates; (accepted, unacked) at each outage: {outages}")
        assert len(outages) == 5
        assert "records not acknowledged" not in (tmp_path / "agent.log").read_text()
    finally:
        progress.close()
        if proc.poll() is None:
            proc.kill()
        col.close()


def outbox_rows(path: Path) -> list[dict]:
    """The records in an agent's outbox file, read as a second process would (the agent is dead)."""
    db = sqlite3.connect(path)
    try:
        return [json.loads(p) for (p,) in db.execute("SELECT payload FROM outbox ORDER BY id")]
    finally:
        db.close()


def test_results_accepted_before_a_sigkill_arrive_after_restart(broker, text_model, tmp_path):
    """"Accepted" means committed to the outbox (put() returned True), before the broker ever saw it.

    The agent is SIGKILLed with the broker down and hundreds of results only on disk. After a restart
    every one of those arrives with its original seq, and, since the file source reads the file again
    from the start, every line's result arrives at least once.
    """
    dev = "ob-crash"
    n = 3000
    inputs = tmp_path / "in.txt"
    texts = text_model.test_texts
    inputs.write_text("".join(f"{texts[i % len(texts)]} {i}\n" for i in range(n)))
    state = tmp_path / "state"
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, broker.url, text_model.package, state,
                           source=f"file://{inputs}", extra="[outbox]\ndrain_timeout_s = 60.0\n")
    db_path = outbox_path(state, dev)
    col = Collector(broker.url, f"edge-slm/{dev}/intent/result", persistent=True)
    proc = start_agent_process(cfg, tmp_path / "a1.log")
    try:
        col.wait_for(300, timeout=60, topic_contains="/result")
        broker.stop()  # from here results pile up in the outbox
        wait_until(lambda: db_path.exists() and len(outbox_rows(db_path)) >= 500, timeout=60,
                   what="results accumulating in the outbox")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        delivered_before = {r["seq"] for r in result_records(col)}
        on_disk = outbox_rows(db_path)
        accepted = delivered_before | {r["seq"] for r in on_disk}
        assert len(on_disk) >= 500
        broker.start()
        proc = start_agent_process(cfg, tmp_path / "a2.log")
        assert proc.wait(120) == 0, (tmp_path / "a2.log").read_text()[-3000:]
        wait_until(lambda: accepted <= {r["seq"] for r in result_records(col)}, timeout=60,
                   what="every accepted result")
        recs = result_records(col)
        # Nothing accepted went missing: seqs are handed out 1, 2, 3, ... and only the record being
        # made at the instant of the kill can hold a seq without having been accepted.
        assert set(range(1, max(accepted) + 1)) <= {r["seq"] for r in recs}
        assert {r["input_id"] for r in recs} >= {f"file:in.txt:{i}" for i in range(1, n + 1)}
        by_seq = {r["seq"]: r for r in recs}
        assert all(by_seq[r["seq"]] == r for r in on_disk), "a resent record is the same record"
        dups = len(recs) - len({r["seq"] for r in recs})
        print(f"\nkilled with {len(on_disk)} results only on disk; {len(recs)} delivered, {dups} duplicates")
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
