"""`edge-slm demo`: train an intent model, convert it with auto, serve it on 3 simulated devices.

Host only: uses converters (TensorFlow) to train and convert, devices.broker for the embedded broker,
and real edge_slm agents talking to it over MQTT.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from converters.cli import attempts_table
from converters.convert import convert_model
from converters.datasets.smart_home import LABELS, generate
from converters.text_classifier import train_text_classifier
from converters.tf_env import console, silenced
from devices.broker import EmbeddedBroker
from edge_slm.agent import Agent
from edge_slm.config import AgentConfig, MqttConfig, PipelineConfig
from edge_slm.errors import EdgeSlmError
from edge_slm.mqtt import parse_broker_url
from edge_slm.table import format_table


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=console(), flush=True)


def build_model(workdir: Path, epochs: int, quiet: bool) -> dict[str, Any]:
    """Dataset -> trained Keras model -> validated package. Returns paths and the held-out split."""
    train, test = generate()
    _say(f"[1/4] dataset: {len(LABELS)} intents, {len(train.texts)} training and {len(test.texts)} held-out utterances", quiet)
    t0 = time.monotonic()
    with silenced():
        model_path, tok_path, encoder = train_text_classifier(
            train.texts, train.labels, len(LABELS), workdir / "train", epochs=epochs)
    _say(f"[2/4] trained a 1-layer transformer for {epochs} epochs in {time.monotonic() - t0:.0f}s", quiet)
    calib = workdir / "calib.npz"
    rng = np.random.default_rng(0)
    idx = rng.choice(len(train.texts), size=min(300, len(train.texts)), replace=False)
    np.savez(calib, x=encoder.encode_batch([train.texts[i] for i in idx]))
    eval_npz = workdir / "eval.npz"
    np.savez(eval_npz, x=encoder.encode_batch(test.texts), y=np.asarray(test.labels, dtype=np.int32))
    (workdir / "labels.txt").write_text("\n".join(LABELS) + "\n")
    _say("[3/4] converting with --quantize auto (each recipe is validated against the float model)", quiet)
    result = convert_model(
        model_path, workdir / "intent-pkg", calib=calib, eval_data=eval_npz, quantize="auto",
        tokenizer=tok_path, labels=LABELS, name="smart-home-intents", version="1.0.0", progress=not quiet,
        say=lambda m: _say("      " + m, quiet),
    )
    return {"result": result, "test": test}


def summary_table(result) -> tuple[str, dict[str, Any]]:  # noqa: ANN001
    base, chosen = result.baseline, next(a for a in result.attempts if a.recipe == result.chosen)
    rows, data = [], {}
    for label, a in (("float32 (reference)", base), (f"{chosen.recipe} (chosen)", chosen)):
        r = a.report
        row = {"model": label, "size_kib": round(a.size_bytes / 1024, 1), "accuracy": r.get("accuracy_quantized"),
               "agreement": r.get("top1_agreement"), "latency_ms": round(a.latency_ms, 4)}
        data[a.recipe] = row
        rows.append(list(row.values()))
    return format_table(["model", "KiB", "held-out accuracy", "agreement", "invoke ms"], rows), data


class ResultWatcher:
    """Subscribes to every device's results and errors and collects them as they arrive."""

    def __init__(self, broker_url: str, prefix: str, on_record) -> None:  # noqa: ANN001
        addr = parse_broker_url(broker_url)
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._on_record = on_record
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-slm-demo-watch-{random.randrange(1 << 30)}")
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(f"{prefix}/+/+/result", qos=1),
                                                         c.subscribe(f"{prefix}/+/+/error", qos=1))
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._ready.set()
        self.client.on_message = self._message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise EdgeSlmError(f"could not subscribe on {broker_url}")

    def _message(self, client, userdata, msg) -> None:  # noqa: ANN001
        rec = json.loads(msg.payload)
        rec["_topic"] = msg.topic
        with self._lock:
            self.records.append(rec)
        self._on_record(rec)

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_devices(pkg: Path, broker_url: str, workdir: Path, test, n_devices: int, n_messages: int, quiet: bool,  # noqa: ANN001
                protocol: str = "5") -> dict[str, Any]:
    agents = []
    for i in range(n_devices):
        cfg = AgentConfig(
            device_id=f"demo-{i + 1}",
            pipelines=[PipelineConfig(name="intent", model=str(pkg), source="mqtt://")],
            mqtt=MqttConfig(broker=broker_url, client_id=f"edge-slm-demo-{i + 1}-{random.randrange(1 << 30)}",
                            protocol=protocol),
            state_dir=str(workdir / "state"),
        )
        agent = Agent(cfg)
        agent.start()
        agents.append(agent)
    rng = random.Random(7)
    sent: dict[str, tuple[str, str]] = {}
    rows_lock = threading.Lock()

    def show(rec: dict[str, Any]) -> None:
        text, expected = sent.get(rec.get("input_id"), ("?", "?"))
        with rows_lock:
            if "error" in rec:
                _say(f"  {rec['device_id']:<7} seq {rec['seq']:<4} ERROR {rec['error']}: {rec['message']}", quiet)
                return
            out = rec["output"]
            mark = "ok" if out["label"] == expected else f"MISS (expected {expected})"
            _say(f"  {rec['device_id']:<7} seq {rec['seq']:<4} {text[:44]:<44} -> {out['label']:<16} "
                 f"{out['score']:.2f}  {rec['latency_ms']:6.2f} ms  {mark}", quiet)

    watcher = ResultWatcher(broker_url, "edge-slm", show)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-slm-demo-send-{random.randrange(1 << 30)}")
    addr = parse_broker_url(broker_url)
    pub.connect(addr.host, addr.port)
    pub.loop_start()
    try:
        picks = rng.sample(range(len(test.texts)), n_devices * n_messages)
        infos = []
        for k, j in enumerate(picks):
            agent = agents[k % n_devices]
            input_id = f"cmd-{k + 1}"
            sent[input_id] = (test.texts[j], LABELS[test.labels[j]])
            payload = json.dumps({"id": input_id, "text": test.texts[j]})
            infos.append(pub.publish(agent.topics.input("intent"), payload, qos=1))
            time.sleep(0.02)
        for info in infos:
            info.wait_for_publish(10)
        deadline = time.monotonic() + 30
        while watcher.count() < len(picks) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pub.disconnect()
        pub.loop_stop()
        watcher.close()
        for a in agents:
            a.stop()
            a.close()
    results = [r for r in watcher.records if "output" in r]
    correct = sum(1 for r in results if r["output"]["label"] == sent.get(r["input_id"], ("", ""))[1])
    lat = [r["latency_ms"] for r in results]
    return {
        "sent": len(sent), "received": len(watcher.records), "results": len(results),
        "correct": correct, "latency_ms_p50": round(float(np.median(lat)), 3) if lat else None,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    quiet = args.json
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="edge-slm-demo-")
        workdir = Path(tmp.name)
    try:
        built = build_model(workdir, args.epochs, quiet)
        result = built["result"]
        table, sizes = summary_table(result)
        if not quiet:
            print(attempts_table(result.attempts, result.baseline, result.chosen))
            print()
            print(table)
            print(f"\nchosen: {result.reason}")
        broker = None
        url = args.broker
        if not url:
            broker = EmbeddedBroker().start()
            url = broker.url
        _say(f"[4/4] {args.devices} devices on broker {url}{' (embedded amqtt)' if broker else ''}, "
             f"{args.messages} held-out commands each", quiet)
        try:
            # amqtt speaks MQTT 3.1.1 only
            stats = run_devices(result.package.path, url, workdir, built["test"], args.devices, args.messages, quiet,
                                protocol="3.1.1" if broker else "5")
        finally:
            if broker:
                broker.stop()
        stats["seconds"] = round(time.monotonic() - t_start, 1)
        if args.json:
            print(json.dumps({"chosen": result.chosen, "reason": result.reason, "models": sizes,
                              "package": str(result.package.path) if args.workdir else None, **stats}, indent=2))
        else:
            print(f"\n{stats['results']}/{stats['sent']} results received, {stats['correct']} correct, "
                  f"median agent latency {stats['latency_ms_p50']} ms, {stats['seconds']}s in all")
        if stats["received"] < stats["sent"]:
            raise EdgeSlmError(f"only {stats['received']} of {stats['sent']} results arrived")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()
