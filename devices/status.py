"""`edge-slm status DEVICE_ID`: read a device's retained status and metrics from the broker.

Host side; needs only paho-mqtt. The agent publishes both retained, so the answer is immediate.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_slm.errors import BrokerError, EdgeSlmError
from edge_slm.mqtt import Topics, parse_broker_url
from edge_slm.table import format_table


def read_status(broker: str, device_id: str, prefix: str = "edge-slm", timeout: float = 5.0,
                username: str = "", password: str = "") -> dict[str, Any]:
    topics = Topics(prefix, device_id)
    addr = parse_broker_url(broker)
    got: dict[str, Any] = {}
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-slm-status-{time.monotonic_ns() % 10**9}")
    if username:
        client.username_pw_set(username, password or None)
    if addr.tls:
        client.tls_set()

    def on_connect(c, u, f, rc, p) -> None:  # noqa: ANN001
        c.subscribe([(topics.status, 1), (topics.metrics, 1)])

    def on_message(c, u, msg) -> None:  # noqa: ANN001
        if msg.topic == topics.status:
            got["status"] = msg.payload.decode("utf-8", "replace")
        else:
            try:
                got["metrics"] = json.loads(msg.payload)
            except ValueError:
                got["metrics"] = {"unreadable": msg.payload[:100].decode("utf-8", "replace")}
        if "status" in got and "metrics" in got:
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(addr.host, addr.port)
    except OSError as exc:
        raise BrokerError(f"cannot reach broker {addr.url}: {exc.strerror or exc}; pass --broker mqtt://HOST:PORT") from exc
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    if not got:
        raise EdgeSlmError(f"nothing known about device {device_id!r} on {addr.url} (no retained status or metrics "
                           f"under {topics.root}/); check the device id and --prefix")
    return got


def cmd_status(args: argparse.Namespace) -> int:
    info = read_status(args.broker, args.device_id, args.prefix, args.timeout)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info.get("metrics", {})
    rows = [["status", info.get("status", "unknown")]]
    if m:
        age = time.time() - m.get("ts", time.time())
        rows += [["metrics age", f"{age:.0f} s"], ["uptime", f"{m.get('uptime_s', 0):.0f} s"],
                 ["RSS", f"{m.get('rss_bytes', 0) / 2**20:.1f} MiB"], ["inferences", m.get("inferences")],
                 ["errors", m.get("errors")], ["reconnects", m.get("reconnects")]]
        ob = m.get("outbox") or {}
        if ob:
            rows += [["outbox depth", ob.get("depth")], ["outbox dropped", json.dumps(ob.get("dropped"))]]
    print(format_table(["", args.device_id], rows))
    pipes = m.get("pipelines", {})
    if pipes:
        print()
        print(format_table(["pipeline", "inferences", "errors", "p50 ms", "p95 ms"],
                           [[k, v["inferences"], v["errors"], v["latency_ms_p50"], v["latency_ms_p95"]]
                            for k, v in pipes.items()]))
    return 0
