"""Keyword spotting in the agent: a WAV file, MQTT audio chunks and a virtual microcontroller's microphone,
each with real espeak-ng speech from voices the model never heard, results over mosquitto or stdout."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import wave

import numpy as np

from tests.conftest import Collector, run_cli, start_agent_process
from tests.fixtures_voice import score_detections


def read_pcm16(path) -> tuple[np.ndarray, int]:  # noqa: ANN001
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").copy(), w.getframerate()


def test_wav_file_through_the_cli_reports_each_command_with_its_time(kws_package, tmp_path):
    # the same recording at 44.1 kHz: the source resamples it to the model's 16 kHz
    rec44 = tmp_path / "rec44.wav"
    subprocess.run(["sox", str(kws_package.recording), "-r", "44100", str(rec44)], check=True, timeout=120)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "kitchen"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[[pipelines]]\nname = "voice"\nmodel = "{kws_package.package}"\n'
                   f'source = "wav://{rec44}?block_ms=40"\nsinks = ["stdout"]\n')
    res = run_cli("run", str(cfg), timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    records = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert records and all("error" not in r for r in records), records[:3]
    detections = [r["output"] for r in records]
    score = score_detections(detections, kws_package.events)
    assert score["recall"] >= 0.8 and score["precision"] >= 0.8, (score["missed"], score["false_alarms"])
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert all(r["input_id"].startswith("rec44.wav@") for r in records)


def test_audio_chunks_and_wav_clips_over_mqtt(kws_package, mosquitto, tmp_path):
    pcm, rate = read_pcm16(kws_package.recording)
    assert rate == 16000
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "hall"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{mosquitto.url}"\n'
                   f'[[pipelines]]\nname = "voice"\nmodel = "{kws_package.package}"\n')
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    col = Collector(mosquitto.url, "edge-slm/hall/#")
    topic = "edge-slm/hall/voice/input"
    try:
        assert col.wait_for(1, topic_contains="status"), (tmp_path / "agent.log").read_text()
        # 20 s of the recording as raw PCM16 chunks of 100 ms: one continuous stream on the topic
        step = 1600
        for i in range(0, 20 * 16000, step):
            col.publish(topic, pcm[i:i + step].tobytes())
        # one spoken command as a whole WAV file: classified on its own
        first = kws_package.commands[0]
        clip = pcm[int(first.t_start * 16000) - 1600: int(first.t_end * 16000) + 1600]
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(clip.tobytes())
        col.publish(topic, json.dumps({"id": "bad-b64", "pcm16": "***"}))
        col.publish(topic, buf.getvalue())
        # a JSON chunk of another stream at 8 kHz
        col.publish(topic, json.dumps({"id": "tiny", "stream": "door", "sample_rate": 8000,
                                       "pcm16": base64.b64encode(pcm[:800].tobytes()).decode()}))
        col.wait_for(1, topic_contains="/error", timeout=30)
        expected = [e for e in kws_package.commands if e.t_end < 19.0]
        col.wait_for(len(expected), topic_contains="/result", timeout=90)
        # the clip's answer comes after the stream's results: wait until a result has "top"
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("top" in r["output"] for r in col.json("/result")):
            time.sleep(0.2)
    finally:
        col.close()
        proc.terminate()
        proc.wait(20)
    results = col.json("/result")
    stream = [r["output"] for r in results if "top" not in r["output"]]
    score = score_detections(stream, [e for e in kws_package.events if e.t_end < 19.0])
    assert score["recall"] >= 0.8 and score["precision"] >= 0.8, (score["missed"], score["false_alarms"])
    one_shot = [r for r in results if "top" in r["output"]]
    assert len(one_shot) == 1 and one_shot[0]["output"]["label"] == first.label
    errors = col.json("/error")
    assert [e["error"] for e in errors] == ["bad_audio"] and errors[0]["input_id"] == "bad-b64"


def test_microphone_of_a_virtual_mcu_over_serial(kws_package, virtual_mcu, mosquitto, tmp_path):
    tty = tmp_path / "ttyMIC"
    # the MCU plays the held-out recording as its microphone, in real time, PCM16 chunks of 256 samples
    virtual_mcu("--audio", str(kws_package.recording), "--audio-rate", "16000", "--speed", "2", link=tty)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "porch"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nbroker = "{mosquitto.url}"\n'
                   f'[[pipelines]]\nname = "voice"\nmodel = "{kws_package.package}"\n'
                   f'source = "serial://{tty}?hello_timeout_s=10"\n')
    col = Collector(mosquitto.url, "edge-slm/porch/#")
    proc = start_agent_process(cfg, tmp_path / "agent.log")
    try:
        expected = [e for e in kws_package.commands if e.t_end < 25.0]
        col.wait_for(len(expected), topic_contains="/result", timeout=60)
    finally:
        col.close()
        proc.terminate()
        proc.wait(20)
    results = col.json("/result")
    assert results, (tmp_path / "agent.log").read_text()[-3000:]
    detections = [r["output"] for r in results]
    # device time starts when the MCU began streaming, not at 0 of the file: find the offset that
    # lines detections up with the spoken commands best, then score as for a file
    events = [e for e in kws_package.events if e.t_end < 25.0]
    offsets = {round(d["t"] - e.t_end, 2) for d in detections for e in expected if e.label == d["keyword"]}
    best = max((score_detections([d | {"t": d["t"] - off} for d in detections], events) for off in offsets),
               key=lambda s: (s["recall"], s["precision"]))
    in_window = len(best["matched"]) + len(best["false_alarms"])
    assert best["recall"] >= 0.8 and len(best["matched"]) / max(in_window, 1) >= 0.8, (best["missed"], best["false_alarms"])
