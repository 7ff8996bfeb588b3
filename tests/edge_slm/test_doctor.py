"""`edge-slm doctor`: real runtime, real package, a real broker (reachable and not), JSON and exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from edge_slm.doctor import FAIL, OK, add_cli, check_broker, format_checks, run_checks
from tests.conftest import free_port, write_agent_toml


def by_name(checks, prefix: str):  # noqa: ANN001, ANN201
    found = [c for c in checks if c.name.startswith(prefix)]
    assert found, f"no check named {prefix}*: {[c.name for c in checks]}"
    return found


def test_reachable_broker_and_a_package_pass(mosquitto, text_model):  # noqa: ANN001
    checks = run_checks(broker=mosquitto.url, packages=[str(text_model.package)])
    assert by_name(checks, "python")[0].status == OK
    rt = by_name(checks, "tflite runtime")[0]
    assert rt.status == OK and rt.detail.startswith("ai-edge-litert 2.3.0")
    model, ops = by_name(checks, "model intents")[:2]
    assert model.status == OK and "sha256 ok" in model.detail and "ai-edge-litert" in model.detail
    assert ops.status == OK and "FULLY_CONNECTED v" in ops.detail
    assert by_name(checks, "broker")[0].status == OK and "CONNACK" in by_name(checks, "broker")[0].detail
    assert not [c for c in checks if c.status == FAIL], format_checks(checks)


def test_closed_port_fails_with_a_fix():
    c = check_broker(f"mqtt://127.0.0.1:{free_port()}", timeout=2)
    assert c.status == FAIL and "TCP connect" in c.detail and "start the broker" in c.fix


def test_a_port_that_is_not_mqtt_fails_without_hanging():
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts TCP, never answers CONNECT
    try:
        c = check_broker(f"mqtt://127.0.0.1:{srv.getsockname()[1]}", timeout=1)
    finally:
        srv.close()
    assert c.status == FAIL and "no CONNACK" in c.detail


def test_corrupt_package_fails(package_copy):  # noqa: ANN001
    model = package_copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    checks = run_checks(packages=[str(package_copy)])
    bad = by_name(checks, "model pkg")[0]
    assert bad.status == FAIL and "sha256" in bad.detail and bad.fix


def test_config_drives_models_broker_serial_and_disk(mosquitto, text_model, tmp_path):  # noqa: ANN001
    cfg = write_agent_toml(tmp_path / "agent.toml", "doctor-dev", mosquitto.url, text_model.package, tmp_path / "state",
                           source="serial:///dev/ttyNOPE0?baud=115200")
    checks = run_checks(cfg)
    assert by_name(checks, "config")[0].status == OK
    assert by_name(checks, "model intents")[0].status == OK
    assert by_name(checks, "broker")[0].status == OK
    missing = by_name(checks, "serial /dev/ttyNOPE0")[0]
    assert missing.status == FAIL and "plug the board in" in missing.fix
    disk = by_name(checks, "disk")[0]
    assert disk.status == OK and "MiB free" in disk.detail


def test_broken_config_is_a_failed_check_not_a_crash(tmp_path):  # noqa: ANN001
    bad = tmp_path / "agent.toml"
    bad.write_text('device_id = "x"\nbogus_key = 1\n')
    checks = run_checks(bad)
    c = by_name(checks, "config")[0]
    assert c.status == FAIL and ("bogus_key" in c.detail or "pipelines" in c.detail)


def test_cli_json_parses_and_exit_codes_follow_failures(mosquitto, text_model, capsys):  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="edge-slm")
    add_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["doctor", "--help"])
    assert "examples:" in capsys.readouterr().out
    ok_args = parser.parse_args(["doctor", "--broker", mosquitto.url, "--package", str(text_model.package), "--json"])
    assert ok_args.func(ok_args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and {c["status"] for c in out["checks"]} <= {"ok", "warn"}
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in out["checks"])
    bad_args = parser.parse_args(["doctor", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--timeout", "1"])
    assert bad_args.func(bad_args) == 1
    table = capsys.readouterr().out
    assert "FAIL" in table and "start the broker" in table and "1 failed" in table


def test_doctor_never_imports_tensorflow_or_host_packages(text_model):  # noqa: ANN001
    code = ("import sys, edge_slm.doctor as d; d.run_checks(packages=[sys.argv[1]]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'converters', 'devices', 'keras')]; "
            "print(bad[:5]); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code, str(text_model.package)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
