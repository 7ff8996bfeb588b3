"""The agent against a real mosquitto: results, errors, status, last will, seq, shutdown."""

from __future__ import annotations

import json
import signal
import time

import pytest

from edge_slm.agent import Agent
from edge_slm.config import AgentConfig, MqttConfig, PipelineConfig
from tests.conftest import Collector, run_cli, start_agent_process, write_agent_toml


def make_agent(url: str, package, state_dir, device_id: str, protocol: str = "5") -> Agent:  # noqa: ANN001
    cfg = AgentConfig(
        device_id=device_id,
        pipelines=[PipelineConfig(name="intent", model=str(package), source="mqtt://")],
        mqtt=MqttConfig(broker=url, connect_timeout_s=5.0, protocol=protocol),
        state_dir=str(state_dir),
    )
    agent = Agent(cfg)
    agent.start()
    return agent


def test_results_arrive_with_schema_and_increasing_seq(mosquitto, text_model, tmp_path):
    dev = "res-1"
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#")
    agent = make_agent(mosquitto.url, text_model.package, tmp_path, dev)
    try:
        texts = text_model.test_texts[:20]
        for i, t in enumerate(texts):
            col.publish(f"edge-slm/{dev}/intent/input", json.dumps({"id": f"q{i}", "text": t}))
        msgs = col.wait_for(len(texts), topic_contains="/intent/result")
        assert len(msgs) == len(texts)
        recs = col.json("/intent/result")
        assert [r["input_id"] for r in recs] == [f"q{i}" for i in range(len(texts))]
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        r = recs[0]
        assert set(r) >= {"device_id", "pipeline", "seq", "ts", "input_id", "model", "output", "latency_ms"}
        assert r["device_id"] == dev and r["pipeline"] == "intent"
        assert r["model"]["sha256"] == json.loads((text_model.package / "manifest.json").read_text())["sha256"]
        assert r["output"]["label"] in text_model.labels
        assert 0.0 < r["output"]["score"] <= 1.0
        # the agent answers what the model answers: compare with the package run directly
        from edge_slm.package import ModelPackage
        from edge_slm.tasks import load_task

        task = load_task(ModelPackage.open(text_model.package))
        assert [x["output"]["label"] for x in recs] == [task(t)["label"] for t in texts]
        status = [m for m in col.messages if m[0].endswith("/status")]
        assert status and status[-1][1] == b"online"
    finally:
        agent.stop()
        agent.close()
        col.close()


def test_bad_inputs_become_error_records_and_agent_keeps_serving(mosquitto, text_model, tmp_path):
    dev = "bad-1"
    col = Collector(mosquitto.url, f"edge-slm/{dev}/intent/+")
    agent = make_agent(mosquitto.url, text_model.package, tmp_path, dev)
    topic = f"edge-slm/{dev}/intent/input"
    try:
        bad = [b"\xff\xfe not utf-8", b"   ", b'{"text": ', b'{"id": "x"}', b"a" * 70000, b'{"id": "e1", "text": ""}']
        for payload in bad:
            col.publish(topic, payload)
        col.publish(topic, json.dumps({"id": "good", "text": "turn on the kitchen lights"}))
        assert len(col.wait_for(len(bad), topic_contains="/intent/error")) == len(bad)
        assert len(col.wait_for(1, topic_contains="/intent/result")) == 1
        errors = col.json("/intent/error")
        assert [e["error"] for e in errors] == [
            "bad_encoding", "empty_input", "bad_json", "bad_request", "input_too_long", "empty_input"]
        assert all(e["message"] and e["seq"] for e in errors)
        assert errors[-1]["input_id"] == "e1"
        results = col.json("/intent/result")
        assert len(results) == 1 and results[0]["input_id"] == "good"
        assert results[0]["seq"] > errors[-1]["seq"]
    finally:
        agent.stop()
        agent.close()
        col.close()


def test_overlong_text_is_truncated_and_flagged(mosquitto, text_model, tmp_path):
    dev = "long-1"
    col = Collector(mosquitto.url, f"edge-slm/{dev}/intent/result")
    agent = make_agent(mosquitto.url, text_model.package, tmp_path, dev)
    try:
        col.publish(f"edge-slm/{dev}/intent/input", "turn on the kitchen lights " * 40)
        (msg,) = col.wait_for(1)
        assert json.loads(msg[1])["output"]["truncated"] is True
    finally:
        agent.stop()
        agent.close()
        col.close()


