"""Agent configuration: frozen dataclasses loaded from TOML and validated on load.

Errors name the key and the file. Imports only the standard library and edge_slm.errors.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on older Pi OS
    import tomli as tomllib

from edge_slm.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SOURCE_SCHEMES = ("mqtt", "stdin", "file", "wav", "microphone", "serial")
SINKS = ("mqtt", "stdout")


@dataclass(frozen=True)
class MqttConfig:
    """How the agent reaches its broker."""

    broker: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "edge-slm"
    client_id: str = ""
    username: str = ""
    password: str = ""
    keepalive: int = 30
    connect_timeout_s: float = 10.0
    qos: int = 1
    fallback_brokers: list[str] = field(default_factory=list)  # tried in order when broker is down
    protocol: str = "5"  # "5" or "3.1.1"
    session_expiry_s: int = 3600  # MQTT 5: how long the broker keeps the session (queued inputs)
    ca_file: str = ""  # TLS: CA bundle that signed the broker's certificate (default: system CAs)
    cert_file: str = ""  # TLS client certificate
    key_file: str = ""
    reconnect_min_s: float = 0.5  # backoff: first window; doubles per failure, full jitter
    reconnect_max_s: float = 30.0


@dataclass(frozen=True)
class HomeAssistantConfig:
    """MQTT discovery: a sensor per pipeline, re-announced when Home Assistant restarts."""

    enabled: bool = True
    prefix: str = "homeassistant"


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults for text-generation pipelines; a JSON input may override each per request."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = -1  # -1: a fresh random seed per request
    stream_tokens: bool = True  # publish each token to <pipeline>/tokens as it is made


@dataclass(frozen=True)
class StreamConfig:
    """Keyword-spotting and sensor pipelines; -1 (or hop 0) keeps the model's default from its manifest."""

    threshold: float = -1.0  # a detection's smoothed posterior, or an anomaly score limit
    smoothing_ms: float = -1.0
    refractory_ms: float = -1.0  # after a detection the same keyword is not reported again for this long
    stride_ms: float = -1.0  # how often the keyword model runs on the last clip
    hop: int = 0  # sensor windows start every hop samples
    vad: str = ""  # keyword spotting: "energy" or "webrtc" skips the model in silence; "off"; "" the model's default


@dataclass(frozen=True)
class PipelineConfig:
    """One source -> task -> sinks chain."""

    name: str
    model: str
    source: str = "mqtt://"
    sinks: list[str] = field(default_factory=lambda: ["mqtt"])
    threads: int = 1
    max_input_bytes: int = 65536
    queue_size: int = 1000
    # embedding pipelines: label -> example phrases; an input takes the label of its nearest example
    examples: dict[str, list[str]] = field(default_factory=dict)
    match_threshold: float = 0.0  # below this cosine the label is "unknown"
    include_embedding: bool = False  # with examples, also publish the vector (always without)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass(frozen=True)
