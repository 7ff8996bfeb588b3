"""Command routing, metrics and Home Assistant discovery payloads."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.commands import CommandError, CommandRouter
from edge_slm.homeassistant import discovery_messages
from edge_slm.metrics import Metrics, rss_bytes
from edge_slm.mqtt import Topics


def router() -> CommandRouter:
    def fail(args):  # noqa: ANN001, ANN202
        raise RuntimeError("boom")

    def refuse(args):  # noqa: ANN001, ANN202
        raise CommandError("nope", "refused")

    return CommandRouter({"ping": lambda a: {"pong": True, **a}, "fail": fail, "refuse": refuse})


def test_reply_carries_the_correlation_id_and_result():
    r = router().handle("ping", b'{"id": "c-7", "args": {"x": 1}}')
    assert r == {"schema_version": 1, "id": "c-7", "command": "ping", "ok": True, "result": {"pong": True, "x": 1}}


def test_malformed_commands_get_error_replies():
    cases = {b"\xff": "bad_encoding", b"{": "bad_json", b"[1]": "bad_request", b'{"id": true}': "bad_request",
             b'{"id": "a", "args": 3}': "bad_request"}
    for payload, code in cases.items():
        r = router().handle("ping", payload)
        assert r["ok"] is False and r["error"] == code, payload
    assert router().handle("reboot", b"{}")["error"] == "unknown_command"
    assert router().handle("fail", b'{"id": 1}') | {"message": ""} == {
        "schema_version": 1, "id": 1, "command": "fail", "ok": False, "error": "internal_error", "message": ""}
    assert router().handle("refuse", b"{}")["error"] == "nope"
    assert router().handle("ping", b"[" * 50000)["error"] == "bad_json"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ping", "fail", "refuse", "other"]),
       st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                              lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20)
                 .map(lambda o: json.dumps(o).encode())))
def test_any_payload_gets_a_reply_never_an_exception(name, payload):
    r = router().handle(name, payload)
    assert isinstance(r, dict) and r["command"] == name and isinstance(r["ok"], bool)
    assert r["ok"] or r["error"]
    json.dumps(r)  # always serialisable


def test_metrics_percentiles_and_counts():
    m = Metrics()
    for i in range(100):
        m.record("intent", "result", float(i))
    m.record("intent", "error")
    s = m.snapshot({"reconnects": 2})
    p = s["pipelines"]["intent"]
    assert p["inferences"] == 100 and p["errors"] == 1
    assert p["latency_ms_p50"] == 49.5 and 93 <= p["latency_ms_p95"] <= 95
    assert s["reconnects"] == 2 and s["rss_bytes"] > 10_000_000 and abs(s["rss_bytes"] - rss_bytes()) < 50_000_000


def test_discovery_has_one_sensor_per_pipeline_and_availability():
    topics = Topics("edge-slm", "kitchen")
    msgs = dict(discovery_messages(topics, [("intent", "text-classification", {"name": "m", "version": "1"}),
                                            ("chat", "text-generation", {"name": "lm", "version": "2"})]))
    cfg = json.loads(msgs["homeassistant/sensor/edge_slm_kitchen/intent/config"])
    assert cfg["state_topic"] == "edge-slm/kitchen/intent/result"
    assert cfg["availability_topic"] == "edge-slm/kitchen/status"
    assert cfg["value_template"] == "{{ value_json.output.label }}"
    assert cfg["unique_id"] == "edge-slm-kitchen-intent"
    chat = json.loads(msgs["homeassistant/sensor/edge_slm_kitchen/chat/config"])
    assert "[:250]" in chat["value_template"]
    assert "homeassistant/sensor/edge_slm_kitchen/latency/config" in msgs
