"""End-to-end benchmark: Keras vs TFLite float32 vs the packaged model, then a real agent over MQTT.

Host script (trains with TensorFlow); the agent under test runs as `edge-slm run` in a subprocess,
so its RSS and latency are those of the device install (no TensorFlow in that process).

    .venv/bin/python benchmarks/bench_e2e.py [--messages 2000] [--workdir DIR] [--json] [--broker URL]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common, which puts the repo root on sys.path

import numpy as np  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
from _common import (  # noqa: E402
    edge_slm_command,
    loadavg,
    machine,
    mqtt_subscriber,
    percentiles,
    say,
    start_mosquitto,
    stop_process,
    work_dir,
)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_slm.mqtt import Topics, parse_broker_url  # noqa: E402
from edge_slm.package import ModelPackage  # noqa: E402
from edge_slm.table import format_table  # noqa: E402
from edge_slm.tasks import load_task  # noqa: E402

THREADS = 1  # what PipelineConfig.threads defaults to, so Table A matches what the agent runs
PIPELINE = "intent"


def pct(ms: list[float] | np.ndarray, *qs: float) -> list[float]:
    return percentiles(ms, *qs, digits=4)


def timed(fn, n: int, warmup: int) -> np.ndarray:  # noqa: ANN001
    """Call fn(i) warmup times, then n times; per-call milliseconds."""
    for i in range(warmup):
        fn(i)
    out = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        fn(i)
        out[i] = clock() - t0
    return out * 1000.0


# --- 1. train and convert --------------------------------------------------------------------------
def build(workdir: Path, epochs: int) -> dict[str, Any]:
    from converters.convert import convert_model
    from converters.datasets.smart_home import LABELS, generate
    from converters.text_classifier import train_text_classifier
    from converters.tf_env import silenced

    train, test = generate()
    t0 = time.monotonic()
    with silenced():
        model_path, tok_path, encoder = train_text_classifier(
            train.texts, train.labels, len(LABELS), workdir / "train", epochs=epochs)
    t_train = time.monotonic() - t0
    say(f"trained for {epochs} epochs on {len(train.texts)} utterances in {t_train:.0f}s")
    # Same calib/eval construction as devices/demo.py.
    calib = workdir / "calib.npz"
    rng = np.random.default_rng(0)
    idx = rng.choice(len(train.texts), size=min(300, len(train.texts)), replace=False)
    np.savez(calib, x=encoder.encode_batch([train.texts[i] for i in idx]))
    eval_npz = workdir / "eval.npz"
    x_test = encoder.encode_batch(test.texts)
    np.savez(eval_npz, x=x_test, y=np.asarray(test.labels, dtype=np.int32))
    common = dict(eval_data=eval_npz, tokenizer=tok_path, labels=LABELS, name="smart-home-intents",
                  version="1.0.0", progress=False)
    t0 = time.monotonic()
    auto = convert_model(model_path, workdir / "pkg-auto", calib=calib, quantize="auto", **common,
                         say=lambda m: say("  " + m))
    t_auto = time.monotonic() - t0
    say(f"converted with auto in {t_auto:.0f}s: {auto.reason}")
    t0 = time.monotonic()
    f32 = convert_model(model_path, workdir / "pkg-float32", quantize="float32", **common)
    say(f"converted float32 in {time.monotonic() - t0:.0f}s")
    return {"keras_path": model_path, "auto": auto, "float32": f32, "x_test": x_test, "texts": test.texts,
            "labels": test.labels, "train_s": round(t_train, 1), "convert_auto_s": round(t_auto, 1)}


# --- 2. Table A: one model call ---------------------------------------------------------------------
def bench_calls(built: dict[str, Any], calls: int) -> list[dict[str, Any]]:
    from converters.tf_env import silenced, tf

    x = built["x_test"]
    texts = built["texts"]
    n_ex = len(x)
    examples = [x[i : i + 1] for i in range(n_ex)]
    rows: list[dict[str, Any]] = []

    def add(model: str, call: str, rt: str, size: int, ms: np.ndarray) -> None:
        p50, p99 = pct(ms, 50, 99)
        rows.append({"model": model, "call": call, "runtime": rt, "size_kib": round(size / 1024, 1),
                     "calls": len(ms), "p50_ms": p50, "p99_ms": p99, "mean_ms": round(float(ms.mean()), 4)})

    keras_size = built["keras_path"].stat().st_size
    with silenced():
        km = tf().keras.models.load_model(built["keras_path"])
    say(f"Table A: Keras model(x) x{calls}")
    add("keras float32", "model(x, training=False)", f"TF {tf().__version__}", keras_size,
        timed(lambda i: km(examples[i % n_ex], training=False), calls, 50))
    say(f"Table A: Keras predict_on_batch x{calls}")
    add("keras float32", "predict_on_batch(x)", f"TF {tf().__version__}", keras_size,
        timed(lambda i: km.predict_on_batch(examples[i % n_ex]), calls, 50))

    f32_pkg = ModelPackage.open(built["float32"].package.path)
    auto_pkg = ModelPackage.open(built["auto"].package.path)
    recipe = built["auto"].chosen
    for label, pkg in (("tflite float32", f32_pkg), (f"package ({recipe})", auto_pkg)):
        task = load_task(pkg, threads=THREADS)
        m = task.model
        size = pkg.model_path.stat().st_size
        rt = f"{m.backend} t={THREADS}"
        say(f"Table A: {label} invoke_raw / run / task x{calls}")
        m.run(examples[0])  # leaves a real example in the input tensor for invoke_raw
        add(label, "invoke_raw()", rt, size, timed(lambda i, m=m: m.invoke_raw(), calls, 100))
        add(label, "Model.run(ids)", rt, size, timed(lambda i, m=m: m.run(examples[i % n_ex]), calls, 100))
        add(label, "task(text): tokenize+run+softmax", rt, size,
            timed(lambda i, t=task: t(texts[i % len(texts)]), calls, 100))
    ref = next(r for r in rows if r["model"].startswith("package") and r["call"] == "invoke_raw()")["p50_ms"]
    for r in rows:
        r["x_pkg_invoke"] = round(r["p50_ms"] / ref, 1)
    return rows


# --- 3. Table B: a real agent over MQTT -------------------------------------------------------------

def set_nodelay(client, userdata, sock) -> None:  # noqa: ANN001 - paho on_socket_open
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Runs `edge-slm run CONF` with TCP_NODELAY on every TCP connection it opens (only the broker's).
# A measurement-only patch in the child process, to show what the Nagle stalls cost; the library is unchanged.
NODELAY_AGENT = """import socket, sys
_cc = socket.create_connection
def _nodelay(*a, **k):
    s = _cc(*a, **k)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