class OutboxConfig:
    """The durable outbox: results and errors wait on disk until the broker acknowledges them."""

    enabled: bool = True
    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0
    overflow: str = "drop_oldest"  # or "reject_new"
    sync: str = "normal"  # "full": also survive a power cut, at one fsync per record
    window: int = 100  # published but not yet acknowledged
    drain_timeout_s: float = 10.0  # on shutdown, how long to wait for acks before saying offline


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent: identity, broker and pipelines."""

    device_id: str
    pipelines: list[PipelineConfig]
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    metrics_interval_s: float = 30.0
    update_public_key: str = ""  # PEM file pinning who may sign model updates; "" refuses updates
    update_trial_s: float = 300.0
    state_dir: str = "~/.local/state/edge-slm"
    runtime: str = ""
    log_level: str = "INFO"

    def uses_mqtt(self) -> bool:
        return any(p.source.startswith("mqtt") or "mqtt" in p.sinks for p in self.pipelines)


def _describe(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is list:
        return f"a list of {_describe(typing.get_args(typ)[0])}"
    if dataclasses.is_dataclass(typ) or origin is dict:
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(typ, str(typ))


def _convert(value: Any, typ: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table, got {type(value).__name__}")
        return _build(typ, value, key, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table, got {type(value).__name__}")
        _, item = typing.get_args(typ)
        return {str(k): _convert(v, item, f"{key}.{k}", where) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be {_describe(typ)}, got {type(value).__name__}")
        (item,) = typing.get_args(typ)
        return [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError("unions are not used in config schemas")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {key} is too large, got {value!r}") from None
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {_describe(typ)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: Any, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key {full!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], full, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {full!r}")
    return cls(**kwargs)


def _check(cfg: AgentConfig, where: str) -> None:
    if not _NAME.fullmatch(cfg.device_id):
        raise ConfigError(f"{where}: device_id {cfg.device_id!r} must be 1-64 letters, digits, '_', '-' or '.'")
    if not cfg.pipelines:
        raise ConfigError(f"{where}: pipelines must list at least one pipeline ([[pipelines]])")
    seen = set()
    for i, p in enumerate(cfg.pipelines):
        key = f"pipelines[{i}]"
        if not _NAME.fullmatch(p.name):
            raise ConfigError(f"{where}: {key}.name {p.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        if p.name in seen:
            raise ConfigError(f"{where}: {key}.name {p.name!r} is used twice")
        seen.add(p.name)
        scheme = p.source.split(":", 1)[0] if ":" in p.source else p.source
        if scheme not in SOURCE_SCHEMES:
            raise ConfigError(
                f"{where}: {key}.source {p.source!r} has unknown scheme; use mqtt://[TOPIC], stdin://, file://PATH, "
                "wav://PATH, microphone://[DEVICE] or serial://PORT"
            )
        if scheme in ("file", "wav", "serial") and not p.source.split("://", 1)[-1].split("?", 1)[0]:
            raise ConfigError(f"{where}: {key}.source needs a path: {scheme}://PATH")
        st = p.stream
        for name in ("threshold", "smoothing_ms", "refractory_ms", "stride_ms"):
            value = getattr(st, name)
            if not (value == -1 or 0 <= value < float("inf")):
                raise ConfigError(f"{where}: {key}.stream.{name} must be >= 0 (or -1 for the model's default)")
        if st.threshold > 1:
            raise ConfigError(f"{where}: {key}.stream.threshold is a probability: 0-1 (or -1 for the model's default)")
        if st.vad not in ("", "off", "energy", "webrtc"):
            raise ConfigError(f"{where}: {key}.stream.vad must be energy, webrtc or off, got {st.vad!r}")
        if st.hop < 0:
            raise ConfigError(f"{where}: {key}.stream.hop must be a number of samples >= 1 (or 0 for the model's default)")
        if not p.sinks:
            raise ConfigError(f"{where}: {key}.sinks must name at least one of {', '.join(SINKS)}")
        for s in p.sinks:
            if s not in SINKS:
                raise ConfigError(f"{where}: {key}.sinks has unknown sink {s!r} (known: {', '.join(SINKS)})")
        if p.threads < 0 or p.threads > 64:
            raise ConfigError(f"{where}: {key}.threads must be 0 (runtime decides) to 64")
        if p.max_input_bytes < 1:
            raise ConfigError(f"{where}: {key}.max_input_bytes must be positive")
        if p.queue_size < 1:
            raise ConfigError(f"{where}: {key}.queue_size must be positive")
        if not p.model.strip():
            raise ConfigError(f"{where}: {key}.model must be the path of a model package")
        for label, phrases in p.examples.items():
            if not label or not phrases or not all(x.strip() for x in phrases):
                raise ConfigError(f"{where}: {key}.examples.{label} must be a non-empty list of non-empty phrases")
        if not -1.0 <= p.match_threshold <= 1.0:
            raise ConfigError(f"{where}: {key}.match_threshold must be a cosine between -1 and 1")
        g = p.generation
        if not 1 <= g.max_new_tokens <= 4096:
            raise ConfigError(f"{where}: {key}.generation.max_new_tokens must be 1-4096")
        if not 0.0 <= g.temperature <= 10.0:
            raise ConfigError(f"{where}: {key}.generation.temperature must be 0-10")
        if g.top_k < 0:
            raise ConfigError(f"{where}: {key}.generation.top_k must be >= 0")
        if not 0.0 < g.top_p <= 1.0:
            raise ConfigError(f"{where}: {key}.generation.top_p must be in (0, 1]")
        if any(not x for x in g.stop):
            raise ConfigError(f"{where}: {key}.generation.stop must not contain empty strings")
    m = cfg.mqtt
    for i, b in enumerate([m.broker, *m.fallback_brokers]):
        key = "mqtt.broker" if i == 0 else f"mqtt.fallback_brokers[{i - 1}]"
        if not b.startswith(("mqtt://", "mqtts://")) or not b.split("://", 1)[1].strip("/"):
            raise ConfigError(f"{where}: {key} {b!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
    if m.protocol not in ("5", "3.1.1"):
        raise ConfigError(f"{where}: mqtt.protocol must be \"5\" or \"3.1.1\", got {m.protocol!r}")
    if not 0 <= m.session_expiry_s <= 2**32 - 1:
        raise ConfigError(f"{where}: mqtt.session_expiry_s must be 0 to 4294967295 seconds")
    if bool(m.cert_file) != bool(m.key_file):
        raise ConfigError(f"{where}: mqtt.cert_file and mqtt.key_file go together")
    if not 0 < m.reconnect_min_s <= m.reconnect_max_s < float("inf"):
        raise ConfigError(f"{where}: mqtt.reconnect_min_s must be > 0 and <= mqtt.reconnect_max_s")
    if not 0 < cfg.metrics_interval_s < float("inf"):
        raise ConfigError(f"{where}: metrics_interval_s must be a positive number of seconds")
    if not 0 < cfg.update_trial_s < float("inf"):
        raise ConfigError(f"{where}: update_trial_s must be a positive number of seconds")
    if not cfg.homeassistant.prefix or any(c in cfg.homeassistant.prefix for c in "#+"):
        raise ConfigError(f"{where}: homeassistant.prefix must be a topic prefix without # or +")
    if m.qos not in (0, 1, 2):
        raise ConfigError(f"{where}: mqtt.qos must be 0, 1 or 2")
    if not 5 <= m.keepalive <= 3600:
        raise ConfigError(f"{where}: mqtt.keepalive must be 5-3600 seconds")
    if not 0 < m.connect_timeout_s < float("inf"):  # also refuses TOML nan
        raise ConfigError(f"{where}: mqtt.connect_timeout_s must be a positive number")
    if not m.topic_prefix or any(c in m.topic_prefix for c in "#+") or m.topic_prefix.endswith("/"):
        raise ConfigError(f"{where}: mqtt.topic_prefix {m.topic_prefix!r} must be non-empty, without # + or a trailing /")
    o = cfg.outbox
    if not 1024 <= o.max_bytes <= 2**40:
        raise ConfigError(f"{where}: outbox.max_bytes must be 1024 to 2**40 bytes")
    if not 0 < o.max_age_s < float("inf"):
        raise ConfigError(f"{where}: outbox.max_age_s must be a positive number of seconds")
    if o.overflow not in ("drop_oldest", "reject_new"):
        raise ConfigError(f"{where}: outbox.overflow must be \"drop_oldest\" or \"reject_new\", got {o.overflow!r}")
    if o.sync not in ("normal", "full"):
        raise ConfigError(f"{where}: outbox.sync must be \"normal\" or \"full\", got {o.sync!r}")
    if not 1 <= o.window <= 10000:
        raise ConfigError(f"{where}: outbox.window must be 1-10000 messages")
    if not 0 <= o.drain_timeout_s < float("inf"):
        raise ConfigError(f"{where}: outbox.drain_timeout_s must be a number of seconds >= 0")
    if cfg.runtime not in ("", "ai-edge-litert", "tflite-runtime", "tensorflow"):
        raise ConfigError(f"{where}: runtime must be ai-edge-litert, tflite-runtime or tensorflow")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: log_level must be DEBUG, INFO, WARNING or ERROR")


def agent_config_from_dict(data: dict[str, Any], where: str = "<config>", base_dir: Path | None = None) -> AgentConfig:
    """Build and validate an AgentConfig; relative model/file/state paths resolve against base_dir."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table at the top level")
    cfg: AgentConfig = _build(AgentConfig, data, "", where)
    _check(cfg, where)
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir, where)
    return cfg


