"""devices.simulator: a fleet of real agent pipelines behind a fault proxy; every result audited by seq."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devices.scenario import scenario_from_dict
from devices.simulator import run_scenario
from tests.conftest import run_cli


def faulty(model: Path, broker: str, duration: float, **extra: object) -> dict:
    return {
        "name": "faults", "duration_s": duration, "seed": 5, "broker": broker, "workers": 2, "drain_s": 30.0,
        "devices": {"model": str(model), "count": 20, "rate": 1.0},
        "faults": [
            {"kind": "broker_outage", "at_s": 3.0, "duration_s": 2.5},
            {"kind": "latency", "at_s": 7.0, "duration_s": 3.0, "latency_ms": 40.0, "jitter_ms": 10.0},
            {"kind": "crash", "at_s": 8.0, "devices": 2, "restart_after_s": 2.0},
        ],
    } | extra


def check_fault_run(report: dict, out: Path) -> None:
    s = report["summary"]
    sim = report["simulator"]
    assert report["verdict"]["reasons"] == [] or sim["passed"], report["verdict"]
    assert sim["passed"] and sim["worker_errors"] == []
    # zero loss at QoS 1 with the outbox: every input the devices took produced exactly one result
    assert s["expected"] >= 20 * 8 and s["lost"] == 0 and s["unexplained_gaps"] == 0
    assert sim["duplicates"] == sim["duplicates_after_crash"]
    for dev, d in report["audit"].items():
        assert d["unique"] == d["expected"] > 0, dev
    # the outage dropped every device that was up; each came back through the proxy
    reconnected = {e["device"] for e in report["events"] if e["kind"] == "reconnect"}
    assert len(reconnected) >= 18 and s["reconnects"] >= 18
    crashed = [e["device"] for e in report["events"] if e["kind"] == "crash"]
    restarted = [e["device"] for e in report["events"] if e["kind"] == "restart"]
    assert len(crashed) == 2 and sorted(crashed) == sorted(restarted)
    # an unclean death leaves the reserved seq block unused: a gap, never a repeat
    assert all(report["audit"][d]["gap_count"] <= 1 for d in crashed)
    assert s["outages"] == 1 and s["crashes"] == 2
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 4 and "<script src" not in html
    assert json.loads((out / "report.json").read_text())["summary"]["expected"] == s["expected"]


def test_fleet_survives_outage_latency_and_crashes_through_mosquitto(mosquitto, text_model, tmp_path) -> None:  # noqa: ANN001
    scenario = scenario_from_dict(faulty(text_model.package, mosquitto.url, 14.0), "test")
    result = run_scenario(scenario, tmp_path / "rep", quiet=True)
    check_fault_run(result.report, tmp_path / "rep")
    assert result.passed
    # end-to-end latency covers the latency window (40 ms each way through the proxy)
    lat = [p for p in result.report["series"]["latency_p50_ms"][8:10] if p is not None]
    assert lat and max(lat) >= 40.0
    assert result.report["scenario"]["proxy"]["outages"] == 1


def test_fleet_on_the_embedded_amqtt_broker_with_shared_network_loop(text_model, tmp_path) -> None:  # noqa: ANN001
    scenario = scenario_from_dict(faulty(text_model.package, "embedded", 12.0, net_loop="shared"), "test")
    assert scenario.mqtt_protocol == "3.1.1"
    result = run_scenario(scenario, tmp_path / "rep", quiet=True)
    check_fault_run(result.report, tmp_path / "rep")


def test_results_stuck_behind_an_outage_at_the_end_fail_the_run(mosquitto, text_model, tmp_path) -> None:  # noqa: ANN001
    scenario = scenario_from_dict({
        "duration_s": 4.0, "broker": mosquitto.url, "drain_s": 0.5, "workers": 1,
        "devices": {"model": str(text_model.package), "count": 3, "rate": 2.0},
        "faults": [{"kind": "broker_outage", "at_s": 2.0, "duration_s": 30.0}]}, "test")
    result = run_scenario(scenario, tmp_path / "rep", quiet=True)
    s = result.report["summary"]
    assert not result.passed
    assert s["lost"] > 0 and s["expected"] > s["lost"]
    assert any("lost" in r for r in result.report["verdict"]["reasons"])


def test_cli_quick_run_and_unknown_key(text_model, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "quick"
    r = run_cli("simulate", "--devices", "3", "--duration", "3", "--model", str(text_model.package), "-o", str(out),
                "--json", timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    report = json.loads(r.stdout)
    assert report["summary"]["devices"] == 3 and report["summary"]["lost"] == 0
    assert (out / "report.html").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text(f'duration_s = 3\nspeed = 2\n[devices]\nmodel = "{text_model.package}"\n')
    r = run_cli("simulate", str(bad))
    assert r.returncode == 1
    assert "unknown key 'speed'" in r.stderr.decode() and str(bad) in r.stderr.decode()


@pytest.mark.parametrize("args", [["simulate"], ["simulate", "--devices", "2"]])
def test_cli_without_scenario_or_model_explains(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 1 and "--model" in r.stderr.decode()


def test_sensor_fleet_with_virtual_mcus_and_serial_noise(mosquitto, anomaly_package, tmp_path) -> None:  # noqa: ANN001
    from tests.fixtures_mcu import require_tool

    require_tool("gcc", "MCU-backed simulated devices run firmware_bridge/c/virtual_mcu.c")
    scenario = scenario_from_dict({
        "name": "sensors", "duration_s": 12.0, "seed": 3, "broker": mosquitto.url, "workers": 1, "drain_s": 30.0,
        "devices": [
            {"model": str(anomaly_package), "kind": "sensor", "count": 2, "rate": 4.0, "faulty": 0.5,
             "pipeline": "vibration", "id_prefix": "gen"},
            {"model": str(anomaly_package), "kind": "sensor", "count": 2, "mcu": True, "pipeline": "vibration",
             "id_prefix": "mcu"},
        ],
        # noise for the whole run, and a noisier window: each MCU is replugged with 1e-4 at 4 s and back at 7 s
        "faults": [{"kind": "serial_noise", "corrupt": 2e-5},
                   {"kind": "serial_noise", "corrupt": 1e-4, "at_s": 4.0, "duration_s": 3.0}],
    }, "test")
    out = tmp_path / "rep"
    result = run_scenario(scenario, out, quiet=True)
    report, sim = result.report, result.report["simulator"]
    assert sim["worker_errors"] == [] and result.passed, (report["verdict"], sim["worker_errors"])
    assert report["summary"]["lost"] == 0 and report["summary"]["unexplained_gaps"] == 0
    assert set(report["audit"]) == {"gen-001", "gen-002", "mcu-001", "mcu-002"}
    for dev, d in report["audit"].items():
        assert d["unique"] == d["expected"] > 0, dev
    # every device produced anomaly outputs, MCU-backed or generated
    results: dict[str, int] = {}
    for dev, d in report["audit"].items():
        results[dev] = d["expected"] - sum(sim["device_error_codes"].get(dev, {}).values())
        assert results[dev] > 0, dev
    # lost serial frames became NaN samples -> missing_samples error records, delivered and audited
    for dev in ("mcu-001", "mcu-002"):
        codes = sim["device_error_codes"].get(dev, {})
        assert codes.get("missing_samples", 0) > 0, (dev, codes)
        assert sim["mcu"][dev], dev
    assert sim["error_codes"].get("missing_samples", 0) == sim["error_codes_received"].get("missing_samples", 0)
    assert not any(sim["device_error_codes"].get(d) for d in ("gen-001", "gen-002"))
    assert sorted(sim["sensor_conditions"][d] == "normal" for d in ("gen-001", "gen-002")) == [False, True]
    replugs = [(e["device"], e["corrupt"]) for e in report["events"] if e["kind"] == "replug"]
    assert sorted(replugs) == [("mcu-001", 2e-5), ("mcu-001", 1e-4), ("mcu-002", 2e-5), ("mcu-002", 1e-4)]
    assert not [e for e in report["events"] if e["kind"] == "replug_failed"]
    assert all(c.get("link_reopens", 0) >= 1 for c in sim["mcu"].values()), sim["mcu"]
    assert (out / "report.html").exists() and (out / "virtual_mcu").exists()
    assert json.loads((out / "report.json").read_text())["simulator"]["serial_corrupt"] == 2e-5
