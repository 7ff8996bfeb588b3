"""serial:// in the agent: a virtual microcontroller (real C on a real pty) streams an IMU into the
vibration models; results and missing-sample reports arrive over mosquitto, through corruption and a replug."""

from __future__ import annotations

import json
import time

from tests.conftest import Collector, start_agent_process


def test_imu_over_a_noisy_serial_line_reaches_the_broker_and_survives_a_replug(
        virtual_mcu, anomaly_package, mosquitto, tmp_path):  # noqa: ANN001
    tty = tmp_path / "ttyIMU"
    # 3200 Hz like the model; a 30 Hz vibration with a strong 3x fault harmonic; a few frames damaged (1% per byte would hit nearly every 800-byte frame)
    args = ("--imu-rate", "3200", "--imu-block", "64", "--fault-amp", "0.8", "--corrupt", "0.00002", "--seed", "7")
    mcu = virtual_mcu(*args, link=tty)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "mill-3"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{mosquitto.url}"\n'
        f'[[pipelines]]\nname = "vibration"\nmodel = "{anomaly_package}"\nsource = "serial://{tty}?hello_timeout_s=10"\n')
    col = Collector(mosquitto.url, "edge-slm/mill-3/#")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    try:
        first = col.wait_for(20, topic_contains="/result", timeout=60)
        assert len(first) >= 20, (tmp_path / "agent.log").read_text()
        # unplug: the device vanishes mid-stream; plug a new one in at the same path
        mcu.kill()
        time.sleep(1.0)
        n_before = len(col.json("/result"))
        virtual_mcu(*args[:-1], "8", link=tty)
        col.wait_for(n_before + 20, topic_contains="/result", timeout=60)
        errors = col.wait_for(1, topic_contains="/error", timeout=30)
    finally:
        col.close()
        proc.terminate()
        proc.wait(20)
    log = (tmp_path / "agent.log").read_text()
    assert proc.returncode == 0, log
    results = col.json("/result")
    assert len(results) >= n_before + 20, log
    outputs = [r["output"] for r in results]
    assert all(0.0 <= o["score"] <= 1.0 and isinstance(o["anomaly"], bool) for o in outputs)
    # windows advance in device time within each stream; the replug starts a new stream at its own t0
    ids = [r["input_id"].rsplit("@", 1)[0] for r in results]
    streams = list(dict.fromkeys(ids))
    assert len(streams) >= 2, ids
    for s in streams:
        starts = [r["output"]["t_start"] for r, i in zip(results, ids) if i == s]
        assert starts == sorted(starts)
    # damaged frames became NaN rows, and windows holding them were reported, not run
    missing = [json.loads(p) for t, p, _ in col.messages if t.endswith("/error")]
    assert errors and any(e["error"] == "missing_samples" for e in missing), missing
    assert all(e["pipeline"] == "vibration" for e in missing)
    seqs = [r["seq"] for r in results] + [e["seq"] for e in missing]
    assert len(seqs) == len(set(seqs))