def _resolve_paths(cfg: AgentConfig, base: Path, where: str) -> AgentConfig:
    def res(p: str) -> str:
        try:
            path = Path(p).expanduser()
        except RuntimeError as exc:  # ~user that does not exist, or no home directory
            raise ConfigError(f"{where}: cannot expand {p!r}: {exc}") from exc
        return str(path if path.is_absolute() else (base / path))

    pipes = []
    for p in cfg.pipelines:
        source = p.source
        for scheme in ("file://", "wav://"):
            if source.startswith(scheme):
                path, sep, query = source.removeprefix(scheme).partition("?")
                source = scheme + res(path) + sep + query
        pipes.append(dataclasses.replace(p, model=res(p.model), source=source))
    mqtt = dataclasses.replace(cfg.mqtt, **{k: res(getattr(cfg.mqtt, k)) for k in ("ca_file", "cert_file", "key_file")
                                            if getattr(cfg.mqtt, k)})
    key = res(cfg.update_public_key) if cfg.update_public_key else ""
    return dataclasses.replace(cfg, pipelines=pipes, state_dir=res(cfg.state_dir), mqtt=mqtt, update_public_key=key)


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read AGENT.toml; every problem is a ConfigError naming the file and the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return agent_config_from_dict(data, str(p), p.parent.resolve())
