"""`edge-slm demo` end to end: train, convert with auto, serve 3 devices, every result arrives."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def check_summary(out: dict, devices: int, messages: int) -> None:
    assert out["sent"] == devices * messages
    assert out["received"] == out["sent"] and out["results"] == out["sent"]
    assert out["chosen"] in ("int8", "int8-float-attention", "dynamic")
    f32, chosen = out["models"]["float32"], out["models"][out["chosen"]]
    assert chosen["size_kib"] < f32["size_kib"] / 2
    assert chosen["agreement"] >= 0.99
    assert chosen["accuracy"] > 0.5, "an intent model far better than chance (1/14) on held-out utterances"


def test_demo_with_embedded_amqtt_broker(tmp_path):
    res = run_cli("demo", "--json", "--epochs", "4", "--messages", "4", "--workdir", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    out = json.loads(res.stdout)
    check_summary(out, 3, 4)
    manifest = json.loads((tmp_path / "intent-pkg" / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"] == out["chosen"]


def test_demo_against_an_external_mosquitto(mosquitto, tmp_path):
    res = run_cli("demo", "--json", "--epochs", "3", "--devices", "2", "--messages", "3", "--broker", mosquitto.url,
                  timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    check_summary(json.loads(res.stdout), 2, 3)


def test_demo_with_unreachable_broker_fails_with_one_line(tmp_path):
    from tests.conftest import free_port

    res = run_cli("demo", "--epochs", "1", "--broker", f"mqtt://127.0.0.1:{free_port()}", timeout=300)
    assert res.returncode == 1
    assert "cannot reach broker" in res.stderr.decode().strip().splitlines()[-1]
