"""`edge-slm doctor`: check that this device can run the agent (Python, numpy, runtime, models, broker, I/O, disk).

Device side: standard library, numpy, paho-mqtt and edge_slm only; never TensorFlow, converters or devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm import __version__
from edge_slm.errors import EdgeSlmError
from edge_slm.table import format_table

OK, WARN, FAIL = "ok", "warn", "fail"
BACKEND_DISTRIBUTIONS = {"ai-edge-litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime",
                         "tensorflow": "tensorflow"}
MIN_FREE_WARN = 200 * 1024 * 1024
MIN_FREE_FAIL = 20 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the doctor's report; fix says what to do when status is not ok."""

    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _runtime_fix() -> str:
    if platform.machine() in ("armv7l", "armv6l"):
        return "pip install 'tflite-runtime==2.14.0' 'numpy<2' (32-bit ARM has no ai-edge-litert wheels)"
    return "pip install ai-edge-litert"


def check_python() -> Check:
    v = sys.version_info
    text = f"{platform.python_implementation()} {v.major}.{v.minor}.{v.micro} on {platform.machine()} ({sys.executable})"
    if v < (3, 10):
        return Check("python", FAIL, text, "edge-slm needs Python 3.10 or newer: install python3.11 and reinstall")
    return Check("python", OK, text)


def check_numpy(backend: str | None) -> Check:
    major = int(np.__version__.split(".")[0])
    if backend == "tflite-runtime" and major >= 2:
        return Check("numpy", FAIL, f"numpy {np.__version__} with tflite-runtime",
                     "tflite-runtime wheels need numpy 1.x: pip install 'numpy<2'")
    return Check("numpy", OK, f"numpy {np.__version__}")


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def check_runtime(preferred: str = "") -> tuple[Check, str | None]:
    """Which TFLite interpreter imports here (the one the agent would use) and its version."""
    from edge_slm import runtime

    names = [preferred] if preferred else list(runtime.BACKENDS)
    errors = []
    for name in names:
        try:
            runtime._import_backend(name)  # noqa: SLF001 - the same import the agent does
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        # find_spec, not import: importing tensorflow just to list it costs seconds and hundreds of MB
        others = [n for n in runtime.BACKENDS if n != name
                  and importlib.util.find_spec(runtime.BACKENDS[n].split(".")[0]) is not None]
        detail = f"{name} {_dist_version(BACKEND_DISTRIBUTIONS[name])}"
        if others:
            detail += f" (also installed: {', '.join(others)})"
        status = WARN if name == "tensorflow" else OK
        fix = "full TensorFlow works but is heavy on a device: " + _runtime_fix() if status == WARN else ""
        return Check("tflite runtime", status, detail, fix), name
    return Check("tflite runtime", FAIL, "none imports (" + "; ".join(errors) + ")", _runtime_fix()), None


def check_package(path: str, backend: str | None) -> list[Check]:
    """Open a package (sha256, schema), load it with the runtime, compare its ops, run one inference."""
    from edge_slm import runtime
    from edge_slm.package import ModelPackage

    label = f"model {Path(path).name}"
    try:
        pkg = ModelPackage.open(path)
    except EdgeSlmError as exc:
        return [Check(label, FAIL, str(exc), "re-copy the package (edge-slm deploy) or re-convert it")]
    label = f"model {pkg.name} {pkg.version}"
    if backend is None:
        return [Check(label, FAIL, "no TFLite runtime to load it with", _runtime_fix())]
    try:
        model = runtime.load(pkg.model_path, backend=backend, threads=1)
    except EdgeSlmError as exc:
        return [Check(label, FAIL, f"{backend} cannot load it: {exc}",
                      "the model uses ops or op versions this runtime lacks: upgrade the runtime "
                      "(pip install -U ai-edge-litert) or convert for this target (edge-slm convert --target ...)")]
    checks = []
    needed = pkg.manifest.get("min_runtime", {}).get("ops", {})
    have = set(model.op_names())
    ops_text = ", ".join(f"{k} v{v}" for k, v in sorted(needed.items())) if needed else "not listed in the manifest"
    missing = sorted(op for op in needed if have and op not in have and not op.startswith("CUSTOM:"))
    if missing:
        checks.append(Check(f"{label} ops", WARN, f"manifest lists {', '.join(missing)} that {backend} did not report",
                            "re-convert the package with this edge-slm version"))
    else:
        checks.append(Check(f"{label} ops", OK, f"{len(needed)} ops resolved by {backend}: {ops_text}"))
    try:
        # ones, not zeros: a text model's all-zero attention mask is not an input it ever sees
        feeds = [np.ones(t.shape, dtype=np.float32 if t.quantized else t.dtype) for t in model.inputs]
        t0 = time.perf_counter()
        outs = model.run(*feeds)
        ms = (time.perf_counter() - t0) * 1000
    except Exception as exc:  # noqa: BLE001 - any interpreter failure is the finding
        return [*checks, Check(label, FAIL, f"inference failed with {backend}: {exc}",
                               "run edge-slm validate on the package for details")]
    if not all(np.all(np.isfinite(np.asarray(o, dtype=np.float64))) for o in outs):
        return [*checks, Check(label, FAIL, "inference gave NaN/inf", "re-convert the package")]
    checks.insert(0, Check(label, OK, f"{pkg.task}, sha256 ok, one inference in {ms:.1f} ms with {backend}"))
    return checks


