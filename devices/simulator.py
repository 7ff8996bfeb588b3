"""Fleet simulator: N virtual devices running the agent's real pipeline code behind a fault-injecting proxy.

Host side: starts brokers, proxies and worker processes, audits every result by seq; never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.netproxy import FaultProxy
from devices.report import SimRecord, build_report, format_summary
from devices.scenario import DeviceGroup, Scenario, load_scenario, scenario_from_dict
from devices.sim_worker import TOPIC_PREFIX, decode_input_id
from edge_slm.errors import BrokerError, ConfigError, EdgeSlmError
from edge_slm.mqtt import parse_broker_url

log = logging.getLogger(__name__)


class Collector:
    """A paho client subscribed (directly to the broker, not through the proxy) to every result and error."""

    def __init__(self, broker_url: str, protocol: str) -> None:
        addr = parse_broker_url(broker_url)
        proto = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-slm-sim-collector-{os.getpid()}",
                                  protocol=proto)
        self.records: list[SimRecord] = []
        self.unique: Counter = Counter()  # device -> distinct seqs
        self._seen: set[tuple[str, int]] = set()
        self.bad_payloads = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise BrokerError(f"collector could not subscribe on {broker_url}")

    def _on_connect(self, client, userdata, flags, rc, props) -> None:  # noqa: ANN001
        client.subscribe([(f"{TOPIC_PREFIX}/+/+/result", 1), (f"{TOPIC_PREFIX}/+/+/error", 1)])

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        now = time.time()
        try:
            rec = json.loads(msg.payload)
            dev, seq = str(rec["device_id"]), int(rec["seq"])
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.bad_payloads += 1
            return
        sent = decode_input_id(rec.get("input_id"))
        r = SimRecord(dev, seq, str(rec.get("pipeline", "")), sent, now,
                      round((now - sent) * 1000.0, 3) if sent is not None else None,
                      rec.get("error") if isinstance(rec.get("error"), str) else None)
        with self._lock:
            self.records.append(r)
            if (dev, seq) not in self._seen:
                self._seen.add((dev, seq))
                self.unique[dev] += 1

    def snapshot(self, since: int) -> tuple[int, list[SimRecord]]:
        with self._lock:
            return len(self.records), self.records[since:]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class SimResult:
    report: dict[str, Any]
    passed: bool
    out_dir: Path
    worker_errors: list[str] = field(default_factory=list)


def _pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(round(q / 100.0 * (len(sorted_vals) - 1))))]


def plan_crashes(scenario: Scenario) -> dict[str, list[tuple[float, float]]]:
    """device id -> [(at_s, restart_after_s)], devices picked with the scenario's seed."""
    rng = random.Random(scenario.seed)
    ids = [d for _, d in scenario.device_ids()]
    plan: dict[str, list[tuple[float, float]]] = {}
    for f in scenario.faults:
        if f.kind == "crash":
            for dev in rng.sample(ids, f.crash_count(len(ids))):
                plan.setdefault(dev, []).append((f.at_s, f.restart_after_s))
    return plan


BRIDGE_C = Path(__file__).resolve().parents[1] / "firmware_bridge" / "c"
MCU_CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-O2"]


