"""The agent's control plane over a real mosquitto: commands, Home Assistant, metrics, failover."""

from __future__ import annotations

import json
import shutil
import time

from tests.conftest import Collector, free_port, run_cli, start_agent_process, write_agent_toml


def start(tmp_path, mosquitto, text_model, dev, extra=""):  # noqa: ANN001, ANN201
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, mosquitto.url, text_model.package, tmp_path / "state",
                           extra=extra)
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#", "homeassistant/#")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    status = col.wait_for(1, topic_contains=f"{dev}/status", timeout=60)
    assert status and status[-1][1] == b"online", (tmp_path / "agent.log").read_text()
    return cfg, col, proc


def command(col: Collector, dev: str, name: str, payload: bytes | str, n: int = 1) -> dict:
    col.publish(f"edge-slm/{dev}/cmd/{name}", payload)
    got = col.wait_for(n, topic_contains=f"/cmd/{name}/reply", timeout=30)
    assert len(got) >= n, f"no reply to {name}"
    return json.loads(got[n - 1][1])


def test_commands_reply_with_correlation_id_and_bad_ones_get_errors(mosquitto, text_model, tmp_path):
    dev = "ctl-1"
    cfg, col, proc = start(tmp_path, mosquitto, text_model, dev)
    try:
        r = command(col, dev, "ping", '{"id": "c-1"}')
        assert r["id"] == "c-1" and r["ok"] and r["result"]["pong"] and r["result"]["pipelines"] == ["intent"]
        r = command(col, dev, "ping", b"\xff\xfe", 2)
        assert not r["ok"] and r["error"] == "bad_encoding"
        r = command(col, dev, "shutdown", '{"id": 5}')
        assert r["id"] == 5 and r["error"] == "unknown_command"
        # a bad config is refused, naming the key, and nothing changes
        bad = cfg.read_text().replace("[mqtt]", "colour = 'red'\n[mqtt]")
        r = command(col, dev, "config", json.dumps({"id": "k", "args": {"toml": bad}}))
        assert r["ok"] is False and "colour" in r["message"]
        assert "colour" not in cfg.read_text()
        # a config that changes the source needs a restart, and says so
        moved = cfg.read_text().replace('source = "mqtt://"', 'source = "mqtt://elsewhere"')
        r = command(col, dev, "config", json.dumps({"id": "m", "args": {"toml": moved}}), 2)
        assert r["error"] == "restart_required"
        # a valid one is applied: reload with a changed max_input_bytes, and the file is rewritten
        good = cfg.read_text().replace('sinks = ["mqtt"]', 'sinks = ["mqtt"]\nmax_input_bytes = 4000')
        r = command(col, dev, "config", json.dumps({"id": "g", "args": {"toml": good}}), 3)
        assert r["ok"], r
        assert "max_input_bytes = 4000" in cfg.read_text()
        r = command(col, dev, "reload", '{"id": "r"}')
        assert r["ok"] and r["result"]["reloaded"] == ["intent"]
        # and the agent still serves
        col.publish(f"edge-slm/{dev}/intent/input", "turn on the kitchen lights")
        assert col.wait_for(1, topic_contains="/intent/result", timeout=30)
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()


def test_home_assistant_discovery_and_rediscovery(mosquitto, text_model, tmp_path):
    dev = "ha-1"
    cfg, col, proc = start(tmp_path, mosquitto, text_model, dev)
    topic = "homeassistant/sensor/edge_slm_ha-1/intent/config"
    try:
        first = col.wait_for(1, topic_contains=topic, timeout=30)
        assert first
        config = json.loads(first[0][1])
        assert config["state_topic"] == f"edge-slm/{dev}/intent/result"
        assert config["availability_topic"] == f"edge-slm/{dev}/status"
        col.publish("homeassistant/status", "online")
        assert len(col.wait_for(2, topic_contains=topic, timeout=30)) >= 2, "configs re-published after HA restart"
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()


def test_metrics_are_published_and_status_reads_them(mosquitto, text_model, tmp_path):
    dev = "met-1"
    cfg, col, proc = start(tmp_path, mosquitto, text_model, dev, extra="metrics_interval_s = 0.5")
    try:
        for i in range(5):
            col.publish(f"edge-slm/{dev}/intent/input", f"lock the back door {i}")
        col.wait_for(5, topic_contains="/intent/result", timeout=30)
        time.sleep(1.2)
        m = json.loads([p for t, p, _ in col.messages if t.endswith("/metrics")][-1])
        assert m["inferences"] == 5 and m["pipelines"]["intent"]["latency_ms_p50"] > 0
        assert m["rss_bytes"] > 10_000_000 and "outbox" in m and m["reconnects"] == 0
        res = run_cli("status", dev, "--broker", mosquitto.url, "--json", timeout=60)
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["status"] == "online" and info["metrics"]["inferences"] == 5
        table = run_cli("status", dev, "--broker", mosquitto.url, timeout=60)
        assert b"online" in table.stdout and b"intent" in table.stdout
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()
    assert run_cli("status", "no-such-device", "--broker", mosquitto.url, "--timeout", "1").returncode == 1