def check_broker(url: str, username: str = "", password: str = "", ca_file: str = "", cert_file: str = "",
                 key_file: str = "", timeout: float = 5.0) -> Check:
    """TCP connect, then a real MQTT CONNECT with paho, each bounded by timeout."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_slm.mqtt import parse_broker_url

    name = f"broker {url}"
    try:
        addr = parse_broker_url(url)
    except EdgeSlmError as exc:
        return Check(name, FAIL, str(exc), "set [mqtt] broker = \"mqtt://HOST:PORT\" in the agent config")
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout):
            pass
    except OSError as exc:
        return Check(name, FAIL, f"TCP connect to {addr.host}:{addr.port} failed: {exc.strerror or exc}",
                     "start the broker (systemctl start mosquitto), check the address and port, and that a "
                     "firewall lets this device through")
    result: dict[str, Any] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-slm-doctor-{os.getpid()}",
                         protocol=paho.MQTTv311)
    if username:
        client.username_pw_set(username, password or None)
    if addr.tls:
        client.tls_set(ca_certs=ca_file or None, certfile=cert_file or None, keyfile=key_file or None)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        result["rc"] = reason_code

    client.on_connect = on_connect
    t0 = time.monotonic()
    try:
        client.connect(addr.host, addr.port, keepalive=max(5, int(timeout) * 2))
        while "rc" not in result and time.monotonic() - t0 < timeout:
            client.loop(0.1)
    except (OSError, ValueError) as exc:
        return Check(name, FAIL, f"MQTT connect failed: {exc}",
                     "for mqtts:// check ca_file/cert_file/key_file and the broker's certificate")
    finally:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001, S110 - closing a half-open connection
            pass
    rc = result.get("rc")
    if rc is None:
        return Check(name, FAIL, f"TCP ok but no CONNACK within {timeout:.0f}s: is this an MQTT broker?",
                     "point [mqtt] broker at the MQTT port (1883, or 8883 with mqtts://)")
    if rc.is_failure:
        return Check(name, FAIL, f"broker refused the connection: {rc}",
                     "check [mqtt] username/password and the broker's ACL")
    return Check(name, OK, f"MQTT CONNACK in {1000 * (time.monotonic() - t0):.0f} ms")


def check_audio(needed: bool) -> Check:
    try:
        import sounddevice
    except ImportError:
        return Check("audio input", FAIL if needed else WARN, "sounddevice not installed",
                     "pip install 'edge-slm[audio]'")
    except OSError as exc:  # sounddevice imports but PortAudio is missing
        return Check("audio input", FAIL if needed else WARN, f"PortAudio missing: {exc}",
                     "apt-get install libportaudio2")
    try:
        inputs = [d["name"] for d in sounddevice.query_devices() if d.get("max_input_channels", 0) > 0]
    except Exception as exc:  # noqa: BLE001 - PortAudio errors are not a stable type
        return Check("audio input", FAIL if needed else WARN, f"cannot list devices: {exc}", "check ALSA/PulseAudio")
    if not inputs:
        return Check("audio input", FAIL if needed else WARN, "no input devices",
                     "plug in a microphone; the agent's user needs the audio group")
    return Check("audio input", OK, f"{len(inputs)} input device(s): {', '.join(inputs[:3])}")


def check_serial(ports_needed: Iterable[str]) -> list[Check]:
    needed = list(ports_needed)
    try:
        from serial.tools import list_ports
    except ImportError:
        return [Check("serial ports", FAIL if needed else WARN, "pyserial not installed",
                      "pip install 'edge-slm[serial]'")]
    found = [p.device for p in list_ports.comports()]
    checks = [Check("serial ports", OK, ", ".join(found) if found else "none found")]
    for dev in needed:
        if not os.path.exists(dev):
            checks.append(Check(f"serial {dev}", FAIL, "does not exist",
                                f"plug the board in; ports seen: {', '.join(found) or 'none'}"))
        elif not os.access(dev, os.R_OK | os.W_OK):
            checks.append(Check(f"serial {dev}", FAIL, "no read/write permission",
                                "add the agent's user to the dialout group: usermod -aG dialout USER"))
        else:
            checks.append(Check(f"serial {dev}", OK, "present and writable"))
    return checks


def check_disk(state_dir: str) -> Check:
    path = Path(state_dir).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        return Check("disk", FAIL, f"cannot stat {probe}: {exc}", f"create {path}")
    writable = os.access(probe, os.W_OK)
    detail = f"{free / 2**20:.0f} MiB free at {probe}" + ("" if path.exists() else f" ({path} will be created)")
    if not writable:
        return Check("disk", FAIL, detail + ", not writable", f"make {path} writable by the agent's user")
    if free < MIN_FREE_FAIL:
        return Check("disk", FAIL, detail, "free some space: the outbox and model updates live here")
    if free < MIN_FREE_WARN:
        return Check("disk", WARN, detail, "less than 200 MiB: lower outbox.max_bytes or free space")
    return Check("disk", OK, detail)


def run_checks(config_path: str | os.PathLike[str] | None = None, broker: str | None = None,
               packages: Iterable[str] = (), timeout: float = 5.0) -> list[Check]:
    """Every check, in the order a person fixes them: interpreter, runtime, config, models, broker, I/O, disk."""
    from edge_slm.config import load_agent_config

    checks = [check_python(), Check("edge-slm", OK, f"edge-slm {__version__}")]
    cfg = None
    if config_path is not None:
        try:
            cfg = load_agent_config(config_path)
            checks.append(Check("config", OK, f"{config_path}: device {cfg.device_id}, "
                                f"{len(cfg.pipelines)} pipeline(s)"))
        except EdgeSlmError as exc:
            checks.append(Check("config", FAIL, str(exc), "fix the key the message names"))
    rt_check, backend = check_runtime(cfg.runtime if cfg else "")
    checks.insert(1, check_numpy(backend))
    checks.insert(2, rt_check)
    paths = list(packages) + ([p.model for p in cfg.pipelines] if cfg else [])
    for path in dict.fromkeys(paths):
        checks.extend(check_package(path, backend))
    url = broker or (cfg.mqtt.broker if cfg and cfg.uses_mqtt() else None)
    if url:
        m = cfg.mqtt if cfg else None
        checks.append(check_broker(url, m.username if m else "", m.password if m else "", m.ca_file if m else "",
                                   m.cert_file if m else "", m.key_file if m else "", timeout=timeout))
    sources = [p.source for p in cfg.pipelines] if cfg else []
    checks.append(check_audio(any(s.startswith("microphone:") for s in sources)))
    serial_devs = [s.removeprefix("serial://").split("?")[0] for s in sources if s.startswith("serial://")]
    checks.extend(check_serial([d for d in serial_devs if d.startswith("/")]))
    checks.append(check_disk(cfg.state_dir if cfg else "~/.local/state/edge-slm"))
    return checks


def format_checks(checks: list[Check]) -> str:
    rows = [(c.status.upper(), c.name, c.detail, c.fix if c.status != OK else "") for c in checks]
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    summary = f"\n{len(checks)} checks: {failed} failed, {warned} warnings"
    return format_table(["status", "check", "detail", "fix"], rows) + summary


# --- CLI -----------------------------------------------------------------------------------------
DOCTOR_EPILOG = """examples:
  edge-slm doctor                                  interpreter, runtime, audio, serial, disk
  edge-slm doctor /etc/edge-slm/agent.toml         also the config's models and its broker
  edge-slm doctor --package intents_pkg --broker mqtt://192.168.1.10:1883
  edge-slm doctor agent.toml --json                the same as JSON for scripts

Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed.
"""


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.config, broker=args.broker, packages=args.package or [], timeout=args.timeout)
    if args.json:
        print(json.dumps({"ok": not any(c.status == FAIL for c in checks),
                          "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("doctor", help="check this device: Python, numpy, TFLite runtime, models, broker, "
                              "audio, serial, disk", formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=DOCTOR_EPILOG, description="Check that this machine can run the edge-slm agent.")
    p.add_argument("config", nargs="?", metavar="AGENT.toml", help="agent config to check (models, broker, sources)")
    p.add_argument("--broker", help="broker URL to try (default: the config's)")
    p.add_argument("--package", action="append", metavar="PKG", help="model package to load and run (repeatable)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each network check (default: 5)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)
