"""AGENT.toml loading: every mistake is a ConfigError naming the key and the file."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm.config import (  # tomllib: the stdlib one, or tomli on Python 3.10
    AgentConfig,
    MqttConfig,
    PipelineConfig,
    agent_config_from_dict,
    load_agent_config,
    tomllib,
)
from edge_slm.errors import ConfigError

GOOD = """\
device_id = "kitchen-pi"

[mqtt]
broker = "mqtt://127.0.0.1:1883"

[[pipelines]]
name = "intent"
model = "models/intents"
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def minimal(**over) -> dict:
    data = {"device_id": "dev1", "pipelines": [{"name": "intent", "model": "/m"}]}
    data.update(over)
    return data


def test_good_config_loads_with_dataclass_defaults(tmp_path):
    cfg = load_agent_config(write(tmp_path, GOOD))
    assert isinstance(cfg, AgentConfig)
    assert cfg.device_id == "kitchen-pi"
    assert cfg.mqtt == MqttConfig(broker="mqtt://127.0.0.1:1883")
    (p,) = cfg.pipelines
    assert isinstance(p, PipelineConfig)
    assert (p.name, p.source, p.sinks, p.threads) == ("intent", "mqtt://", ["mqtt"], 1)
    assert cfg.uses_mqtt()


def test_unknown_top_level_key_names_key_and_file(tmp_path):
    path = write(tmp_path, 'colour = "blue"\n' + GOOD)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    msg = str(err.value)
    assert "'colour'" in msg and str(path) in msg and "unknown key" in msg


def test_unknown_mqtt_key_names_dotted_key_and_file(tmp_path):
    path = write(tmp_path, GOOD.replace("[mqtt]\n", "[mqtt]\nbrokr = \"x\"\n"))
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert "'mqtt.brokr'" in str(err.value) and str(path) in str(err.value)


def test_unknown_pipeline_key_names_indexed_key_and_file(tmp_path):
    text = GOOD + '\n[[pipelines]]\nname = "b"\nmodel = "m"\nthreds = 2\n'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert "'pipelines[1].threds'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("snippet", "key", "expected"),
    [
        ('device_id = 7', "device_id", "must be a string"),
        ('[mqtt]\nkeepalive = "30"', "mqtt.keepalive", "must be an integer"),
        ('[mqtt]\nkeepalive = true', "mqtt.keepalive", "must be an integer"),
        ('[mqtt]\nconnect_timeout_s = "fast"', "mqtt.connect_timeout_s", "must be a number"),
        ('mqtt = 3', "mqtt", "must be a table"),
        ('pipelines = "intent"', "pipelines", "must be a list of a table"),
    ],
)
def test_wrong_type_says_what_was_expected(snippet, key, expected):
    data = minimal()
    data.update(tomllib.loads(snippet))
    with pytest.raises(ConfigError) as err:
        agent_config_from_dict(data, "cfg.toml")
    msg = str(err.value)
    assert msg.startswith("cfg.toml: ") and key in msg and expected in msg


def test_wrong_type_inside_pipeline_list(tmp_path):
    path = write(tmp_path, GOOD + 'sinks = ["mqtt", 3]\n')
    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.sinks\[1\] must be a string"):
        load_agent_config(path)


def test_integer_timeout_is_accepted_as_float():
    cfg = agent_config_from_dict(minimal(mqtt={"connect_timeout_s": 3}))
    assert cfg.mqtt.connect_timeout_s == 3.0 and isinstance(cfg.mqtt.connect_timeout_s, float)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"pipelines": [{"name": "a", "model": "m"}]}, "device_id"),
        ({"device_id": "d"}, "pipelines"),
        ({"device_id": "d", "pipelines": [{"name": "a"}]}, "pipelines[0].model"),
        ({"device_id": "d", "pipelines": [{"model": "m"}]}, "pipelines[0].name"),
    ],
)
def test_missing_required_key_is_named(data, key):
    with pytest.raises(ConfigError, match=re.escape(f"missing required key {key!r}")):
        agent_config_from_dict(data, "x.toml")


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, 'device_id = "a"\n[[pipelines]\n')
    with pytest.raises(ConfigError, match="invalid TOML") as err:
        load_agent_config(path)
    assert str(path) in str(err.value)