socket.create_connection = _nodelay
from edge_slm.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


class Observer:
    """Subscribes to the agent's status, result and error topics; timestamps every record on arrival."""

    def __init__(self, url: str, topics: Topics, nodelay: bool) -> None:
        self.topics = topics
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.status: bytes = b""
        self.cv = threading.Condition()
        self.client = mqtt_subscriber(
            url, [(topics.status, 1), (topics.result(PIPELINE), 1), (topics.error(PIPELINE), 1)], self._message,
            client_id=f"bench-observer-{topics.device_id}", nodelay=nodelay)

    def _message(self, client, userdata, msg) -> None:  # noqa: ANN001
        t = time.perf_counter()
        with self.cv:
            if msg.topic == self.topics.status:
                self.status = msg.payload
            else:
                rec = json.loads(msg.payload)
                rec["_error"] = msg.topic.endswith("/error")
                self.records.append((t, rec))
            self.cv.notify_all()

    def wait(self, pred, timeout: float) -> bool:  # noqa: ANN001
        with self.cv:
            return self.cv.wait_for(pred, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_mode(mode: str, n: int, texts: list[str], pub: paho.Client, obs: Observer, topic: str) -> dict[str, Any]:
    start_idx = len(obs.records)
    sent: dict[str, float] = {}
    t_begin = time.perf_counter()
    for i in range(n):
        input_id = f"{mode}-{i}"
        payload = json.dumps({"id": input_id, "text": texts[i % len(texts)]})
        sent[input_id] = time.perf_counter()
        pub.publish(topic, payload, qos=1)
        if mode == "paced" and not obs.wait(lambda k=start_idx + i + 1: len(obs.records) >= k, 10):
            break
    obs.wait(lambda: len(obs.records) >= start_idx + n, 120)
    got = obs.records[start_idx:]
    t_end = got[-1][0] if got else time.perf_counter()
    results = [(t, r) for t, r in got if not r["_error"]]
    ids = [r["input_id"] for _, r in results]
    seqs = [r["seq"] for _, r in got]
    e2e = [(t - sent[r["input_id"]]) * 1000 for t, r in results if r["input_id"] in sent]
    agent = [r["latency_ms"] for _, r in results]
    p50, p95, p99 = pct(e2e, 50, 95, 99) if e2e else (None, None, None)
    a50, a99 = pct(agent, 50, 99) if agent else (None, None)
    wall = t_end - t_begin
    return {
        "mode": mode, "sent": n, "results": len(results), "errors": len(got) - len(results),
        "lost": n - len(set(ids) & set(sent)), "seq_increasing": all(b > a for a, b in zip(seqs, seqs[1:])),
        "seq_first": seqs[0] if seqs else None, "seq_last": seqs[-1] if seqs else None,
        "e2e_p50_ms": p50, "e2e_p95_ms": p95, "e2e_p99_ms": p99,
        "e2e_max_ms": round(max(e2e), 4) if e2e else None,
        "agent_p50_ms": a50, "agent_p99_ms": a99,
        "wall_s": round(wall, 3), "results_per_s": round(len(results) / wall, 1) if wall > 0 else None,
    }


def bench_agent(pkg: Path, workdir: Path, n: int, paced_n: int, texts: list[str], broker: str | None,
                nodelay: bool) -> dict[str, Any]:
    if broker:
        return agent_run(pkg, workdir, n, paced_n, texts, broker, external=True, nodelay=nodelay)
    with start_mosquitto(workdir, nodelay=nodelay) as own:
        return agent_run(pkg, workdir, n, paced_n, texts, own.url, external=False, nodelay=nodelay)


def agent_run(pkg: Path, workdir: Path, n: int, paced_n: int, texts: list[str], url: str, external: bool,
              nodelay: bool) -> dict[str, Any]:
    config = "nodelay" if nodelay else "stock"
    device = f"bench-{os.getpid()}-{config}"
    topics = Topics("edge-slm", device)
    conf = workdir / f"agent-{config}.toml"
    conf.write_text(f'device_id = "{device}"\nstate_dir = "{workdir / "state"}"\nlog_level = "INFO"\n\n'
                    f'[mqtt]\nbroker = "{url}"\n\n'
                    f'[[pipelines]]\nname = "{PIPELINE}"\nmodel = "{pkg}"\nsource = "mqtt://"\n')
    cmd = [sys.executable, "-c", NODELAY_AGENT, str(conf)] if nodelay else edge_slm_command("run", str(conf))
    log = workdir / f"agent-{config}.log"
    agent = obs = pub = None
    try:
        obs = Observer(url, topics, nodelay)
        t0 = time.monotonic()
        agent = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=workdir)
        if not obs.wait(lambda: obs.status == b"online" or agent.poll() is not None, 60) or obs.status != b"online":
            raise RuntimeError(f"agent did not come online; see {log}:\n" + log.read_text()[-2000:])
        startup_s = time.monotonic() - t0
        proc = psutil.Process(agent.pid)
        rss_online = proc.memory_info().rss
        has_tf = any("tensorflow" in (m.path or "") for m in proc.memory_maps())

        addr = parse_broker_url(url)
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-publisher-{device}")
        pub.max_queued_messages_set(0)
        if nodelay:
            pub.on_socket_open = set_nodelay
        connected = threading.Event()
        pub.on_connect = lambda c, u, f, rc, p: connected.set()
        pub.connect(addr.host, addr.port)
        pub.loop_start()
        if not connected.wait(10):
            raise RuntimeError(f"publisher could not connect to {url}")
        topic = topics.input(PIPELINE)
        say(f"Table B [{config}]: agent pid {agent.pid} online on {url} in {startup_s:.1f}s; warm-up 50 messages")
        run_mode("warmup", 50, texts, pub, obs, topic)
        say(f"Table B [{config}]: paced, {paced_n} messages")
        paced = run_mode("paced", paced_n, texts, pub, obs, topic)
        say(f"Table B [{config}]: burst, {n} messages")
        burst = run_mode("burst", n, texts, pub, obs, topic)
        rss_after = proc.memory_info().rss
        for m in (paced, burst):
            m["config"] = config
        return {"config": config, "broker": url, "broker_kind": "external" if external else "mosquitto (own)",
                "device_id": device,
                "agent_cmd": " ".join(cmd), "agent_startup_s": round(startup_s, 2),
                "agent_rss_online_mib": round(rss_online / 2**20, 1), "agent_rss_after_mib": round(rss_after / 2**20, 1),
                "agent_has_tensorflow_mapped": has_tf, "modes": [paced, burst]}
    finally:
        if pub is not None:
            pub.disconnect()
            pub.loop_stop()
        if agent is not None:
            stop_process(agent, 15)
        if obs is not None:
            if external:  # do not leave our retained 'offline' behind on someone else's broker
                obs.client.publish(topics.status, b"", qos=1, retain=True).wait_for_publish(5)
            obs.close()