def build_virtual_mcu(out_dir: Path) -> Path:
    """Compile firmware_bridge/c/virtual_mcu.c with the system gcc into out_dir; ConfigError without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ConfigError("MCU-backed devices (mcu = true) need gcc to build firmware_bridge/c/virtual_mcu.c; "
                          "install gcc or set mcu = false")
    out = Path(out_dir) / "virtual_mcu"
    cmd = [gcc, *MCU_CFLAGS, "-o", str(out), *(str(BRIDGE_C / f) for f in
                                               ("virtual_mcu.c", "edge_slm_device.c", "edge_slm_frame.c")), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise EdgeSlmError(f"building the virtual MCU failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return out


def plan_sensors(scenario: Scenario) -> dict[str, dict[str, Any]]:
    """device id -> {condition, machine}: each sensor device its own machine, a `faulty` share with a fault."""
    from converters.datasets.vibration import CONDITIONS

    rng = random.Random(scenario.seed + 7919)
    ids = scenario.device_ids()
    plan: dict[str, dict[str, Any]] = {}
    for gi, g in enumerate(scenario.devices):
        if g.kind != "sensor":
            continue
        mine = [d for gj, d in ids if gj == gi]
        bad = set(rng.sample(mine, round(g.faulty * len(mine))))
        for d in mine:
            plan[d] = {"condition": rng.choice(CONDITIONS[1:]) if d in bad else "normal",
                       "machine": 1000 + len(plan)}
    return plan


class _FaultDriver(threading.Thread):
    """Applies the proxy's faults (outage, latency, loss) at their times; records events."""

    def __init__(self, scenario: Scenario, proxy: FaultProxy, t0: float) -> None:
        super().__init__(name="sim-faults", daemon=True)
        self.proxy = proxy
        self.t0 = t0
        self.stop_ev = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.active: set[str] = set()
        steps = []
        for f in scenario.faults:
            if f.kind in ("broker_outage", "latency", "loss"):
                steps.append((f.at_s, 0, f))
                steps.append((f.at_s + f.duration_s, 1, f))
        self.steps = sorted(steps, key=lambda s: (s[0], s[1]))

    def run(self) -> None:
        for at, phase, f in self.steps:
            if self.stop_ev.wait(max(0.0, self.t0 + at - time.time())):
                return
            label = f"{f.kind}" + (f" {f.latency_ms:g}±{f.jitter_ms:g}ms" if f.kind == "latency" else
                                   f" {f.loss:.0%}" if f.kind == "loss" else "")
            if phase == 0:
                self.active.add(label)
                ev = {"t": round(time.time() - self.t0, 3), "kind": f.kind, "duration_s": f.duration_s}
                if f.kind == "broker_outage":
                    self.proxy.outage(True)
                elif f.kind == "latency":
                    self.proxy.set(latency_ms=f.latency_ms, jitter_ms=f.jitter_ms)
                    ev |= {"latency_ms": f.latency_ms, "jitter_ms": f.jitter_ms}
                else:
                    self.proxy.set(loss=f.loss)
                    ev["loss"] = f.loss
                self.events.append(ev)
            else:
                self.active.discard(label)
                if f.kind == "broker_outage":
                    self.proxy.outage(False)
                elif f.kind == "latency":
                    self.proxy.set(latency_ms=0.0, jitter_ms=0.0)
                else:
                    self.proxy.set(loss=0.0)
                self.events.append({"t": round(time.time() - self.t0, 3), "kind": f"{f.kind}_end"})


def _progress_line(t: float, duration: float, connected: int, total: int, rate: float, lat: list[float],
                   errors: int, reconnects: int, faults: set[str], phase: str) -> str:
    p50, p99 = _pct(lat, 50), _pct(lat, 99)
    lat_s = f"p50 {p50:6.1f} ms p99 {p99:6.1f} ms" if p50 is not None else "p50      - ms p99      - ms"
    return (f"\r[{phase} {t:5.1f}/{duration:.0f}s] connected {connected}/{total}  {rate:7.1f} results/s  {lat_s}  "
            f"errors {errors}  reconnects {reconnects}  faults: {', '.join(sorted(faults)) or 'none'}   ")


def _explained_duplicates(records: list[SimRecord], events: list[dict[str, Any]], t0: float) -> tuple[int, int]:
    """(duplicates, of which explained): a repeat of a seq first received before one of its device's
    crashes and again after that crash is the outbox's at-least-once resend, not a bug."""
    crashes: dict[str, list[float]] = {}
    for e in events:
        if e.get("kind") == "crash":
            crashes.setdefault(str(e["device"]), []).append(t0 + float(e["t"]))
    first: dict[tuple[str, int], float] = {}
    dups = explained = 0
    for r in sorted(records, key=lambda r: r.received_at):
        key = (r.device_id, r.seq)
        if key not in first:
            first[key] = r.received_at
            continue
        dups += 1
        if any(first[key] <= c <= r.received_at for c in crashes.get(r.device_id, [])):
            explained += 1
    return dups, explained


