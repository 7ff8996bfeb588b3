"""Device profiles: what a target board has (CPU, memory, storage, OS, TFLite runtime and the op versions it loads).

Data lives in devices/profiles/<name>.toml (runtimes in devices/profiles/runtimes/); never imports TensorFlow.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_slm.errors import ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KINDS = ("linux", "mcu")
MIB = 1 << 20
KIB = 1 << 10

# key -> (type(s), required). Booleans are checked before ints: TOML's true is not a number here.
_LINUX_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "ram_mb": ((int,), True),
    "storage_mb": ((int,), True),
    "python": ((str,), True),
    "runtime_install_mb": ((int, float), True),
}
_MCU_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "sram_kb": ((int,), True),
    "psram_kb": ((int,), True),
    "flash_kb": ((int,), True),
}
_COMMON_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "title": ((str,), True),
    "kind": ((str,), True),
    "arch": ((str,), True),
    "bits": ((int,), True),
    "cores": ((int,), True),
    "core": ((str,), True),
    "clock_mhz": ((int, float), True),
    "os": ((str,), True),
    "runtime": ((str,), True),
    "runtime_version": ((str,), True),
    "dotprod": ((bool,), True),
    "float32_gmacs_per_core": ((int, float), True),
    "int8_gmacs_per_core": ((int, float), True),
    "throughput_basis": ((str,), True),
    "sources": ((dict,), True),
}
# Figures the host profile measures when it loads; host.toml gives everything else.
_HOST_MEASURED = ("arch", "bits", "cores", "ram_mb", "python")


@dataclass(frozen=True)
class RuntimeOps:
    """The ops a TFLite runtime can load: {op: highest version}, None meaning any version (TFLM)."""

    name: str
    version: str
    basis: str  # measured | estimate | table
    method: str
    ops: dict[str, int | None]
    sources: dict[str, str]

    def problems(self, needed: dict[str, int]) -> list[str]:
        """One line per op (or op version) of NEEDED this runtime cannot load, e.g.
        "FULLY_CONNECTED v12 (tflite-runtime 2.14.0 has v10)"."""
        out = []
        for op, version in sorted(needed.items()):
            if op not in self.ops:
                out.append(f"{op} (not in {self.name} {self.version})")
                continue
            limit = self.ops[op]
            if limit is not None and version > limit:
                out.append(f"{op} v{version} ({self.name} {self.version} has v{limit})")
        return out


@dataclass(frozen=True)
class DeviceProfile:
    """One target device. Linux boards have ram_mb/storage_mb/python; MCUs have sram_kb/psram_kb/flash_kb."""

    name: str
    title: str
    kind: str  # linux | mcu
    arch: str
    bits: int
    cores: int
    core: str
    clock_mhz: float
    os: str
    runtime: str
    runtime_version: str
    dotprod: bool
    float32_gmacs_per_core: float
    int8_gmacs_per_core: float
    throughput_basis: str
    runtime_ops: RuntimeOps
    sources: dict[str, str]
    path: Path
    python: str | None = None
    ram_mb: int = 0
    storage_mb: int = 0
    runtime_install_mb: float = 0.0
    sram_kb: int = 0
    psram_kb: int = 0
    flash_kb: int = 0
    measured: tuple[str, ...] = field(default=())  # figures read from the running machine (host)

    @property
    def is_mcu(self) -> bool:
        return self.kind == "mcu"

    @property
    def ram_bytes(self) -> int:
        """Memory a model can use: RAM on Linux boards, SRAM + PSRAM on MCUs."""
        return (self.sram_kb + self.psram_kb) * KIB if self.is_mcu else self.ram_mb * MIB

    @property
    def storage_bytes(self) -> int:
        return self.flash_kb * KIB if self.is_mcu else self.storage_mb * MIB

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("runtime_ops", "path")}
        d["measured"] = list(self.measured)
        d["runtime_ops"] = {"basis": self.runtime_ops.basis, "method": self.runtime_ops.method,
                            "ops": dict(self.runtime_ops.ops)}
        return d


def profiles_dir() -> Path:
    return Path(__file__).with_name("profiles")


def known_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _check(data: dict[str, Any], path: Path, spec: dict[str, tuple[tuple[type, ...], bool]]) -> None:
    for key, (types, required) in spec.items():
        if key not in data:
            if required:
                raise ConfigError(f"{path}: missing key {key!r}")
            continue
        value = data[key]
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok:
            want = " or ".join({"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
                                "dict": "a table"}[t.__name__] for t in types)
            raise ConfigError(f"{path}: {key} must be {want}, got {type(value).__name__} {value!r}")


def load_runtime_ops(runtime: str, version: str) -> RuntimeOps:
    """The op table for RUNTIME VERSION (devices/profiles/runtimes/<runtime>-<version>.toml; TFLM: one file)."""
    base = profiles_dir() / "runtimes"
    path = base / ("tflite-micro.toml" if runtime == "tflite-micro" else f"{runtime}-{version}.toml")
    if not path.is_file():
        have = sorted(p.stem for p in base.glob("*.toml"))
        raise ConfigError(f"no op table for runtime {runtime} {version} ({path}); have {', '.join(have)}")
    data = _read_toml(path)
    allowed = {"name", "version", "basis", "method", "sources", "ops", "ops_from"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    if data.get("ops_from") == "firmware_bridge.tflm_export.TFLM_OPS":
        from firmware_bridge.tflm_export import TFLM_CUSTOM_OPS, TFLM_OPS

        ops: dict[str, int | None] = {op: None for op in TFLM_OPS}
        ops.update({f"CUSTOM:{op}": None for op in TFLM_CUSTOM_OPS})
    else:
        raw = data.get("ops")
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{path}: needs an [ops] table (op = highest version) or ops_from")
        for op, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{path}: ops.{op} must be a positive integer (the highest version), got {v!r}")
        ops = dict(raw)
    file_version = version if runtime == "tflite-micro" else str(data.get("version", version))
    return RuntimeOps(str(data.get("name", runtime)), file_version, str(data.get("basis", "")),
                      str(data.get("method", "")), ops, dict(data.get("sources", {})))


def _host_figures() -> dict[str, Any]:
    """What the running machine says about itself."""
    ram_mb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_mb = int(line.split()[1]) // 1024
                break
    except OSError:
        pass
    if not ram_mb and hasattr(os, "sysconf"):
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB
    machine = platform.machine() or "unknown"
    return {
        "arch": {"AMD64": "x86_64", "arm64": "aarch64"}.get(machine, machine),
        "bits": 64 if sys.maxsize > 2**32 else 32,
        "cores": os.cpu_count() or 1,
        "ram_mb": ram_mb,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def load_profile_file(path: str | Path, name: str | None = None) -> DeviceProfile:
    """Load and validate one profile file; errors name the file and the key."""
    path = Path(path)
    data = _read_toml(path)
    name = name or path.stem
    measured: tuple[str, ...] = ()
    if name == "host":
        clash = sorted(k for k in _HOST_MEASURED if k in data)
        if clash:
            raise ConfigError(f"{path}: {clash[0]} is read from the running machine; remove it from the file")
        data = {**data, **_host_figures()}
        measured = _HOST_MEASURED
        data["sources"] = {**data.get("sources", {}), **{k: "measured at load time from the running machine"
                                                           for k in _HOST_MEASURED}}
    kind = data.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = {**_COMMON_KEYS, **(_MCU_KEYS if kind == "mcu" else _LINUX_KEYS)}
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} for a {kind} profile; allowed: {', '.join(sorted(spec))}")
    _check(data, path, spec)
    sources = data["sources"]
    for key, value in sources.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}: sources.{key} must be a non-empty string (a URL or how the figure was derived)")
    figures = [k for k, (types, _) in spec.items() if k in data and bool not in types and (int in types or float in types)]
    unsourced = [k for k in figures if k not in sources]
    if unsourced:
        raise ConfigError(f"{path}: {unsourced[0]} has no entry in [sources]; every figure cites where it comes from")
    for key in figures:
        if data[key] < 0 or (data[key] == 0 and key not in ("psram_kb",)):
            raise ConfigError(f"{path}: {key} must be positive, got {data[key]!r}")
    ops = load_runtime_ops(data["runtime"], data["runtime_version"])
    kwargs = {k: v for k, v in data.items() if k != "sources"}
    return DeviceProfile(name=name, runtime_ops=ops, sources=dict(sources), path=path, measured=measured, **kwargs)


def load_profile(name: str) -> DeviceProfile:
    """The profile called NAME (devices/profiles/NAME.toml); ConfigError lists the known ones."""
    known = known_profiles()
    if name not in known:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(known)} (edge-slm fit --list)")
    return load_profile_file(profiles_dir() / f"{name}.toml", name)
