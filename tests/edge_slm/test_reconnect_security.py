"""Fleet reconnects spread by jitter; TLS with client certificates and an ACL between devices."""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np

from edge_slm.mqtt import MqttLink, Topics
from tests.conftest import (
    Collector,
    free_port,
    mosquitto_binary,
    start_agent_process,
    wait_port,
    write_agent_toml,
)


def test_300_clients_reconnect_spread_over_the_backoff_window(own_mosquitto):
    links, times = [], []
    lock = threading.Lock()
    try:
        for i in range(300):
            link = MqttLink(own_mosquitto.url, f"fleet-{i}", Topics("edge-slm", f"fleet-{i}"), protocol="3.1.1",
                            reconnect_min_s=2.0, reconnect_max_s=4.0)
            link.connect(timeout=10)
            links.append(link)
        own_mosquitto.stop()
        time.sleep(0.5)
        restarted = [0.0]
        for link in links:
            original = link.client.on_connect

            def hook(c, u, f, rc, p, original=original):  # noqa: ANN001
                with lock:
                    times.append(time.monotonic() - restarted[0])
                original(c, u, f, rc, p)

            link.client.on_connect = hook
        restarted[0] = time.monotonic()
        own_mosquitto.start()
        deadline = time.monotonic() + 30
        while len(times) < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(times) == 300, f"only {len(times)} of 300 reconnected"
        t = np.sort(np.asarray(times))
        # not one instant: spread over seconds, and no 100 ms slot holds more than a fifth of the fleet
        assert t[-1] - t[0] > 1.0, (t[0], t[-1])
        hist, _ = np.histogram(t, bins=np.arange(0, t[-1] + 0.1, 0.1))
        assert hist.max() < 60, hist.max()
        assert all(link.reconnects == 1 for link in links)
    finally:
        for link in links:
            link.close(timeout=0.5)


def test_tls_client_certificates_and_acl_between_devices(tmp_path, text_model):
    from tests.tls_support import make_pki, secure_mosquitto_conf

    if mosquitto_binary() is None:
        raise AssertionError("mosquitto is required")
    pki = make_pki(tmp_path / "pki", ["devA", "devB"])
    tmp_path.chmod(0o755)
    (tmp_path / "pki").chmod(0o755)
    tls_port, pw_port = free_port(), free_port()
    conf = secure_mosquitto_conf(tmp_path / "pki", tls_port, pw_port, pki, {"admin": "adminpw", "devB": "bpw"})
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(tls_port)
        wait_port(pw_port)
        watcher = Collector(f"mqtt://127.0.0.1:{pw_port}", "edge-slm/#", username="admin", password="adminpw")
        cert, key = pki.clients["devA"]
        cfg = write_agent_toml(tmp_path / "agent.toml", "devA", f"mqtts://127.0.0.1:{tls_port}", text_model.package,
                               tmp_path / "state")
        cfg.write_text(cfg.read_text().replace(
            "[mqtt]\n", f'[mqtt]\nca_file = "{pki.ca}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'))
        proc = start_agent_process(cfg, tmp_path / "agent.log")
        try:
            assert watcher.wait_for(1, topic_contains="devA/status", timeout=60), (tmp_path / "agent.log").read_text()
            # devA may not publish into devB's topics: the broker drops it, the watcher never sees it
            from tests.conftest import Collector as C

            intruder = C(f"mqtts://127.0.0.1:{tls_port}", "edge-slm/devA/#", tls=(pki.ca, cert, key),
                         client_id="devA-intruder")
            intruder.publish("edge-slm/devA/intent/input", "turn on the kitchen lights")
            assert watcher.wait_for(1, topic_contains="devA/intent/result", timeout=30)
            # the broker drops the forged publish (or disconnects the client): either way nobody sees it
            info = intruder.client.publish("edge-slm/devB/intent/result", '{"forged": true}', qos=1)
            try:
                info.wait_for_publish(5)
            except RuntimeError:
                pass
            time.sleep(1.0)
            assert not [m for m in watcher.messages if m[0].startswith("edge-slm/devB/")]
            intruder.close()
            # a password client works on the other listener; a wrong password is refused
            ok = C(f"mqtt://127.0.0.1:{pw_port}", "edge-slm/devB/#", username="devB", password="bpw")
            ok.close()
            try:
                C(f"mqtt://127.0.0.1:{pw_port}", "edge-slm/devB/#", username="devB", password="wrong")
                raise AssertionError("a wrong password was accepted")
            except AssertionError as exc:
                assert "could not subscribe" in str(exc) or "refused" in str(exc)
        finally:
            proc.terminate()
            proc.wait(30)
            watcher.close()
    finally:
        broker.terminate()
        broker.wait(10)
