"""Device profiles: every shipped profile loads, every figure cites a source, bad files name the key."""

from __future__ import annotations

import os
import shutil

import pytest

from devices.profiles import (
    DeviceProfile,
    known_profiles,
    load_profile,
    load_profile_file,
    load_runtime_ops,
    profiles_dir,
)
from edge_slm.errors import ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

EXPECTED = {"pi-zero-2w", "pi-3b", "pi-4b", "pi-5", "jetson-orin-nano", "jetson-jp5", "esp32-s3", "nrf52840", "host"}


def test_every_expected_profile_loads_with_the_fields_bundles_read():
    assert set(known_profiles()) == EXPECTED
    for name in known_profiles():
        p = load_profile(name)
        assert isinstance(p, DeviceProfile) and p.name == name
        assert p.arch and p.os and p.runtime and p.runtime_version and p.core
        assert p.cores >= 1 and p.clock_mhz > 0 and p.ram_bytes > 0 and p.storage_bytes > 0
        assert p.float32_gmacs_per_core > 0 and p.int8_gmacs_per_core > 0
        assert p.runtime_ops.ops, f"{name}: empty op table"
        if p.is_mcu:
            assert p.python is None and p.runtime == "tflite-micro" and p.flash_kb > 0
        else:
            assert p.python and p.python.startswith("3.") and p.ram_mb > 0


def test_runtimes_match_what_each_os_can_install():
    expect = {"pi-zero-2w": ("ai-edge-litert", "2.3.0", "3.11"), "pi-3b": ("tflite-runtime", "2.14.0", "3.11"),
              "pi-4b": ("ai-edge-litert", "2.3.0", "3.11"), "pi-5": ("ai-edge-litert", "2.3.0", "3.11"),
              "jetson-orin-nano": ("ai-edge-litert", "2.3.0", "3.10"), "jetson-jp5": ("tflite-runtime", "2.13.0", "3.8")}
    for name, (runtime, version, python) in expect.items():
        p = load_profile(name)
        assert (p.runtime, p.runtime_version, p.python) == (runtime, version, python), name
    assert load_profile("pi-3b").bits == 32 and load_profile("pi-3b").arch == "armv7l"
    dotprod = {n: load_profile(n).dotprod for n in EXPECTED}
    assert dotprod["pi-5"] and dotprod["jetson-orin-nano"] and dotprod["jetson-jp5"]
    assert not dotprod["pi-4b"] and not dotprod["pi-3b"] and not dotprod["pi-zero-2w"]


def test_host_profile_is_read_from_this_machine():
    p = load_profile("host")
    assert p.cores == os.cpu_count()
    meminfo = next(line for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert p.ram_mb == int(meminfo.split()[1]) // 1024
    assert set(p.measured) >= {"cores", "ram_mb", "arch", "python"}
    assert all(k in p.sources for k in p.measured)


def test_every_numeric_figure_cites_a_source():
    for path in sorted(profiles_dir().glob("*.toml")):
        data = tomllib.loads(path.read_text())
        sources = data["sources"]
        numeric = [k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert numeric, path
        missing = [k for k in numeric if k not in sources]
        assert not missing, f"{path.name}: no source for {missing}"
        for key in numeric:
            assert "http" in sources[key] or "estimate" in sources[key] or "measured" in sources[key] \
                or "assumption" in sources[key], f"{path.name}: sources.{key} = {sources[key]!r}"
        if data.get("throughput_basis") == "estimate":
            assert "estimate" in sources["float32_gmacs_per_core"] and "estimate" in sources["int8_gmacs_per_core"]


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("pi-6")
    msg = str(err.value)
    assert "pi-6" in msg
    for name in EXPECTED:
        assert name in msg


def _copy(tmp_path, name: str = "pi-4b"):  # noqa: ANN202
    dest = tmp_path / f"{name}.toml"
    shutil.copy(profiles_dir() / f"{name}.toml", dest)
    return dest


def test_unknown_key_wrong_type_and_missing_source_name_the_key_and_file(tmp_path):
    path = _copy(tmp_path)
    path.write_text(path.read_text().replace("cores = 4\n", "cores = 4\ngpu_cores = 128\n"))
    with pytest.raises(ConfigError) as err:
        load_profile_file(path)
    assert "gpu_cores" in str(err.value) and str(path) in str(err.value)

    path = _copy(tmp_path)
    path.write_text(path.read_text().replace("cores = 4\n", 'cores = "four"\n'))
    with pytest.raises(ConfigError) as err:
        load_profile_file(path)
    assert "cores" in str(err.value) and "integer" in str(err.value) and str(path) in str(err.value)

    path = _copy(tmp_path)
    path.write_text(path.read_text().replace("dotprod = false\n", 'dotprod = "no"\n'))
    with pytest.raises(ConfigError, match="dotprod must be true/false"):
        load_profile_file(path)

    path = _copy(tmp_path)
    text = path.read_text()
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("clock_mhz = \"")))
    with pytest.raises(ConfigError, match="clock_mhz has no entry in \\[sources\\]"):
        load_profile_file(path)

    path = _copy(tmp_path, "nrf52840")
    path.write_text(path.read_text().replace("flash_kb = 1024\n", ""))
    with pytest.raises(ConfigError, match="missing key 'flash_kb'"):
        load_profile_file(path)


def test_op_tables_know_which_fully_connected_each_runtime_loads():
    litert = load_runtime_ops("ai-edge-litert", "2.3.0")
    old = load_runtime_ops("tflite-runtime", "2.14.0")
    assert litert.basis == "measured" and old.basis == "measured"
    assert litert.ops["FULLY_CONNECTED"] >= 12
    assert old.ops["FULLY_CONNECTED"] < 12
    assert old.problems({"FULLY_CONNECTED": 12, "SOFTMAX": 1}) == [
        f"FULLY_CONNECTED v12 (tflite-runtime 2.14.0 has v{old.ops['FULLY_CONNECTED']})"]
    assert litert.problems({"FULLY_CONNECTED": 12, "SOFTMAX": 1}) == []
    # the newer runtime loads every op version the older one does
    for op, version in old.ops.items():
        assert litert.ops.get(op, 0) >= version, op
    tflm = load_profile("nrf52840").runtime_ops
    assert tflm.problems({"FULLY_CONNECTED": 12, "CONV_2D": 6}) == []
    assert tflm.problems({"GELU": 1}) == ["GELU (not in tflite-micro cmsis-nn)"]
    with pytest.raises(ConfigError, match="no op table"):
        load_runtime_ops("tflite-runtime", "1.0.0")