def test_non_utf8_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'device_id = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_agent_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_agent_config(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_config_dir_not_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc" / "edge"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = (
        'device_id = "d"\nstate_dir = "state"\n'
        '[[pipelines]]\nname = "a"\nmodel = "../models/intents"\nsource = "file://inputs/lines.txt"\n'
        '[[pipelines]]\nname = "b"\nmodel = "/abs/model"\nsource = "file:///abs/in.txt"\n'
    )
    cfg = load_agent_config(write(conf_dir, text))
    a, b = cfg.pipelines
    base = conf_dir.resolve()
    assert a.model == str(base / "../models/intents")
    assert a.source == "file://" + str(base / "inputs/lines.txt")
    assert cfg.state_dir == str(base / "state")
    assert b.model == "/abs/model" and b.source == "file:///abs/in.txt"


def test_agent_config_from_dict_without_base_dir_leaves_paths_alone():
    cfg = agent_config_from_dict(minimal(pipelines=[{"name": "a", "model": "rel/m", "source": "file://in.txt"}]))
    assert cfg.pipelines[0].model == "rel/m" and cfg.pipelines[0].source == "file://in.txt"


@pytest.mark.parametrize("source", ["usb:///dev/ttyUSB0", "http://x", "mqttx://t", "", "file://", "wav://", "wav://?block_ms=5"])
def test_bad_source_is_refused(source):
    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.source"):
        agent_config_from_dict(minimal(pipelines=[{"name": "a", "model": "m", "source": source}]))


@pytest.mark.parametrize("source", ["mqtt://", "mqtt://home/in", "stdin://", "file://in.txt", "wav://rec.wav",
                                    "microphone://", "serial:///dev/ttyUSB0?baud=921600"])
def test_known_sources_are_accepted(source):
    cfg = agent_config_from_dict(minimal(pipelines=[{"name": "a", "model": "m", "source": source}]))
    assert cfg.pipelines[0].source == source


def test_duplicate_pipeline_name_is_refused():
    pipes = [{"name": "intent", "model": "a"}, {"name": "other", "model": "b"}, {"name": "intent", "model": "c"}]
    with pytest.raises(ConfigError, match=r"pipelines\[2\]\.name 'intent' is used twice"):
        agent_config_from_dict(minimal(pipelines=pipes), "a.toml")


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"device_id": "kitchen pi"}, "device_id"),
        ({"device_id": "dev\n"}, "device_id"),  # a trailing newline would end up in every MQTT topic
        ({"device_id": "x" * 65}, "device_id"),
        ({"pipelines": []}, "at least one pipeline"),
        ({"pipelines": [{"name": "a/b", "model": "m"}]}, "pipelines[0].name"),
        ({"pipelines": [{"name": "a\n", "model": "m"}]}, "pipelines[0].name"),
        ({"pipelines": [{"name": "a", "model": "m", "sinks": []}]}, "sinks"),
        ({"pipelines": [{"name": "a", "model": "m", "sinks": ["kafka"]}]}, "unknown sink 'kafka'"),
        ({"pipelines": [{"name": "a", "model": "m", "threads": 65}]}, "threads"),
        ({"pipelines": [{"name": "a", "model": "m", "max_input_bytes": 0}]}, "max_input_bytes"),
        ({"pipelines": [{"name": "a", "model": "m", "queue_size": 0}]}, "queue_size"),
        ({"mqtt": {"broker": "tcp://h:1"}}, "mqtt.broker"),
        ({"mqtt": {"qos": 3}}, "mqtt.qos"),
        ({"mqtt": {"keepalive": 4}}, "mqtt.keepalive"),
        ({"mqtt": {"connect_timeout_s": 0.0}}, "connect_timeout_s"),
        ({"mqtt": {"connect_timeout_s": math.nan}}, "connect_timeout_s"),
        ({"mqtt": {"connect_timeout_s": math.inf}}, "connect_timeout_s"),
        ({"mqtt": {"connect_timeout_s": 10**400}}, "connect_timeout_s"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "topic_prefix"),
        ({"mqtt": {"topic_prefix": "a/"}}, "topic_prefix"),
        ({"runtime": "onnx"}, "runtime"),
        ({"log_level": "LOUD"}, "log_level"),
    ],
)
def test_bad_values_are_refused_naming_the_key(over, fragment):
    with pytest.raises(ConfigError) as err:
        agent_config_from_dict(minimal(**over), "agent.toml")
    assert fragment in str(err.value) and str(err.value).startswith("agent.toml: ")