def test_failover_to_the_second_broker(mosquitto, text_model, tmp_path):
    dead = f"mqtt://127.0.0.1:{free_port()}"
    dev = "fo-1"
    cfg = write_agent_toml(tmp_path / "agent.toml", dev, dead, text_model.package, tmp_path / "state")
    cfg.write_text(cfg.read_text().replace("[mqtt]\n", f'[mqtt]\nfallback_brokers = ["{mosquitto.url}"]\n'))
    col = Collector(mosquitto.url, f"edge-slm/{dev}/#")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    try:
        assert col.wait_for(1, topic_contains="/status", timeout=60)[-1][1] == b"online"
        col.publish(f"edge-slm/{dev}/intent/input", "open the blinds in the office")
        assert col.wait_for(1, topic_contains="/result", timeout=30)
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()


def test_signed_update_through_the_agent(mosquitto, text_model, tmp_path):
    keys = tmp_path / "keys"
    assert run_cli("keygen", "-o", str(keys)).returncode == 0
    dev = "upd-1"
    cfg, col, proc = start(tmp_path, mosquitto, text_model, dev,
                           extra=f'update_public_key = "{keys / "update_key.pub"}"\nupdate_trial_s = 1')
    try:
        pkg2 = tmp_path / "pkg2"
        shutil.copytree(text_model.package, pkg2)
        manifest = json.loads((pkg2 / "manifest.json").read_text())
        manifest["version"] = "2.0.0"
        (pkg2 / "manifest.json").write_text(json.dumps(manifest))
        res = run_cli("publish-model", str(pkg2), "--device", dev, "--key", str(keys / "update_key.pem"),
                      "--broker", mosquitto.url, "--json", "--timeout", "60", timeout=120)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
        col.publish(f"edge-slm/{dev}/intent/input", "set a timer for 5 minutes")
        got = col.wait_for(1, topic_contains="/intent/result", timeout=30)
        assert json.loads(got[-1][1])["model"]["version"] == "2.0.0"
        time.sleep(1.5)  # the trial ends and 2.0.0 is committed
        # the same version again is refused and the agent keeps serving 2.0.0
        res = run_cli("publish-model", str(pkg2), "--device", dev, "--key", str(keys / "update_key.pem"),
                      "--broker", mosquitto.url, "--json", "--timeout", "60", timeout=120)
        assert res.returncode == 1 and b"not_newer" in res.stdout + res.stderr
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()


def test_an_agent_killed_during_the_trial_comes_back_on_the_old_model(mosquitto, text_model, tmp_path):
    import signal

    keys = tmp_path / "keys"
    assert run_cli("keygen", "-o", str(keys)).returncode == 0
    dev = "upd-2"
    cfg, col, proc = start(tmp_path, mosquitto, text_model, dev,
                           extra=f'update_public_key = "{keys / "update_key.pub"}"\nupdate_trial_s = 600')
    try:
        pkg2 = tmp_path / "pkg2"
        shutil.copytree(text_model.package, pkg2)
        manifest = json.loads((pkg2 / "manifest.json").read_text())
        manifest["version"] = "3.0.0"
        (pkg2 / "manifest.json").write_text(json.dumps(manifest))
        res = run_cli("publish-model", str(pkg2), "--device", dev, "--key", str(keys / "update_key.pem"),
                      "--broker", mosquitto.url, "--json", "--timeout", "60", timeout=120)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
        proc.send_signal(signal.SIGKILL)  # dies while 3.0.0 is on trial
        proc.wait(10)
        proc = start_agent_process(cfg, tmp_path / "agent2.log")
        assert col.wait_for(3, topic_contains=f"{dev}/status", timeout=60)[-1][1] == b"online"
        col.publish(f"edge-slm/{dev}/intent/input", "set a timer for 5 minutes")
        got = col.wait_for(1, topic_contains="/intent/result", timeout=30)
        assert json.loads(got[-1][1])["model"]["version"] == json.loads(
            (text_model.package / "manifest.json").read_text())["version"]
    finally:
        proc.terminate()
        proc.wait(30)
        col.close()