def test_sigterm_says_offline_and_seq_continues_after_restart(mosquitto, text_model, tmp_path):
    dev = "proc-1"
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, mosquitto.url, text_model.package, tmp_path / "state")
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#")
    seqs = []
    try:
        for round_ in range(2):
            proc = start_agent_process(cfg, tmp_path / f"agent{round_}.log")
            online = col.wait_for(2 * round_ + 1, topic_contains="/status", timeout=60)
            assert online[-1][1] == b"online", (tmp_path / f"agent{round_}.log").read_text()
            for i in range(5):
                col.publish(f"edge-slm/{dev}/intent/input", f"lock the front door {i}")
            col.wait_for(5 * (round_ + 1), topic_contains="/result")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            status = col.wait_for(2 * round_ + 2, topic_contains="/status")
            assert status[-1][1] == b"offline"
        seqs = [r["seq"] for r in col.json("/result")]
        assert seqs == list(range(seqs[0], seqs[0] + 10)), "a clean restart continues seq without a gap or repeat"
    finally:
        col.close()


def test_last_will_marks_a_killed_agent_offline(mosquitto, text_model, tmp_path):
    dev = "kill-1"
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, mosquitto.url, text_model.package, tmp_path / "state",
                           extra="")
    col = Collector(mosquitto.url, f"edge-slm/{dev}/status")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    try:
        assert col.wait_for(1, timeout=60)[-1][1] == b"online"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # mosquitto publishes the will when it notices the dead socket (immediately on a RST)
        msgs = col.wait_for(2, timeout=60)
        assert msgs[-1][1] == b"offline"
    finally:
        if proc.poll() is None:
            proc.kill()
        col.close()
    late = Collector(mosquitto.url, f"edge-slm/{dev}/status")
    try:
        (m,) = late.wait_for(1, timeout=10)
        assert m[1] == b"offline" and m[2] is True, "status is retained"
    finally:
        late.close()