def test_unknown_home_in_model_path_is_a_config_error(tmp_path):
    path = write(tmp_path, GOOD.replace("models/intents", "~no_such_user_edge_slm/m"))
    with pytest.raises(ConfigError, match="no_such_user_edge_slm") as err:
        load_agent_config(path)
    assert str(path) in str(err.value)


def test_top_level_must_be_a_table():
    with pytest.raises(ConfigError, match="top level"):
        agent_config_from_dict(["device_id"])  # type: ignore[arg-type]


# --- property tests -------------------------------------------------------------------------

KEYS = [
    "device_id", "pipelines", "mqtt", "state_dir", "runtime", "log_level",
    "broker", "topic_prefix", "client_id", "username", "password", "keepalive", "connect_timeout_s", "qos",
    "name", "model", "source", "sinks", "threads", "max_input_bytes", "queue_size",
]
STRINGS = st.one_of(
    st.sampled_from([
        "dev1", "intent", "mqtt://", "mqtt://h:1", "mqtts://h", "stdin://", "file://x", "file://", "mqtt", "stdout",
        "~no_such_user_edge_slm/m", "~/m", "", "a\n", "INFO", "tensorflow", "x/#",
    ]),
    st.text(max_size=12),
)
SCALARS = st.one_of(
    STRINGS,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-5, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
PIPELINE = st.dictionaries(st.sampled_from(KEYS[14:]) | st.sampled_from(KEYS), VALUES, max_size=8)
CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "device_id": STRINGS | VALUES,
        "pipelines": st.lists(PIPELINE, max_size=3) | VALUES,
        "mqtt": st.dictionaries(st.sampled_from(KEYS[6:14]), VALUES, max_size=8) | VALUES,
        "state_dir": STRINGS,
        "runtime": STRINGS,
        "log_level": STRINGS,
    },
) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), VALUES, max_size=6)


def _assert_valid(cfg: AgentConfig) -> None:
    """Whatever the loader accepts must satisfy the rules it claims to enforce."""
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", cfg.device_id)
    names = [p.name for p in cfg.pipelines]
    assert names and len(set(names)) == len(names)
    for p in cfg.pipelines:
        assert isinstance(p.model, str) and p.sinks and set(p.sinks) <= {"mqtt", "stdout"}
        assert isinstance(p.threads, int) and not isinstance(p.threads, bool)
    assert isinstance(cfg.mqtt.connect_timeout_s, float) and 0 < cfg.mqtt.connect_timeout_s < math.inf
    assert cfg.mqtt.qos in (0, 1, 2)


# Values that look almost right, per kind of key: where a loader's checks are most likely to have holes.
_NAMES = ["a\n", "dev1\n", "", "a b", "x" * 64, "-a"]
_PATHS = ["~no_such_user_edge_slm/x", "~/x", "", "rel/x", "/abs"]
_INTS = [10**400, 2**63, -1, 0, 65, True, 3.0]
_FLOATS = [math.nan, math.inf, -math.inf, 10**400, 0, -1.0, True, "5"]
EDGE = {
    "device_id": _NAMES, "name": _NAMES, "model": _PATHS, "state_dir": _PATHS,
    "source": ["file://~no_such_user_edge_slm/in", "file://", "mqtt", "stdin:", "mqtt://a/#", "file:x"],
    "sinks": [[], ["mqtt", "mqtt"], ["kafka"], "stdout", ["stdout", 1]],
    "threads": _INTS, "max_input_bytes": _INTS, "queue_size": _INTS, "keepalive": _INTS, "qos": _INTS,
    "connect_timeout_s": _FLOATS, "broker": ["mqtt://", "mqtts://x", "tcp://x", ""],
    "topic_prefix": ["", "a/", "a/#", "a/+/b", "a\n"], "runtime": ["", "tensorflow", "onnx", None],
    "log_level": ["debug", "Warning", "TRACE", ""],
}
SCHEMA_KEYS = {
    "top": [f.name for f in dataclasses.fields(AgentConfig)],
    "mqtt": [f.name for f in dataclasses.fields(MqttConfig)],
    "pipeline": [f.name for f in dataclasses.fields(PipelineConfig)],
}


