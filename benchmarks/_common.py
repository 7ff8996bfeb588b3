"""What every benchmark script shares: the repo on sys.path, progress lines, the machine it ran on,
a work directory, a mosquitto of its own, and the `edge-slm` command. Never imports TensorFlow or torch.

Scripts import it as `from _common import ...` after putting benchmarks/ on sys.path (running
`python benchmarks/bench_x.py` does that already); importing it puts the repo root on sys.path.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Distributions published under more than one name: the first one installed gives the version.
_DIST_NAMES = {"tensorflow": ("tensorflow-cpu", "tensorflow")}
# What `host=` may ask machine() for, and where each comes from.
_HOST_FIELDS: dict[str, Callable[[], str]] = {
    "machine": platform.machine, "kernel": platform.release, "platform": platform.platform}


def say(msg: str) -> None:
    """A progress line on stderr, so stdout holds only the tables (or the JSON)."""
    print(msg, file=sys.stderr, flush=True)


def percentiles(values: Sequence[float] | Any, *qs: float, digits: int = 3) -> list[float]:
    """The qs-th percentiles of values, rounded to digits."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return [round(float(np.percentile(a, q)), digits) for q in qs]


# --- the machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cache_sizes() -> dict[str, str]:
    """Data and unified cache sizes of cpu0 by level, as the kernel (or the VM) reports them: {"L1": "32K", ...}."""
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            if kind != "Instruction":
                caches[f"L{level}"] = (d / "size").read_text().strip()
        except OSError:
            pass
    return caches


def package_version(dist: str) -> str:
    """The installed version of a distribution ("tensorflow" also finds tensorflow-cpu), "-" if absent."""
    for name in _DIST_NAMES.get(dist, (dist,)):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "-"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: how much other work shared the machine with a run."""
    return [round(v, 2) for v in os.getloadavg()]


def machine(packages: Sequence[str] = (), extra: Mapping[str, Any] | None = None,
            host: Sequence[str] = ("machine",)) -> dict[str, Any]:
    """What a benchmark ran on, in this key order: cpu, cores, the host fields ("machine": x86_64,
    "kernel": the release, "platform": the full platform string), python, each package's version under
    its distribution name, extra as given, loadavg_start. Add `loadavg_end` (loadavg()) when done."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    info.update({k: _HOST_FIELDS[k]() for k in host})
    info["python"] = platform.python_version()
    info.update({p: package_version(p) for p in packages})
    info.update(extra or {})
    info["loadavg_start"] = loadavg()
    return info


# --- processes and directories ---------------------------------------------------------------------
@contextmanager
def work_dir(given: str | None, prefix: str) -> Iterator[Path]:
    """The directory the user asked to keep (created), else a temporary one removed afterwards."""
    if given:
        path = Path(given).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def edge_slm_command(*args: str) -> list[str]:
    """`edge-slm ARGS` as the device install runs it: the venv's console script, else `python -m edge_slm.cli`."""
    exe = Path(sys.executable).parent / "edge-slm"
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "edge_slm.cli", *args]


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- mosquitto --------------------------------------------------------------------------------------
def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto, or pass --broker URL")
    return found


@dataclass(frozen=True)
class Mosquitto:
    """A running mosquitto of our own: where to connect, its process (for CPU/RSS), its log."""

    url: str
    port: int
    proc: subprocess.Popen
    log: Path


@contextmanager
def start_mosquitto(workdir: Path, nodelay: bool = True, extra_conf: str = "",
                    timeout: float = 10.0) -> Iterator[Mosquitto]:
    """A mosquitto of our own on a free loopback port, stopped on exit; connect to `.url`.

    Same settings as the tests' broker (tests/conftest.py): unlimited queues (max_queued_messages 0;
    the default 1000 drops QoS 1 messages for a slow subscriber), no persistence, errors logged to
    workdir/mosquitto-PORT.log, `user root` as root. nodelay=False keeps mosquitto's default
    set_tcp_nodelay false, whose Nagle stalls bench_e2e.py measures on purpose. extra_conf: more
    mosquitto.conf lines (e.g. "max_connections -1\n").
    """
    from devices.broker import free_port

    port = free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    log = workdir / f"mosquitto-{port}.log"
    conf.write_text(("user root\n" if os.geteuid() == 0 else "")
                    + f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
                    + ("set_tcp_nodelay true\n" if nodelay else "")
                    + "persistence false\nlog_dest stdout\nlog_type error\n" + extra_conf)
    with open(log, "wb") as out:
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port}; see {log}:\n"
                                   + log.read_text(errors="replace")[-2000:])
            time.sleep(0.05)
        yield Mosquitto(f"mqtt://127.0.0.1:{port}", port, proc, log)
    finally:
        stop_process(proc)


def mqtt_subscriber(url: str, subscriptions: list[tuple[str, int]], on_message: Callable[..., None],
                    client_id: str, nodelay: bool = True, timeout: float = 10.0) -> Any:
    """A started paho client (callback API 2, unlimited queue) whose subscriptions are acknowledged;
    nodelay sets TCP_NODELAY on its socket. Call .disconnect() and .loop_stop() when done."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_slm.mqtt import parse_broker_url

    addr = parse_broker_url(url)
    subscribed = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_queued_messages_set(0)
    if nodelay:
        c.on_socket_open = lambda cl, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(subscriptions)
    c.on_subscribe = lambda cl, u, mid, rc, p: subscribed.set()
    c.on_message = on_message
    c.connect(addr.host, addr.port)
    c.loop_start()
    if not subscribed.wait(timeout):
        c.loop_stop()
        raise RuntimeError(f"could not subscribe to {[t for t, _ in subscriptions]} on {url}")
    return c
