"""Largest fleet this machine sustains at 1 result/s per device through mosquitto, zero loss at QoS 1, p99 < 100 ms.

Runs `devices.simulator.run_scenario` at N = 50, 100, 200, ... (stops at the first failing step) and
prints one table row per step: devices, results/s, p50/p99/max end-to-end latency, lost, duplicates,
CPU% of the simulator (all its processes) and of mosquitto, peak RSS. Machine info and load average on top.

    .venv/bin/python benchmarks/bench_fleet.py --model PKG [--steps 50,100,200,400,700,1000] [--seconds 30]
        [--net-loop shared|thread|both] [--workers 2]

Without --model a small text model is trained first (about a minute; needs TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.scenario import scenario_from_dict  # noqa: E402
from devices.simulator import run_scenario  # noqa: E402
from edge_slm.errors import EdgeSlmError  # noqa: E402
from edge_slm.table import format_table  # noqa: E402

P99_LIMIT_MS = 100.0


def machine_info() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    la = os.getloadavg()
    return (f"CPU: {cpu}, {os.cpu_count()} cores; load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; "
            f"Python {platform.python_version()}; {platform.system()} {platform.release()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(tmp: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(("user root\n" if os.geteuid() == 0 else "")
                    + f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                    "set_tcp_nodelay true\nmax_connections -1\nlog_dest stdout\nlog_type error\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def train_model(tmp: Path) -> Path:
    from devices.demo import build_model

    return Path(build_model(tmp, epochs=4, quiet=True)["result"].package.path)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


class RssSampler:
    """Peak summed RSS of this process and its children except the broker, sampled every 0.5 s."""

    def __init__(self, exclude: set[int]) -> None:
        import threading

        self.exclude = exclude
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self) -> list[int]:
        pid = os.getpid()
        kids: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
        return [k for k in kids if k not in self.exclude]

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            total = proc_rss_mb(os.getpid())
            for k in self._children():
                try:
                    total += proc_rss_mb(k)
                except OSError:
                    pass
            self.peak_mb = max(self.peak_mb, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(2)
        return self.peak_mb


def run_step(n: int, seconds: float, model: Path, broker: str, workers: int, net_loop: str, out: Path,
             mosq_pid: int) -> dict:
    scenario = scenario_from_dict({
        "name": f"bench-{n}", "duration_s": seconds, "broker": broker, "workers": workers, "net_loop": net_loop,
        "drain_s": 20.0, "devices": {"model": str(model), "count": n, "rate": 1.0}}, "bench")
    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    mosq0 = proc_cpu_s(mosq_pid)
    t0 = time.monotonic()
    rss = RssSampler({mosq_pid})
    try:
        res = run_scenario(scenario, out / f"n{n}-{net_loop}", quiet=True)
    except EdgeSlmError as exc:  # the fleet did not even start (see the message): that is where it breaks
        rss.stop()
        return {"devices": n, "net_loop": net_loop, "results/s": 0, "p50 ms": None, "p99 ms": None,
                "max ms": None, "lost": None, "dup": None, "sim CPU%": None, "broker CPU%": None,
                "sim RSS MB": None, "broker RSS MB": None, "load1": None, "verdict": "no start",
                "_errors": [str(exc)[:300]], "_reasons": []}
    wall = time.monotonic() - t0
    rss_mb = rss.stop()
    load1 = os.getloadavg()[0]
    self_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sim_cpu = (self_cpu1.ru_utime + self_cpu1.ru_stime - self_cpu0.ru_utime - self_cpu0.ru_stime
               + kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime)
    mosq_cpu = proc_cpu_s(mosq_pid) - mosq0
    s = res.report["summary"]
    lat = s["latency_ms"]
    sim = res.report.get("simulator", {})
    p99 = lat.get("p99")
    ok = res.passed and p99 is not None and p99 < P99_LIMIT_MS
    return {
        "devices": n, "net_loop": net_loop, "results/s": round(s["results"] / seconds, 1),
        "p50 ms": _r(lat.get("p50")), "p99 ms": _r(p99), "max ms": _r(lat.get("max")), "lost": s["lost"],
        "dup": sim.get("duplicates", s["duplicates"]),
        "sim CPU%": round(100 * sim_cpu / wall, 0), "broker CPU%": round(100 * mosq_cpu / wall, 0),
        "sim RSS MB": round(rss_mb), "broker RSS MB": round(proc_rss_mb(mosq_pid)), "load1": round(load1, 2),
        "verdict": "ok" if ok else ("p99" if res.passed else "LOSS/ERR"),
        "_errors": res.worker_errors, "_reasons": res.report["verdict"]["reasons"][:3],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="text model package dir (default: train one)")
    ap.add_argument("--steps", default="50,100,200,400,700,1000")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--net-loop", default="both", choices=("shared", "thread", "both"))
    args = ap.parse_args(argv)
    print(machine_info())
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    model = Path(args.model) if args.model else train_model(tmp)
    proc, port = start_mosquitto(tmp)
    broker = f"mqtt://127.0.0.1:{port}"
    print(f"mosquitto pid {proc.pid} on {broker}; model {model}; {args.seconds:g} s per step after ramp-up; "
          f"{args.workers} worker processes; pass = zero loss and p99 < {P99_LIMIT_MS:g} ms")
    loops = ("shared", "thread") if args.net_loop == "both" else (args.net_loop,)
    rows = []
    best: dict[str, int] = {}
    try:
        for loop in loops:
            for n in [int(x) for x in args.steps.split(",")]:
                row = run_step(n, args.seconds, model, broker, args.workers, loop, tmp, proc.pid)
                rows.append(row)
                print(f"  {loop:6} N={n:5}: {row['verdict']}  p99 {row['p99 ms']} ms  lost {row['lost']}  "
                      f"{row['results/s']} results/s  {'; '.join(row['_errors'] + row['_reasons'])}", flush=True)
                if row["verdict"] != "ok":
                    break
                best[loop] = n
    finally:
        proc.terminate()
        proc.wait(5)
    cols = [k for k in rows[0] if not k.startswith("_")] if rows else []
    print()
    print(format_table(cols, [[r[c] if r[c] is not None else "-" for c in cols] for r in rows]))
    for loop in loops:
        print(f"largest passing fleet with net_loop={loop}: {best.get(loop, 0)} devices")
    la = os.getloadavg()
    print(f"load average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
