"""Sensor pipelines in the agent: vibration samples in over MQTT, anomaly flags and fault labels out, over mosquitto."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import Collector, start_agent_process

CHUNK_S = 0.25


def agent_toml(tmp_path, broker: str, anomaly_package, fault_package) -> object:  # noqa: ANN001
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "press-7"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{broker}"\n'
        f'[[pipelines]]\nname = "vibration"\nmodel = "{anomaly_package}"\nmax_input_bytes = 1000000\n'
        f'[[pipelines]]\nname = "faults"\nmodel = "{fault_package}"\nmax_input_bytes = 1000000\n'
        '[pipelines.stream]\nhop = 0\n')
    return cfg


def chunks(rec, stream: str, seconds: float = 2.0):  # noqa: ANN001, ANN201
    """JSON payloads of CHUNK_S seconds each; NaN (a dropout) goes out as null."""
    step = int(rec.sample_rate * CHUNK_S)
    n = int(rec.sample_rate * seconds)
    for i in range(0, n, step):
        rows = rec.samples[i:i + step].astype(float)
        samples = [[None if np.isnan(v) else round(float(v), 5) for v in row] for row in rows]
        yield json.dumps({"id": f"{stream}-{i}", "stream": stream, "sample_rate": rec.sample_rate,
                          "channels": list(rec.channels), "t0": i / rec.sample_rate, "samples": samples})


def test_vibration_over_mqtt_flags_faulty_machines_and_reports_dropouts(
        vibration_dataset, anomaly_package, fault_package, mosquitto, tmp_path):  # noqa: ANN001
    test_recs = vibration_dataset.test_recordings()
    healthy = next(r for r in test_recs if r.condition == "normal" and not np.isnan(r.samples).any())
    faulty = next(r for r in test_recs if r.condition == "bearing_outer" and not np.isnan(r.samples).any())
    channels = list(json.loads((anomaly_package / "manifest.json").read_text())["preprocessing"]["features"]["channels"])
    assert list(healthy.channels)[: len(channels)] == channels

    proc = start_agent_process(agent_toml(tmp_path, mosquitto.url, anomaly_package, fault_package), tmp_path / "agent.log")
    col = Collector(mosquitto.url, "edge-slm/press-7/#")
    try:
        assert col.wait_for(1, topic_contains="status"), (tmp_path / "agent.log").read_text()
        for pipeline in ("vibration", "faults"):
            for rec, stream in ((healthy, "healthy"), (faulty, "faulty")):
                for payload in chunks(rec, stream):
                    col.publish(f"edge-slm/press-7/{pipeline}/input", payload)
        # a dropout in the middle of a window: reported, never passed to the model
        broken = healthy.samples[: int(healthy.sample_rate * 0.5)].copy()
        broken[300:340, 1] = np.nan
        rec_broken = type(healthy)(broken, healthy.sample_rate, healthy.channels, healthy.machine, "normal", 0.0)
        for payload in chunks(rec_broken, "dropout", seconds=0.5):
            col.publish("edge-slm/press-7/vibration/input", payload)
        col.publish("edge-slm/press-7/vibration/input", '{"samples": [[1, 2]]}')  # wrong channel count

        windows = json.loads((anomaly_package / "manifest.json").read_text())["preprocessing"]
        window, hop = windows["features"]["window"], windows.get("hop", windows["features"]["window"] // 2)
        per_stream = (int(healthy.sample_rate * 2.0) - window) // hop + 1
        col.wait_for(4 * per_stream, topic_contains="/result", timeout=60)
        col.wait_for(2, topic_contains="/error", timeout=30)
    finally:
        col.close()
        proc.terminate()
        proc.wait(20)

    results = col.json("/result")
    anomaly = [r for r in results if r["pipeline"] == "vibration"]
    faults = [r for r in results if r["pipeline"] == "faults"]
    by_stream = {s: [r["output"] for r in anomaly if r["input_id"].startswith(s)] for s in ("healthy", "faulty")}
    assert len(by_stream["healthy"]) == len(by_stream["faulty"]) == per_stream
    # the bearing fault stands out; the healthy machine mostly does not
    assert np.mean([o["anomaly"] for o in by_stream["faulty"]]) >= 0.8
    assert np.mean([o["anomaly"] for o in by_stream["healthy"]]) <= 0.2
    assert all(o["t_end"] > o["t_start"] for o in by_stream["faulty"])
    labels = [r["output"]["label"] for r in faults if r["input_id"].startswith("faulty")]
    assert len(labels) == per_stream and labels.count("bearing_outer") / len(labels) >= 0.8
    errors = col.json("/error")
    missing = [e for e in errors if e["error"] == "missing_samples"]
    assert missing and all(e["pipeline"] == "vibration" for e in missing)
    assert any("ay" in e["message"] or channels[1] in e["message"] for e in missing)
    assert any(e["error"] == "bad_request" and "channels" in e["message"] for e in errors)
    seqs = sorted(r["seq"] for r in results + errors)
    assert len(set(seqs)) == len(seqs)