@st.composite
def mutated_configs(draw):
    """A valid config with one or two known keys replaced or removed, so the search reaches the deep checks."""
    data = {
        "device_id": "dev1",
        "state_dir": "state",
        "mqtt": {"broker": "mqtt://h:1883", "keepalive": 30, "connect_timeout_s": 5.0, "qos": 1},
        "pipelines": [{"name": "a", "model": "m", "source": "file://in", "sinks": ["stdout"]},
                      {"name": "b", "model": "/m"}],
    }
    tables = {"top": [data], "mqtt": [data["mqtt"]], "pipeline": list(data["pipelines"])}  # before any mutation
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(sorted(SCHEMA_KEYS)))
        table = draw(st.sampled_from(tables[kind]))
        key = draw(st.sampled_from(SCHEMA_KEYS[kind]))
        if draw(st.integers(0, 5)) == 0:
            table.pop(key, None)
        else:
            edge = st.sampled_from(EDGE.get(key, [None]))
            table[key] = draw(edge | edge | edge | STRINGS | SCALARS)
    return data


@settings(max_examples=400, deadline=None)
@given(CONFIG | mutated_configs() | mutated_configs())
def test_arbitrary_dicts_only_ever_raise_config_error(data):
    for base in (None, Path("/etc/edge-slm")):
        try:
            cfg = agent_config_from_dict(data, "fuzz.toml", base)
        except ConfigError as exc:
            assert str(exc).startswith("fuzz.toml: ")
        else:
            _assert_valid(cfg)


LINES = st.one_of(
    st.sampled_from(["[mqtt]", "[[pipelines]]", "[pipelines]", "[mqtt.x]", "", "# c", "[[mqtt]]", "= 1", "x ="]),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from(KEYS) | st.text("abc_.\"' ", max_size=6),
        st.sampled_from([
            '"dev1"', '"intent"', '"~no_such_user_edge_slm/x"', '"file://in"', '"mqtt://"', "1", "0", "-3",
            "1e999", "nan", "inf", "true", "[]", '["mqtt"]', '["kafka", 1]', "{a = 1}", "{}", '"\\u0000"',
            "9223372036854775807", "1979-05-27", '"""x"""', "'a'", '"a\\nb"',
        ]) | st.text(max_size=8),
    ),
    st.text(max_size=20),
)


@st.composite
def edited_good_config(draw):
    """GOOD with a few lines inserted or replaced: parseable TOML that reaches the validation."""
    lines = GOOD.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines)))
        lines[i:i + draw(st.integers(0, 1))] = [draw(LINES)]
    return lines


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINES, max_size=14) | edited_good_config(), st.sampled_from([b"", b"", b"", b"\xff", b"\xc3("]))
def test_arbitrary_toml_text_only_ever_raises_config_error(tmp_path_factory, lines, junk):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "agent.toml"
    path.write_bytes("\n".join(lines).encode("utf-8") + junk)
    try:
        cfg = load_agent_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
    else:
        _assert_valid(cfg)


def test_wav_source_path_resolves_and_keeps_its_options():
    cfg = agent_config_from_dict(minimal(pipelines=[{"name": "a", "model": "m", "source": "wav://rec/a.wav?block_ms=20"}]),
                                 base_dir=Path("/abs"))
    assert cfg.pipelines[0].source == "wav:///abs/rec/a.wav?block_ms=20"


@pytest.mark.parametrize(("stream", "key"), [({"threshold": 1.5}, "stream.threshold"), ({"hop": -3}, "stream.hop"),
                                             ({"refractory_ms": -5}, "stream.refractory_ms"),
                                             ({"window": 3}, "stream.window")])
def test_bad_stream_options_name_the_key(stream, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        agent_config_from_dict(minimal(pipelines=[{"name": "a", "model": "m", "stream": stream}]))