def test_seq_after_a_crash_never_repeats(mosquitto, text_model, tmp_path):
    dev = "crash-1"
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, mosquitto.url, text_model.package, tmp_path / "state")
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#")
    try:
        for round_ in range(2):
            proc = start_agent_process(cfg, tmp_path / f"a{round_}.log")
            col.wait_for(2 * round_ + 1, topic_contains="/status", timeout=60)
            for i in range(3):
                col.publish(f"edge-slm/{dev}/intent/input", f"play some jazz {i}")
            deadline = time.monotonic() + 30
            while len({r["seq"] for r in col.json("/result")}) < 3 * (round_ + 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.kill()
            proc.wait(10)
            col.wait_for(2 * round_ + 2, topic_contains="/status")
        # the outbox may resend a record whose PUBACK raced the kill: a duplicate has the same seq and input
        records = {r["seq"]: r["input_id"] for r in col.json("/result")}
        assert len(records) == 6, records
        seqs = list(dict.fromkeys(r["seq"] for r in col.json("/result")))
        assert all(b > a for a, b in zip(seqs, seqs[1:])), "new records never reuse a seq"
    finally:
        col.close()


def test_unreachable_broker_at_start_is_one_clear_line(text_model, tmp_path):
    from tests.conftest import free_port

    cfg = write_agent_toml(tmp_path / "agent.toml", "nobroker", f"mqtt://127.0.0.1:{free_port()}",
                           text_model.package, tmp_path / "state")
    res = run_cli("run", str(cfg), timeout=60)
    assert res.returncode == 1
    err = res.stderr.decode().strip().splitlines()[-1]
    assert "cannot reach broker mqtt://127.0.0.1" in err and "[mqtt].broker" in err


def test_unknown_config_key_names_the_key(text_model, tmp_path):
    cfg = write_agent_toml(tmp_path / "agent.toml", "cfg", "mqtt://127.0.0.1:1", text_model.package,
                           tmp_path / "state", extra="colour = 'blue'")
    res = run_cli("run", str(cfg), timeout=60)
    assert res.returncode == 1
    assert b"unknown key 'colour'" in res.stderr and str(cfg).encode() in res.stderr


def test_corrupt_model_refused_at_start(package_copy, tmp_path):
    model = package_copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    cfg = write_agent_toml(tmp_path / "agent.toml", "corrupt", "mqtt://127.0.0.1:1", package_copy, tmp_path / "s")
    res = run_cli("run", str(cfg), timeout=60)
    assert res.returncode == 1
    assert b"sha256" in res.stderr and b"does not match" in res.stderr


def test_file_source_to_stdout_runs_without_a_broker(text_model, tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("turn off the bedroom lamp\n\nset a timer for 5 minutes\n\xff\n".encode("latin-1").decode("latin-1"))
    inputs.write_bytes(b"turn off the bedroom lamp\n\nset a timer for 5 minutes\n\xff\xfe\n")
    cfg = write_agent_toml(tmp_path / "agent.toml", "file-1", "mqtt://127.0.0.1:1", text_model.package,
                           tmp_path / "state", source=f"file://{inputs}", sinks=("stdout",))
    res = run_cli("run", str(cfg), timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.decode().splitlines()]
    assert len(lines) == 3
    assert lines[0]["input_id"] == "file:in.txt:1" and "output" in lines[0]
    assert lines[1]["input_id"] == "file:in.txt:3" and "output" in lines[1]
    assert lines[2]["error"] == "bad_encoding"


def test_stdin_source(text_model, tmp_path):
    cfg = write_agent_toml(tmp_path / "agent.toml", "stdin-1", "mqtt://127.0.0.1:1", text_model.package,
                           tmp_path / "state", source="stdin://", sinks=("stdout",))
    res = run_cli("run", str(cfg), input=b"close the blinds in the office\nwhat is the weather today\n", timeout=60)
    assert res.returncode == 0, res.stderr
    outs = [json.loads(x)["output"]["label"] for x in res.stdout.decode().splitlines()]
    assert len(outs) == 2 and all(o in text_model.labels for o in outs)


@pytest.mark.parametrize("broker_fixture", ["mosquitto", "amqtt_broker"])
def test_agent_works_with_both_brokers(request, broker_fixture, text_model, tmp_path):
    broker = request.getfixturevalue(broker_fixture)
    dev = f"both-{broker_fixture}"
    col = Collector(broker.url, f"edge-slm/{dev}/intent/result")
    # amqtt speaks MQTT 3.1.1 only; mosquitto gets the default, MQTT 5
    agent = make_agent(broker.url, text_model.package, tmp_path, dev,
                       protocol="3.1.1" if broker_fixture == "amqtt_broker" else "5")
    try:
        for i in range(10):
            col.publish(f"edge-slm/{dev}/intent/input", f"turn on the hallway light {i}")
        assert len(col.wait_for(10)) == 10
    finally:
        agent.stop()
        agent.close()
        col.close()


def test_results_made_while_the_broker_is_down_arrive_after_it_returns(own_mosquitto, text_model, tmp_path):
    dev = "restart-1"
    # a persistent subscriber session: the broker keeps its queue across the restart
    col = Collector(own_mosquitto.url, f"edge-slm/{dev}/intent/result", persistent=True)
    agent = make_agent(own_mosquitto.url, text_model.package, tmp_path, dev)
    pipe = agent.pipelines[0]
    from edge_slm.sources import RawInput

    try:
        pipe.submit(RawInput(b"open the garage door", "test", input_id="before"))
        assert len(col.wait_for(1)) == 1
        own_mosquitto.stop()
        for i in range(5):
            pipe.submit(RawInput(f"open the garage door {i}".encode(), "test", input_id=f"down{i}"))
        deadline = time.monotonic() + 10
        while pipe.counts["results"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.link.unacked >= 5, "results made during the outage wait for their ack"
        own_mosquitto.start()
        got = col.wait_for(6, timeout=60)
        ids = [json.loads(p)["input_id"] for _, p, _ in got]
        assert ids == ["before"] + [f"down{i}" for i in range(5)]
        assert agent.link.wait_acked(10)
        assert agent.link.reconnects >= 1
    finally:
        agent.stop()
        agent.close()
        col.close()