def run_scenario(scenario: Scenario, out_dir: Path, *, quiet: bool = False, progress=None) -> SimResult:  # noqa: ANN001
    """Run the whole scenario and write report.json/report.html to out_dir; the verdict is in .passed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = progress if progress is not None else sys.stderr
    broker = None
    proxy = None
    collector = None
    procs: list[mp.Process] = []
    state = tempfile.TemporaryDirectory(prefix="edge-slm-sim-")
    try:
        if scenario.broker == "embedded":
            from devices.broker import EmbeddedBroker

            broker = EmbeddedBroker().start()
            broker_url = broker.url
        else:
            broker_url = scenario.broker
        addr = parse_broker_url(broker_url)
        proxy = FaultProxy(addr.host, addr.port, seed=scenario.seed).start()
        collector = Collector(broker_url, scenario.mqtt_protocol)
        crashes = plan_crashes(scenario)
        ids = scenario.device_ids()
        nworkers = min(scenario.workers, len(ids))
        ctx = mp.get_context("spawn")
        out_q = ctx.Queue()
        go, shutdown = ctx.Event(), ctx.Event()
        t0_val = ctx.Value("d", 0.0)
        groups = [{"model": g.model, "kind": g.kind} for g in scenario.devices]
        sensors = plan_sensors(scenario)
        binary = build_virtual_mcu(out_dir) if any(g.mcu for g in scenario.devices) else None

        def mcu(k: int, gi: int, d: str) -> dict[str, Any]:
            if not scenario.devices[gi].mcu:
                return {}
            return {"binary": str(binary), "link": str(Path(state.name) / f"tty-{d}"),
                    "seed": scenario.seed * 1000 + k + 1, "corrupt": scenario.serial_corrupt}

        for w in range(nworkers):
            devs = [{"device_id": d, "group": gi, "pipeline": scenario.devices[gi].pipeline,
                     "rate": scenario.devices[gi].rate, "crashes": crashes.get(d, []),
                     "kind": scenario.devices[gi].kind, "mcu": mcu(k, gi, d)} | sensors.get(d, {})
                    for k, (gi, d) in enumerate(ids) if k % nworkers == w]
            spec = {"worker": w, "devices": devs, "groups": groups, "proxy_url": proxy.url,
                    "protocol": scenario.mqtt_protocol, "qos": scenario.qos, "outbox": scenario.outbox,
                    "net_loop": scenario.net_loop, "state_dir": state.name, "seed": scenario.seed,
                    "duration_s": scenario.duration_s, "log_level": "ERROR",
                    "serial_windows": scenario.serial_windows()}
            p = ctx.Process(target=_worker_entry, args=(spec, out_q, go, t0_val, shutdown),
                            name=f"sim-worker-{w}", daemon=True)
            p.start()
            procs.append(p)
        # ramp-up: every worker has loaded its model and connected its devices
        ready = 0
        errors: list[str] = []
        started: dict[int, int] = {}
        ramp_start = time.time()
        while ready < nworkers and not errors:
            try:
                # a worker that makes no progress for this long is stuck (loading the model included)
                msg = out_q.get(timeout=60)
            except Exception:
                errors.append(f"workers connected {sum(started.values())} of {len(ids)} devices, then stalled")
                break
            if msg["type"] == "ready":
                ready += 1
                started[msg["worker"]] = msg["devices"]
            elif msg["type"] == "connecting":
                started[msg["worker"]] = msg["started"]
            elif msg["type"] == "failed":
                errors.append(f"worker {msg['worker']}: {msg['error']}")
            if not quiet:
                stream.write(f"\r[ramp-up {time.time() - ramp_start:5.1f}s] devices started "
                             f"{sum(started.values())}/{len(ids)}   ")
                stream.flush()
        ramp_s = time.time() - ramp_start
        if errors:
            raise EdgeSlmError("simulated devices did not start: " + "; ".join(errors)
                               + " (check the scenario's model packages and that the broker accepts connections)")
        t0 = time.time() + 0.2
        t0_val.value = t0
        go.set()
        faults = _FaultDriver(scenario, proxy, t0)
        faults.start()
        events: list[dict[str, Any]] = []
        stats: dict[int, dict[str, Any]] = {}
        expected: dict[str, int] = {}
        device_errors: dict[str, dict[str, int]] = {}
        mcu_counters: dict[str, dict[str, Any]] = {}
        done_workers = 0
        timeline: dict[str, list[list[float]]] = {"connected": [], "results_per_s": []}
        seen = 0
        window: list[tuple[float, float | None]] = []
        last_tick = time.time()
        drain_deadline: float | None = None
        total = len(ids)
        phase = "run"
        while True:
            try:
                msg = out_q.get(timeout=0.2)
            except Exception:
                msg = None
            if msg is not None:
                if msg["type"] == "stats":
                    stats[msg["worker"]] = msg
                    events += msg["events"]
                elif msg["type"] == "inputs_done":
                    expected.update(msg["expected"])
                    device_errors.update(msg.get("error_codes", {}))
                    mcu_counters.update(msg.get("mcu", {}))
                    done_workers += 1
                    if msg["errors"]:
                        errors.append(f"worker {msg['worker']}: {msg['errors']} inputs failed in the device")
            now = time.time()
            if now - last_tick >= 1.0:
                n, new = collector.snapshot(seen)
                seen = n
                window = [(r.received_at, r.latency_ms) for r in new] + [w for w in window if w[0] > now - 5]
                window = [w for w in window if w[0] > now - 5]
                rate = len(new) / (now - last_tick)
                last_tick = now
                connected = sum(s["connected"] for s in stats.values())
                timeline["connected"].append([round(now - t0, 2), connected])
                timeline["results_per_s"].append([round(now - t0, 2), round(rate, 1)])
                if not quiet:
                    lat = sorted(x for _, x in window if x is not None)
                    errs = sum(1 for r in collector.records if r.error)
                    stream.write(_progress_line(now - t0, scenario.duration_s, connected, total, rate, lat, errs,
                                                sum(s["reconnects"] for s in stats.values()), faults.active, phase))
                    stream.flush()
            if done_workers == nworkers:
                if drain_deadline is None:
                    phase = "drain"
                    drain_deadline = now + scenario.drain_s
                complete = all(collector.unique[d] >= c for d, c in expected.items())
                if complete or now >= drain_deadline:
                    break
            if any(not p.is_alive() for p in procs) and done_workers < nworkers:
                errors.append("a worker process died: " + ", ".join(f"{p.name} exit {p.exitcode}"
                                                                   for p in procs if not p.is_alive()))
                break
        faults.stop_ev.set()
        shutdown.set()
        closed = 0
        close_deadline = time.time() + 30
        while closed < sum(1 for p in procs if p.is_alive() or p.exitcode == 0) and time.time() < close_deadline:
            try:
                msg = out_q.get(timeout=0.5)
            except Exception:
                continue
            if msg["type"] == "closed":
                closed += 1
            elif msg["type"] == "stats":
                events += msg["events"]
        for p in procs:
            p.join(10)
        time.sleep(0.3)  # results the close flushed
        if not quiet:
            stream.write("\n")
        records = list(collector.records)
        events += faults.events
        proxy_stats = proxy.stats()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if collector is not None:
            collector.close()
        if proxy is not None:
            proxy.stop()
        if broker is not None:
            broker.stop()
        state.cleanup()
    dups, explained = _explained_duplicates(records, events, t0)
    scen = scenario.to_dict() | {"started_at": t0, "ramp_up_s": round(ramp_s, 2), "broker_url": broker_url, "proxy": proxy_stats,
                                 "worker_errors": errors, "bad_payloads": collector.bad_payloads}
    report = build_report(scen, records, events, timeline, out_dir, expected=expected, started_at=t0,
                          duration_s=scenario.duration_s, allow_duplicates=dups == explained)
    summary = report["summary"]
    exp_total = summary["expected"] or 0
    lost = summary["lost"] or 0
    loss_ok = lost <= scenario.allowed_loss * exp_total
    passed = not errors and (report["verdict"]["passed"] or (
        loss_ok and dups == explained and all("lost" in r or "gaps" in r for r in report["verdict"]["reasons"])))
    by_code: Counter = Counter()
    for codes in device_errors.values():
        by_code.update(codes)
    received_codes = Counter(r.error for r in records if r.error)
    report["simulator"] = {"passed": passed, "duplicates": dups, "duplicates_after_crash": explained,
                           "allowed_loss": scenario.allowed_loss, "worker_errors": errors,
                           # error records (delivered, so not loss) by code: as the devices emitted them and
                           # as the collector received them (resends after a crash counted again)
                           "error_codes": dict(by_code), "error_codes_received": dict(received_codes),
                           "device_error_codes": device_errors,
                           "sensor_conditions": {d: v["condition"] for d, v in sensors.items()},
                           "mcu": mcu_counters, "serial_corrupt": scenario.serial_corrupt}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return SimResult(report, passed, out_dir, errors)


def _worker_entry(*args: Any) -> None:
    from devices.sim_worker import run_worker

    run_worker(*args)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def quick_scenario(devices: int, duration_s: float, model: str, broker: str = "embedded",
                   workers: int | None = None, rate: float = 1.0) -> Scenario:
    """A scenario with defaults for `edge-slm simulate --devices N --model PKG`: no faults."""
    data: dict[str, Any] = {"name": f"quick-{devices}", "duration_s": float(duration_s), "broker": broker,
                            "workers": workers or min(2, max(1, os.cpu_count() or 1)),
                            "net_loop": "shared" if devices > 100 else "thread",
                            "devices": {"model": str(Path(model).resolve()), "count": devices, "rate": float(rate)}}
    return scenario_from_dict(data, "--devices")


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.scenario:
        scenario = load_scenario(args.scenario)
    else:
        if not args.devices or not args.model:
            raise ConfigError("give a SCENARIO.toml, or --devices N with --model PACKAGE_DIR "
                              "(a package from `edge-slm convert`, or the one `edge-slm demo --keep` writes)")
        scenario = quick_scenario(args.devices, args.duration, args.model, args.broker)
    out_dir = Path(args.output or f"sim-report-{scenario.name}")
    result = run_scenario(scenario, out_dir, quiet=args.json)
    if args.json:
        print(json.dumps(result.report))
    else:
        print(format_summary(result.report))
        codes = result.report["simulator"]["error_codes"]
        if codes:  # error records are delivered results (no loss): what the devices reported, by code
            print("error records by code: " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items())))
        print(f"report: {out_dir / 'report.html'} ({'PASSED' if result.passed else 'FAILED'})")
    return 0 if result.passed else 1


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("simulate", help="run a fleet of virtual devices against a broker with faults",
                              description="Run N virtual devices (the real agent pipeline and MQTT code) behind a "
                                          "fault-injecting proxy; audit every result by seq; write an HTML report.")
    p.add_argument("scenario", nargs="?", help="SCENARIO.toml (see examples/scenarios/)")
    p.add_argument("-o", "--output", help="report directory (default sim-report-NAME)")
    p.add_argument("--json", action="store_true", help="no progress; print the report as JSON")
    p.add_argument("--devices", type=int, help="quick run without a scenario file: this many devices")
    p.add_argument("--duration", type=float, default=20.0, help="quick run: seconds (default 20)")
    p.add_argument("--model", help="quick run: model package directory")
    p.add_argument("--broker", default="embedded", help="quick run: mqtt://HOST:PORT or embedded (default)")
    p.set_defaults(func=cmd_simulate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-slm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_cli(sub)
    args = parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except EdgeSlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


__all__ = ["Collector", "DeviceGroup", "SimResult", "add_cli", "cmd_simulate", "plan_crashes", "quick_scenario",
           "run_scenario"]

if __name__ == "__main__":
    sys.exit(main())