# --- 4. report -------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="inputs sent per mode (paced, burst)")
    ap.add_argument("--paced-stock", type=int, default=500,
                    help="cap on paced messages for the stock (Nagle) config: each waits ~90 ms, 2000 would take 3 min")
    ap.add_argument("--calls", type=int, default=1000, help="timed calls per row of Table A (>= 1000)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--workdir", help="keep model, packages, configs and logs here (default: a temp dir)")
    ap.add_argument("--broker", help="use this broker (mqtt://HOST:PORT) instead of starting mosquitto")
    ap.add_argument("--no-nodelay", action="store_true", help="skip the TCP_NODELAY comparison run")
    ap.add_argument("--json", action="store_true", help="print every number as JSON instead of tables")
    args = ap.parse_args()

    t_start = time.monotonic()
    with work_dir(args.workdir, "edge-slm-bench-") as workdir:
        mach = machine(packages=("numpy", "ai-edge-litert", "tensorflow", "paho-mqtt", "tokenizers"))
        built = build(workdir, args.epochs)
        calls = bench_calls(built, args.calls)
        pkg = built["auto"].package.path
        runs = [bench_agent(pkg, workdir, args.messages, min(args.messages, args.paced_stock), built["texts"],
                            args.broker, nodelay=False)]
        if not args.no_nodelay:
            runs.append(bench_agent(pkg, workdir, args.messages, args.messages, built["texts"], args.broker, nodelay=True))
        bench_rss = psutil.Process().memory_info().rss
        mach["loadavg_end"] = loadavg()
        modes = [m for r in runs for m in r["modes"]]
        lossless = all(m["lost"] == 0 and m["errors"] == 0 and m["seq_increasing"] and m["results"] == m["sent"]
                       for m in modes)
        data = {"machine": mach, "recipe": built["auto"].chosen, "reason": built["auto"].reason,
                "train_s": built["train_s"], "convert_auto_s": built["convert_auto_s"],
                "model_calls": calls, "end_to_end": runs, "bench_process_rss_mib": round(bench_rss / 2**20, 1),
                "lossless": lossless, "total_s": round(time.monotonic() - t_start, 1)}
        if args.json:
            print(json.dumps(data, indent=2))
            return 0 if lossless else 1

        print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['machine']}")
        print(f"load average (1/5/15 min) at start {mach['loadavg_start']}, at end {mach['loadavg_end']} "
              "(other work on this machine skews p99)")
        print(f"python {mach['python']}, numpy {mach['numpy']}, ai-edge-litert {mach['ai-edge-litert']}, "
              f"tensorflow {mach['tensorflow']}, paho-mqtt {mach['paho-mqtt']}, tokenizers {mach['tokenizers']}")
        print(f"model: smart-home intent transformer (1 layer, dim 64, 14 intents, 24 tokens), trained "
              f"{args.epochs} epochs in {built['train_s']}s; auto chose {built['auto'].chosen} ({built['auto'].reason})")

        print(f"\nTable A: one model call, batch 1, warm ({args.calls} timed calls each, after warm-up; "
              f"x = p50 / package invoke_raw p50)")
        print(format_table(["model", "call", "runtime", "KiB", "calls", "p50 ms", "p99 ms", "mean ms", "x"],
                           [[r["model"], r["call"], r["runtime"], r["size_kib"], r["calls"], r["p50_ms"], r["p99_ms"],
                             r["mean_ms"], f"{r['x_pkg_invoke']}x"] for r in calls]))
        print("(Keras uses TF's default thread pools on both cores; TFLite rows use 1 thread, as the agent does. "
              "KiB: .keras file, model.tflite.)")

        r0 = runs[0]
        print(f"\nTable B: end to end, agent = `edge-slm run` subprocess ({r0['broker_kind']} broker), "
              f"QoS 1 in and out, 50 warm-up messages first")
        print(format_table(
            ["config", "mode", "sent", "results", "errors", "lost", "seq ok", "e2e p50", "e2e p95", "e2e p99",
             "e2e max", "agent p50", "agent p99", "results/s", "wall s"],
            [[m["config"], m["mode"], m["sent"], m["results"], m["errors"], m["lost"], "yes" if m["seq_increasing"] else "NO",
              m["e2e_p50_ms"], m["e2e_p95_ms"], m["e2e_p99_ms"], m["e2e_max_ms"], m["agent_p50_ms"], m["agent_p99_ms"],
              m["results_per_s"], m["wall_s"]] for m in modes]))
        print("(ms. e2e = publish() called -> result's on_message in this process. agent = the record's latency_ms: "
              "input received by the agent -> record built, before publishing.\n"
              " stock = mosquitto with its default set_tcp_nodelay false and plain bench clients; the agent sets TCP_NODELAY itself.\n"
              + (" nodelay = broker left as it is (external) + " if args.broker else
                 " nodelay = mosquitto `set_tcp_nodelay true` + ")
              + "TCP_NODELAY on the bench clients' and the agent's sockets (patched in the child process for this "
              "measurement only).\n"
              " burst results/s = results / (first publish -> last result).)")

        inv, run, task = (next(r for r in calls if r["model"].startswith("package") and r["call"] == c)
                          for c in ("invoke_raw()", "Model.run(ids)", "task(text): tokenize+run+softmax"))
        rows = [["raw interpreter invoke (same package, 1 thread)", inv["p50_ms"], inv["p99_ms"]],
                ["Model.run (set input, invoke, copy output)", run["p50_ms"], run["p99_ms"]],
                ["task call (tokenize + run + softmax), in-process", task["p50_ms"], task["p99_ms"]]]
        for r in runs:
            paced = r["modes"][0]
            rows += [[f"[{r['config']}] agent latency_ms (handoff + decode + task)", paced["agent_p50_ms"], paced["agent_p99_ms"]],
                     [f"[{r['config']}] end to end (2 MQTT hops + JSON + agent)", paced["e2e_p50_ms"], paced["e2e_p99_ms"]],
                     [f"[{r['config']}] e2e p50 minus agent p50 (MQTT, TCP, paho threads)",
                      round(paced["e2e_p50_ms"] - paced["agent_p50_ms"], 4), None]]
        print("\nWhere the time goes (paced mode, ms)")
        print(format_table(["stage", "p50 ms", "p99 ms"], rows))

        print("\nMemory (RSS)")
        mem = []
        for r in runs:
            mem += [[f"agent [{r['config']}], online with model loaded", r["agent_rss_online_mib"],
                     "TensorFlow mapped: " + ("yes" if r["agent_has_tensorflow_mapped"] else "no")
                     + f"; online {r['agent_startup_s']}s after spawn"],
                    [f"agent [{r['config']}], after paced + burst", r["agent_rss_after_mib"], ""]]
        mem.append(["this bench process", data["bench_process_rss_mib"], "TensorFlow + Keras + 2 interpreters"])
        print(format_table(["process", "MiB", "note"], mem))
        print()
        for m in modes:
            print(f"{m['config']} {m['mode']}: {m['results']}/{m['sent']} results, {m['lost']} lost, {m['errors']} errors, "
                  f"seq {m['seq_first']}..{m['seq_last']} strictly increasing in arrival order: {m['seq_increasing']}")
        print(f"nothing lost: {'yes' if lossless else 'NO'}; total {data['total_s']}s "
              f"(train {built['train_s']}s, convert auto {built['convert_auto_s']}s)")
        return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
