"""Durable outbox benchmark: results/s through one agent with the outbox off vs on (sync normal, full),
and what durability costs per message (µs to store a record, µs to delete it on its PUBACK).

Host script. The agent runs as `edge-slm run` in a subprocess against a mosquitto this script starts
(set_tcp_nodelay true); inputs come from a file:// source, so input delivery is not what is measured.
Modes run interleaved round by round, so drift on the machine hits all of them alike.

    .venv/bin/python benchmarks/bench_outbox.py [--messages 5000] [--rounds 3] [--package DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, which puts the repo root on sys.path

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    edge_slm_command,
    loadavg,
    machine,
    mosquitto_binary,
    mqtt_subscriber,
    package_version,
    say,
    start_mosquitto,
    work_dir,
)

from devices.broker import free_port  # noqa: E402
from edge_slm.mqtt import Topics  # noqa: E402
from edge_slm.outbox import Outbox  # noqa: E402
from edge_slm.table import format_table  # noqa: E402

PIPELINE = "intent"
MODES = [("off", "outbox off (paho memory only)"), ("normal", "outbox on, sync=normal"),
         ("full", "outbox on, sync=full")]


# --- machine ---------------------------------------------------------------------------------------
def filesystem_of(path: Path) -> str:
    """The mount (device and type) that holds path: fsync cost depends on it more than on the CPU."""
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    except OSError:
        pass
    return f"{best[1]} on {best[0]} ({best[2]})"


def mosquitto_version() -> str:
    try:
        return subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, RuntimeError, subprocess.SubprocessError):
        return "?"


# --- a model package -------------------------------------------------------------------------------
def build_package(workdir: Path) -> Path:
    """The tiny smart-home intent classifier the tests use (TensorFlow, host side, ~15 s)."""
    from converters.convert import convert_model
    from converters.datasets.smart_home import LABELS, generate
    from converters.text_classifier import train_text_classifier
    from converters.tf_env import silenced

    train, test = generate(per_intent=200)
    with silenced():
        keras_path, tok, enc = train_text_classifier(train.texts, train.labels, len(LABELS), workdir / "train",
                                                     epochs=6)
    calib = workdir / "calib.npz"
    np.savez(calib, x=enc.encode_batch(train.texts[:200]))
    eval_npz = workdir / "eval.npz"
    np.savez(eval_npz, x=enc.encode_batch(test.texts[:400]), y=np.asarray(test.labels[:400], dtype=np.int32))
    result = convert_model(keras_path, workdir / "pkg", calib=calib, eval_data=eval_npz, quantize="auto",
                           tokenizer=tok, labels=LABELS, name="intents", progress=False)
    return result.package.path


# --- 1. results/s through an agent -----------------------------------------------------------------

class Counter:
    """Subscribes to one result topic at QoS 1 and timestamps each arrival."""

    def __init__(self, url: str, topic: str) -> None:
        self.arrivals: list[float] = []
        self.ids: list[str] = []
        self.cv = threading.Condition()
        self.client = mqtt_subscriber(url, [(topic, 1)], self._message, client_id=f"bench-outbox-{free_port()}")

    def _message(self, client, userdata, msg) -> None:  # noqa: ANN001
        t = time.perf_counter()
        input_id = json.loads(msg.payload)["input_id"]
        with self.cv:
            self.arrivals.append(t)
            self.ids.append(input_id)
            self.cv.notify_all()

    def wait(self, n: int, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: len(self.arrivals) >= n, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_agent(mode: str, rnd: int, url: str, pkg: Path, inputs: Path, n: int, workdir: Path) -> dict[str, Any]:
    device = f"bench-ob-{mode}-{rnd}"
    outbox = "enabled = false" if mode == "off" else f'enabled = true\nsync = "{mode}"'
    conf = workdir / f"{device}.toml"
    conf.write_text(f'device_id = "{device}"\nstate_dir = "{workdir / "state" / device}"\nlog_level = "INFO"\n\n'
                    f'[mqtt]\nbroker = "{url}"\n\n[outbox]\n{outbox}\ndrain_timeout_s = 120.0\n\n'
                    f'[[pipelines]]\nname = "{PIPELINE}"\nmodel = "{pkg}"\nsource = "file://{inputs}"\n'
                    'sinks = ["mqtt"]\n')
    counter = Counter(url, Topics("edge-slm", device).result(PIPELINE))
    log = workdir / f"{device}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(edge_slm_command("run", str(conf)), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, cwd=workdir)
    try:
        complete = counter.wait(n, 180)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time, not the broker's or ours
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        counter.close()
    if rc != 0 or not complete:
        raise RuntimeError(f"{device}: exit {rc}, {len(counter.arrivals)} of {n} results; see {log}")
    first, last = counter.arrivals[0], counter.arrivals[n - 1]
    return {"mode": mode, "round": rnd, "results": len(counter.arrivals), "unique": len(set(counter.ids)),
            "results_per_s": (n - 1) / (last - first), "stream_s": last - first, "agent_wall_s": wall,
            "agent_cpu_s": usage.ru_utime + usage.ru_stime}


def bench_agent(pkg: Path, workdir: Path, n: int, rounds: int) -> list[dict[str, Any]]:
    from converters.datasets.smart_home import generate

    texts = generate(per_intent=50)[1].texts
    inputs = workdir / "inputs.txt"
    inputs.write_text("".join(f"{texts[i % len(texts)]}\n" for i in range(n)))
    runs = []
    with start_mosquitto(workdir) as broker:
        for rnd in range(1, rounds + 1):
            for mode, _ in MODES:
                r = run_agent(mode, rnd, broker.url, pkg, inputs, n, workdir)
                say(f"round {rnd} {mode:>6}: {r['results_per_s']:8.0f} results/s, {r['results']} delivered "
                    f"({r['unique']} unique), agent {r['agent_wall_s']:.1f}s wall, {r['agent_cpu_s']:.1f}s CPU")
                runs.append(r)
    return runs


# --- 2. what durability costs per message ----------------------------------------------------------
ACK_BATCH = 50  # the sender deletes acked rows half a window (100) at a time under load


def bench_durability(workdir: Path, n: int, sync: str, record: bytes) -> dict[str, Any]:
    """Store n records one by one (as the pipeline does), then delete them ACK_BATCH at a time (as the
    sender does), each its own transaction; the cost is per record."""
    path = workdir / f"durability-{sync}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    ob = Outbox(path, sync=sync)
    topic = "edge-slm/bench/intent/result"
    clock = time.perf_counter
    put = np.empty(n)
    for i in range(n):
        t = clock()
        ob.put(topic, record)
        put[i] = clock() - t
    ids = [r.id for r in ob.read(0, n)]
    ack = []
    for start in range(0, n, ACK_BATCH):
        batch = ids[start : start + ACK_BATCH]
        t = clock()
        ob.ack(batch)
        ack.append((clock() - t) / len(batch))
    ob.close()
    ack = np.asarray(ack)
    put_us, ack_us = put * 1e6, ack * 1e6
    per_msg = float(put_us.mean() + ack_us.mean())
    return {"sync": sync, "records": n, "record_bytes": len(record) + len(topic),
            "put_p50_us": float(np.percentile(put_us, 50)), "put_p99_us": float(np.percentile(put_us, 99)),
            "put_mean_us": float(put_us.mean()), "ack_p50_us": float(np.percentile(ack_us, 50)),
            "ack_mean_us": float(ack_us.mean()), "us_per_message": per_msg, "max_msgs_per_s": 1e6 / per_msg}


# --- report ----------------------------------------------------------------------------------------
def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mode, label in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        rates = [r["results_per_s"] for r in rs]
        out.append({"mode": mode, "label": label, "median_results_per_s": statistics.median(rates),
                    "min": min(rates), "max": max(rates), "agent_wall_s": statistics.median(r["agent_wall_s"] for r in rs),
                    "agent_cpu_s": statistics.median(r["agent_cpu_s"] for r in rs),
                    "delivered": sum(r["results"] for r in rs), "unique": sum(r["unique"] for r in rs)})
    base = out[0]["median_results_per_s"]
    for s in out:
        s["vs_off"] = s["median_results_per_s"] / base
        # what each result costs on top of the no-outbox path, in the agent as a whole
        s["added_us_per_result"] = 1e6 / s["median_results_per_s"] - 1e6 / base
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="inputs per agent run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per mode, interleaved")
    ap.add_argument("--durability-records", type=int, default=5000, help="records per sync mode in part 2")
    ap.add_argument("--package", help="a model package directory (default: train the tiny intent model)")
    ap.add_argument("--workdir", help="keep configs, logs and outbox files here (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print every number as JSON instead of tables")
    args = ap.parse_args()

    with work_dir(args.workdir, "edge-slm-bench-outbox-") as workdir:
        mach = machine(host=("kernel",), extra={
            "sqlite": sqlite3.sqlite_version, "paho-mqtt": package_version("paho-mqtt"),
            "broker": mosquitto_version(), "state_dir disk": filesystem_of(workdir)})
        pkg = Path(args.package).resolve() if args.package else build_package(workdir)
        say(f"package {pkg}; {args.rounds} rounds x {len(MODES)} modes x {args.messages} inputs")
        runs = bench_agent(pkg, workdir, args.messages, args.rounds)
        record = json.dumps({"schema_version": 1, "device_id": "bench", "pipeline": PIPELINE, "seq": 123456,
                             "ts": time.time(), "input_id": "file:inputs.txt:123456",
                             "model": {"name": "intents", "version": "1.0.0", "sha256": "0" * 64},
                             "output": {"label": "lights_on", "score": 0.997, "top": [
                                 {"label": "lights_on", "score": 0.997}, {"label": "set_brightness", "score": 0.0017},
                                 {"label": "close_blinds", "score": 0.0004}]}, "latency_ms": 2.5},
                            separators=(",", ":")).encode()
        durability = [bench_durability(workdir, args.durability_records, s, record) for s in ("normal", "full")]
        mach["loadavg_end"] = loadavg()
        summary = summarize(runs)
        lossless = all(r["unique"] == args.messages for r in runs)
        if args.json:
            print(json.dumps({"machine": mach, "agent_runs": runs, "agent_summary": summary,
                              "durability": durability, "lossless": lossless}, indent=2))
            return 0 if lossless else 1
        print(format_table(["machine", ""], [[k, v] for k, v in mach.items()]))
        print()
        print(f"Results/s through one agent: file source of {args.messages} inputs -> mqtt sink -> mosquitto "
              f"(set_tcp_nodelay true) -> a QoS 1 subscriber; first to last arrival; median of {args.rounds} "
              "interleaved rounds")
        print(format_table(
            ["mode", "results/s", "min", "max", "vs off", "+µs/result", "agent wall s", "agent CPU s", "delivered",
             "unique"],
            [[s["label"], f"{s['median_results_per_s']:.0f}", f"{s['min']:.0f}", f"{s['max']:.0f}",
              f"{s['vs_off']:.2f}x", f"{s['added_us_per_result']:.0f}", f"{s['agent_wall_s']:.2f}",
              f"{s['agent_cpu_s']:.2f}", s["delivered"], s["unique"]] for s in summary]))
        print()
        print(f"Cost of durability per message, one thread, {args.durability_records} records of "
              f"{durability[0]['record_bytes']} bytes: Outbox.put() (one transaction per record, as the pipeline "
              f"does) + Outbox.ack() ({ACK_BATCH} rows per transaction, as the sender does), per record")
        print(format_table(
            ["sync", "put p50 µs", "put p99 µs", "put mean µs", "ack µs/row p50", "ack µs/row mean",
             "µs/message", "max msg/s"],
            [[d["sync"], f"{d['put_p50_us']:.1f}", f"{d['put_p99_us']:.1f}", f"{d['put_mean_us']:.1f}",
              f"{d['ack_p50_us']:.1f}", f"{d['ack_mean_us']:.1f}", f"{d['us_per_message']:.1f}",
              f"{d['max_msgs_per_s']:.0f}"] for d in durability]))
        print()
        print("lossless (every input's result arrived in every run):", "yes" if lossless else "NO")
        return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
