"""devices.scenario: TOML scenarios validated on load; unknown keys and bad values named with file and key path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.scenario import FAULT_KINDS, Scenario, load_scenario, scenario_from_dict
from devices.simulator import plan_crashes
from edge_slm.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"

MINIMAL = """
name = "t"
duration_s = 10
[devices]
model = "pkg"
count = 4
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "scenario.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_scenarios_load(path: Path) -> None:
    s = load_scenario(path)
    assert s.total_devices >= 20
    assert all(Path(g.model).is_absolute() for g in s.devices)


def test_minimal_scenario_gets_defaults_and_resolves_model_next_to_the_file(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, MINIMAL))
    assert s.broker == "embedded" and s.mqtt_protocol == "3.1.1" and s.qos == 1 and s.faults == []
    assert s.devices[0].model == str((tmp_path / "pkg").resolve())
    assert [d for _, d in s.device_ids()] == ["sim-001", "sim-002", "sim-003", "sim-004"]


@pytest.mark.parametrize("extra, key", [
    ("colour = 1\n", "colour"),
    ("[devices.sub]\nx = 1\n", "devices[0].sub"),
    ("[[faults]]\nkind = 'crash'\nat_s = 1\nrestart = 2\n", "faults[0].restart"),
])
def test_unknown_key_is_named_with_the_file(tmp_path: Path, extra: str, key: str) -> None:
    text = MINIMAL.replace("[devices]", extra + "[devices]") if not extra.startswith("[devices.") else MINIMAL + extra
    if extra.startswith("[["):
        text = MINIMAL + extra
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_scenario(path)
    assert f"unknown key {key!r}" in str(exc.value)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("patch, words", [
    ('duration_s = "long"', ["duration_s", "a number"]),
    ('duration_s = -1', ["duration_s", "between"]),
    ('protocol = "5"', ["embedded", "3.1.1"]),
    ('broker = "http://x"', ["broker", "mqtt://"]),
    ('qos = 2', ["qos"]),
    ('net_loop = "fast"', ["net_loop", "shared"]),
])
def test_bad_values_say_what_is_expected(tmp_path: Path, patch: str, words: list[str]) -> None:
    key = patch.split(" =")[0]
    text = "\n".join(patch if line.startswith(key + " =") else line for line in MINIMAL.splitlines())
    if patch not in text:
        text = patch + "\n" + text
    with pytest.raises(ConfigError) as exc:
        load_scenario(write(tmp_path, text))
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("fault, words", [
    ("kind = 'flood'\nat_s = 1", ["faults[0].kind", "broker_outage"]),
    ("kind = 'broker_outage'\nat_s = 1", ["faults[0]", "duration_s > 0"]),
    ("kind = 'latency'\nat_s = 1\nduration_s = 2", ["latency_ms"]),
    ("kind = 'loss'\nat_s = 1\nduration_s = 2\nloss = 1.5", ["faults[0].loss", "between"]),
    ("kind = 'crash'\nat_s = 20", ["faults[0].at_s"]),
    ("kind = 'crash'\nat_s = 1\ndevices = 2.5", ["whole count"]),
    ("kind = 'serial_noise'\ncorrupt = 0.01", ["MCU"]),
])
def test_bad_faults_are_refused(tmp_path: Path, fault: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_scenario(write(tmp_path, MINIMAL + "[[faults]]\n" + fault + "\n"))
    for w in words:
        assert w in str(exc.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_scenario(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_scenario(write(tmp_path, "name = "))


def test_groups_get_distinct_ids_and_colliding_prefixes_are_refused() -> None:
    s = scenario_from_dict({"devices": [{"model": "/m", "count": 2}, {"model": "/m", "count": 3}]})
    ids = [d for _, d in s.device_ids()]
    assert len(set(ids)) == 5 and ids[0].startswith("sim1-") and ids[-1].startswith("sim2-")
    with pytest.raises(ConfigError, match="collide"):
        scenario_from_dict({"devices": [{"model": "/m", "count": 2, "id_prefix": "a"},
                                        {"model": "/m", "count": 2, "id_prefix": "a"}]})


def test_crash_plan_counts_and_fractions_are_seeded() -> None:
    s = scenario_from_dict({"seed": 3, "devices": {"model": "/m", "count": 40}, "faults": [
        {"kind": "crash", "at_s": 1, "devices": 3}, {"kind": "crash", "at_s": 2, "devices": 0.25}]})
    plan = plan_crashes(s)
    assert sum(len(v) for v in plan.values()) == 3 + 10
    assert plan == plan_crashes(s)
    assert set(plan) <= {d for _, d in s.device_ids()}


# --------------------------------------------------------------------------------------------------
# hypothesis: any table either builds a valid Scenario or raises ConfigError, never anything else
# --------------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12))
fault_tables = st.fixed_dictionaries({"kind": st.one_of(st.sampled_from(FAULT_KINDS), st.text(max_size=8))}, optional={
    "at_s": st.one_of(st.floats(-5, 50), scalars), "duration_s": st.floats(-1, 30),
    "latency_ms": st.floats(-1, 500), "loss": st.floats(-0.5, 1.5), "devices": st.floats(0, 30),
    "restart_after_s": st.floats(0, 10), "bogus": scalars})
group_tables = st.fixed_dictionaries({"model": st.one_of(st.just("/pkg"), scalars)}, optional={
    "count": st.one_of(st.integers(-2, 50), scalars), "rate": st.one_of(st.floats(-1, 20), scalars),
    "kind": st.sampled_from(["text", "voice", 3]), "id_prefix": st.text(max_size=4)})
scenario_tables = st.fixed_dictionaries({"devices": st.one_of(group_tables, st.lists(group_tables, max_size=3), scalars)},
                                        optional={
    "duration_s": st.one_of(st.floats(-1, 100), scalars), "seed": scalars, "qos": st.integers(-1, 3),
    "broker": st.sampled_from(["embedded", "mqtt://127.0.0.1:1883", "mqtt://", "tcp://x"]),
    "protocol": st.sampled_from(["auto", "5", "3.1.1", "4"]), "workers": st.integers(-1, 100),
    "faults": st.one_of(st.lists(fault_tables, max_size=3), scalars), "extra": scalars})


@settings(max_examples=300, deadline=None)
@given(scenario_tables)
def test_any_table_builds_a_valid_scenario_or_raises_config_error(data: dict) -> None:
    try:
        s = scenario_from_dict(data, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")
        return
    assert isinstance(s, Scenario)
    assert 0.1 <= s.duration_s and math.isfinite(s.duration_s)
    assert s.total_devices >= 1 and all(g.kind == "text" and g.rate > 0 for g in s.devices)
    assert all(0 <= f.at_s <= s.duration_s and f.kind in FAULT_KINDS for f in s.faults)
    assert not (s.broker == "embedded" and s.mqtt_protocol == "5")
    ids = [d for _, d in s.device_ids()]
    assert len(ids) == len(set(ids)) == s.total_devices


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.floats(0.1, 600), st.floats(0.01, 50), st.integers(0, 2**31))
def test_valid_values_come_back_unchanged(count: int, duration: float, rate: float, seed: int) -> None:
    s = scenario_from_dict({"duration_s": duration, "seed": seed, "devices": {"model": "/p", "count": count,
                                                                              "rate": rate}})
    assert (s.duration_s, s.seed, s.devices[0].count, s.devices[0].rate) == (duration, seed, count, rate)


SENSORS = """
duration_s = 10
[[devices]]
model = "pkg"
kind = "sensor"
count = 3
faulty = 0.4
[[devices]]
model = "pkg"
kind = "sensor"
count = 2
mcu = true
"""


def test_sensor_groups_and_serial_noise_on_mcu_devices(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, SENSORS + "[[faults]]\nkind = 'serial_noise'\ncorrupt = 2e-5\n"))
    assert [g.kind for g in s.devices] == ["sensor", "sensor"] and s.devices[1].mcu and not s.devices[0].mcu
    assert s.devices[0].faulty == 0.4 and s.serial_corrupt == 2e-5
    assert load_scenario(write(tmp_path, SENSORS)).serial_corrupt == 0.0
    w = load_scenario(write(tmp_path, SENSORS + "[[faults]]\nkind = 'serial_noise'\ncorrupt = 1e-3\n"
                                                "at_s = 2\nduration_s = 3\n"))
    assert w.serial_corrupt == 0.0 and w.serial_windows() == [(2.0, 5.0, 1e-3)]


@pytest.mark.parametrize("patch, words", [
    (SENSORS + "[[faults]]\nkind = 'serial_noise'\ncorrupt = 0.01\nat_s = 2\n", ["duration_s > 0"]),
    (SENSORS + "[[faults]]\nkind = 'serial_noise'\ncorrupt = 0.01\nat_s = 2\nduration_s = 3\n"
     "[[faults]]\nkind = 'serial_noise'\ncorrupt = 0.01\nat_s = 4\nduration_s = 3\n", ["overlap"]),
    (SENSORS + "[[faults]]\nkind = 'serial_noise'\n", ["corrupt > 0"]),
    (SENSORS + "[[faults]]\nkind = 'serial_noise'\ncorrupt = 0.5\n", ["faults[0].corrupt"]),
    (SENSORS.replace("faulty = 0.4", "faulty = 1.5"), ["devices[0].faulty"]),
    (SENSORS.replace("count = 2", "count = 40"), ["40 MCU-backed", "32"]),
    (MINIMAL + "mcu = true\n", ["devices[0]", "kind = \"sensor\""]),
    (MINIMAL + "kind = 'voice'\n", ["devices[0].kind", "sensor"]),
])
def test_bad_sensor_scenarios_are_refused(tmp_path: Path, patch: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_scenario(write(tmp_path, patch))
    for w in words:
        assert w in str(exc.value), str(exc.value)
