"""Fleet-simulation scenarios: frozen dataclasses loaded from TOML, validated on load.

Host side; uses edge_slm.config's schema builder. Must never import TensorFlow or converters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edge_slm.config import _build
from edge_slm.errors import ConfigError
from edge_slm.mqtt import parse_broker_url

INPUT_KINDS = ("text", "sensor")  # voice inputs: not generated yet
MAX_MCU_DEVICES = 32  # each MCU-backed device is a C process, a pty and a reader thread
FAULT_KINDS = ("broker_outage", "latency", "loss", "crash", "serial_noise")
NET_LOOPS = ("thread", "shared")


@dataclass(frozen=True)
class DeviceGroup:
    """`count` devices running `model` (a package dir) on generated `kind` inputs at `rate` inputs/s each.

    kind "sensor": each device is its own simulated machine (converters.datasets.vibration), a
    `faulty` fraction of them with a fault, streaming blocks of samples at `rate` blocks/s; with
    `mcu = true` the samples come instead from a virtual MCU (firmware_bridge/c/virtual_mcu.c) per
    device on a pty, read by the agent's SerialSource (blocks at the MCU's own rate: 50/s).
    """

    model: str
    count: int = 10
    kind: str = "text"
    rate: float = 1.0
    pipeline: str = "intent"
    id_prefix: str = ""  # default: the scenario's id_prefix plus the group's index
    faulty: float = 0.0  # sensor: fraction of the group's machines that run with a fault
    mcu: bool = False  # sensor: samples from a virtual MCU process per device, over a pty


@dataclass(frozen=True)
class Fault:
    """One fault window. kind: broker_outage | latency | loss | crash | serial_noise.

    latency: latency_ms/jitter_ms from at_s for duration_s; loss: `loss` (0..1) likewise; crash:
    `devices` devices (a count >= 1, or a fraction < 1) die at at_s and come back restart_after_s later;
    serial_noise: every MCU-backed device's serial line corrupts each byte with probability `corrupt`,
    for the whole run (at_s = 0, duration_s = 0), or from at_s for duration_s: the virtual MCU's rate is
    fixed per process, so a window restarts (replugs) each MCU with the new rate and again at its end.
    """

    kind: str
    at_s: float = 0.0
    duration_s: float = 0.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    devices: float = 1.0
    restart_after_s: float = 2.0
    corrupt: float = 0.0

    def crash_count(self, total: int) -> int:
        if self.devices >= 1:
            return min(total, int(self.devices))
        return min(total, max(1, round(self.devices * total)))


@dataclass(frozen=True)
class Scenario:
    devices: list[DeviceGroup]
    name: str = "fleet"
    duration_s: float = 20.0
    seed: int = 0
    broker: str = "embedded"  # mqtt://HOST:PORT, or "embedded" for an amqtt broker in this process
    protocol: str = "auto"  # "5", "3.1.1", or auto: 3.1.1 for the embedded broker, else 5
    qos: int = 1
    workers: int = 1
    id_prefix: str = "sim"
    net_loop: str = "thread"  # thread: one paho network thread per device (the agent's own); shared: one per worker
    outbox: bool = True
    drain_s: float = 30.0  # after the last input: how long to wait for outstanding results
    allowed_loss: float = 0.0  # fraction of inputs that may go missing and still pass
    faults: list[Fault] = field(default_factory=list)

    @property
    def mqtt_protocol(self) -> str:
        if self.protocol != "auto":
            return self.protocol
        return "3.1.1" if self.broker == "embedded" else "5"

    @property
    def total_devices(self) -> int:
        return sum(g.count for g in self.devices)

    def group_prefix(self, index: int) -> str:
        g = self.devices[index]
        return g.id_prefix or (self.id_prefix if len(self.devices) == 1 else f"{self.id_prefix}{index + 1}")

    def device_ids(self) -> list[tuple[int, str]]:
        """(group index, device id) for every device, in a stable order."""
        out = []
        for gi, g in enumerate(self.devices):
            width = max(3, len(str(g.count)))
            out += [(gi, f"{self.group_prefix(gi)}-{i + 1:0{width}d}") for i in range(g.count)]
        return out

    @property
    def serial_corrupt(self) -> float:
        """The per-byte corruption rate of the MCU-backed devices' serial lines (0: clean)."""
        return max((f.corrupt for f in self.faults if f.kind == "serial_noise" and not f.duration_s), default=0.0)

    def serial_windows(self) -> list[tuple[float, float, float]]:
        """(at_s, end_s, corrupt) of the windowed serial_noise faults, in time order."""
        return sorted((f.at_s, f.at_s + f.duration_s, f.corrupt) for f in self.faults
                      if f.kind == "serial_noise" and f.duration_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(x: float, key: str, where: str, lo: float = 0.0, hi: float = math.inf) -> None:
    if not (math.isfinite(x) and lo <= x <= hi):
        raise ConfigError(f"{where}: {key} must be between {lo:g} and {hi:g}, got {x!r}")


def _check(s: Scenario, where: str) -> None:
    if s.broker != "embedded":
        try:
            parse_broker_url(s.broker)
        except ConfigError as exc:
            raise ConfigError(f"{where}: broker: {exc}; or use \"embedded\"") from None
    if s.protocol not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"{where}: protocol must be \"auto\", \"5\" or \"3.1.1\", got {s.protocol!r}")
    if s.broker == "embedded" and s.mqtt_protocol == "5":
        raise ConfigError(f"{where}: the embedded amqtt broker speaks MQTT 3.1.1 only; set protocol = \"3.1.1\"")
    if s.qos not in (0, 1):
        raise ConfigError(f"{where}: qos must be 0 or 1, got {s.qos}")
    if not 1 <= s.workers <= 64:
        raise ConfigError(f"{where}: workers must be 1..64, got {s.workers}")
    if s.net_loop not in NET_LOOPS:
        raise ConfigError(f"{where}: net_loop must be one of {', '.join(NET_LOOPS)}, got {s.net_loop!r}")
    _finite(s.duration_s, "duration_s", where, 0.1, 7 * 24 * 3600)
    _finite(s.drain_s, "drain_s", where, 0.0, 3600)
    _finite(s.allowed_loss, "allowed_loss", where, 0.0, 1.0)
    if not s.id_prefix or "/" in s.id_prefix or "+" in s.id_prefix or "#" in s.id_prefix:
        raise ConfigError(f"{where}: id_prefix must be non-empty without '/', '+' or '#', got {s.id_prefix!r}")
    if not s.devices:
        raise ConfigError(f"{where}: at least one [[devices]] group is needed")
    for i, g in enumerate(s.devices):
        key = f"devices[{i}]"
        if g.kind not in INPUT_KINDS:
            raise ConfigError(f"{where}: {key}.kind must be one of {', '.join(INPUT_KINDS)}, got {g.kind!r}")
        if not 1 <= g.count <= 100_000:
            raise ConfigError(f"{where}: {key}.count must be 1..100000, got {g.count}")
        _finite(g.rate, f"{key}.rate", where, 0.001, 1000.0)
        if not g.model:
            raise ConfigError(f"{where}: {key}.model must name a model package directory")
        if not g.pipeline or any(c in g.pipeline for c in "/+#"):
            raise ConfigError(f"{where}: {key}.pipeline must be non-empty without '/', '+' or '#'")
        if any(c in g.id_prefix for c in "/+#"):
            raise ConfigError(f"{where}: {key}.id_prefix must not contain '/', '+' or '#'")
        _finite(g.faulty, f"{key}.faulty", where, 0.0, 1.0)
        if g.kind != "sensor" and (g.mcu or g.faulty):
            raise ConfigError(f"{where}: {key}: mcu and faulty apply to sensor devices; set kind = \"sensor\"")
    n_mcu = sum(g.count for g in s.devices if g.mcu)
    if n_mcu > MAX_MCU_DEVICES:
        raise ConfigError(f"{where}: {n_mcu} MCU-backed devices; each is a process, a pty and a thread, keep "
                          f"them to {MAX_MCU_DEVICES} (plain sensor devices scale like text ones)")
    windows = sorted((f.at_s, f.at_s + f.duration_s) for f in s.faults if f.kind == "serial_noise" and f.duration_s)
    if any(b[0] < a[1] for a, b in zip(windows, windows[1:])):
        raise ConfigError(f"{where}: serial_noise windows overlap; each restarts the MCUs, give them separate times")
    ids = [d for _, d in s.device_ids()]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: device ids collide between groups; give each group its own id_prefix")
    for i, f in enumerate(s.faults):
        key = f"faults[{i}]"
        if f.kind not in FAULT_KINDS:
            raise ConfigError(f"{where}: {key}.kind must be one of {', '.join(FAULT_KINDS)}, got {f.kind!r}")
        _finite(f.at_s, f"{key}.at_s", where, 0.0, s.duration_s)
        _finite(f.duration_s, f"{key}.duration_s", where, 0.0, 7 * 24 * 3600)
        _finite(f.latency_ms, f"{key}.latency_ms", where, 0.0, 600_000)
        _finite(f.jitter_ms, f"{key}.jitter_ms", where, 0.0, 600_000)
        _finite(f.loss, f"{key}.loss", where, 0.0, 1.0)
        _finite(f.restart_after_s, f"{key}.restart_after_s", where, 0.0, 3600)
        _finite(f.devices, f"{key}.devices", where, 0.0, 1e9)
        if f.kind in ("broker_outage", "latency", "loss") and f.duration_s <= 0:
            raise ConfigError(f"{where}: {key} ({f.kind}) needs duration_s > 0")
        if f.kind == "latency" and f.latency_ms <= 0 and f.jitter_ms <= 0:
            raise ConfigError(f"{where}: {key} (latency) needs latency_ms or jitter_ms > 0")
        if f.kind == "loss" and f.loss <= 0:
            raise ConfigError(f"{where}: {key} (loss) needs loss > 0 (a fraction, e.g. 0.05)")
        if f.kind == "crash" and (f.devices <= 0 or (f.devices >= 1 and f.devices != int(f.devices))):
            raise ConfigError(f"{where}: {key}.devices must be a whole count >= 1 or a fraction below 1, got {f.devices!r}")
        if f.kind == "serial_noise":
            if not n_mcu:
                raise ConfigError(f"{where}: {key}: serial_noise needs MCU-backed devices; set mcu = true on a "
                                  "sensor group, or remove the fault")
            _finite(f.corrupt, f"{key}.corrupt", where, 0.0, 0.1)
            if f.corrupt <= 0:
                raise ConfigError(f"{where}: {key} (serial_noise) needs corrupt > 0 (a per-byte probability, "
                                  "e.g. 2e-5)")
            if f.at_s != 0 and f.duration_s <= 0:
                raise ConfigError(f"{where}: {key}: a serial_noise window needs duration_s > 0 (or neither at_s "
                                  "nor duration_s: noise for the whole run)")


def scenario_from_dict(data: dict[str, Any], where: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    """Build and validate a Scenario; `[devices]` (one table) or `[[devices]]` (groups) both work.

    Relative model paths are resolved against base_dir. ConfigError names the file and key path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a scenario must be a table")
    data = dict(data)
    if isinstance(data.get("devices"), dict):
        data["devices"] = [data["devices"]]
    if "devices" not in data:
        raise ConfigError(f"{where}: missing required key 'devices' (a [devices] table with model = PACKAGE_DIR)")
    s = _build(Scenario, data, "", where)
    if base_dir is not None:
        groups = [g if Path(g.model).is_absolute() or not g.model else
                  DeviceGroup(**(asdict(g) | {"model": str((base_dir / g.model).resolve())})) for g in s.devices]
        s = Scenario(**(asdict(s) | {"devices": groups, "faults": s.faults}))
    _check(s, where)
    return s


def load_scenario(path: str | Path) -> Scenario:
    """Read SCENARIO.toml; ConfigError (naming the file) if it is missing, not TOML, or not a valid scenario."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"scenario file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read scenario {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return scenario_from_dict(data, str(p), p.parent.resolve())
