"""Input sources for a pipeline, built from a URL-like spec: mqtt://[TOPIC], stdin://, file://PATH.

Standard library only (the MQTT source rides on the agent's MqttLink).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

from edge_slm.errors import ConfigError


@dataclass
class RawInput:
    """One input as it arrived: bytes, where from, and when (monotonic seconds)."""

    payload: bytes
    origin: str
    received: float = field(default_factory=time.monotonic)
    input_id: str | None = None
    data: Any = None  # an already-decoded block (AudioBlock, SensorBlock, StreamEnd) from a media source


Deliver = Callable[[RawInput], None]
_counter = itertools.count(1)


class MqttSource:
    """Subscribes to a topic on the agent's link; each message is one input."""

    finite = False

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def start(self, deliver: Deliver, link) -> None:  # noqa: ANN001 - MqttLink, kept loose to avoid a cycle
        link.subscribe(self.topic, lambda topic, payload: deliver(RawInput(payload, f"mqtt:{topic}")))

    def describe(self) -> str:
        return f"mqtt://{self.topic}"


class LinesSource:
    """Reads one input per line from a text stream (stdin or a file) on a thread; ends at EOF."""

    finite = True

    def __init__(self, name: str, opener: Callable[[], IO[bytes]]) -> None:
        self.name = name
        self._open = opener
        self.thread: threading.Thread | None = None

    def start(self, deliver: Deliver, on_end: Callable[[], None]) -> None:
        def pump() -> None:
            stream = self._open()
            try:
                for n, line in enumerate(stream, start=1):
                    line = line.rstrip(b"\r\n")
                    if line.strip():
                        deliver(RawInput(line, f"{self.name}:{n}", input_id=f"{self.name}:{n}"))
            finally:
                if stream is not sys.stdin.buffer:
                    stream.close()
                on_end()

        self.thread = threading.Thread(target=pump, name=f"source-{self.name}", daemon=True)
        self.thread.start()

    def describe(self) -> str:
        return self.name


def build_source(spec: str, default_topic: str, sample_rate: int | None = None, kind: str | None = None) -> Any:
    """mqtt:// (the pipeline's input topic), mqtt://TOPIC, stdin://, file://PATH, wav://PATH,
    microphone://[DEVICE], serial://PORT.

    sample_rate: what an audio task wants; wav:// resamples to it and microphone:// opens at it.
    kind: "audio" or "sensor" for streaming tasks; serial:// passes on blocks of that kind only.
    """
    if spec in ("mqtt", "mqtt://"):
        return MqttSource(default_topic)
    if spec.startswith("mqtt://"):
        return MqttSource(spec.removeprefix("mqtt://"))
    if spec in ("stdin", "stdin://", "-"):
        return LinesSource("stdin", lambda: sys.stdin.buffer)
    if spec.startswith("file://"):
        path = Path(spec.removeprefix("file://"))
        if not path.is_file():
            raise ConfigError(f"source file not found: {path}")
        return LinesSource(f"file:{path.name}", lambda: open(path, "rb"))
    if spec.startswith("wav://"):
        from edge_slm.media_sources import WavSource

        return WavSource(spec, sample_rate)
    if spec.startswith("microphone://"):
        from edge_slm.media_sources import MicrophoneSource

        return MicrophoneSource(spec, sample_rate)
    if spec.startswith("serial://"):
        from edge_slm.serial_source import SerialSource

        return SerialSource(spec, kind)
    raise ConfigError(f"unknown source {spec!r}; use {SOURCE_HELP}")


SOURCE_HELP = "mqtt://[TOPIC], stdin://, file://PATH, wav://PATH, microphone://[DEVICE] or serial://PORT"


def parse_options(spec: str, allowed: dict[str, type]) -> tuple[str, dict[str, Any]]:
    """'scheme://PATH?a=1&b=x' -> (PATH, {a: 1, b: 'x'}), converting by `allowed`; unknown keys are errors."""
    scheme, rest = spec.split("://", 1)
    path, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            raise ConfigError(f"source {spec!r}: unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        typ = allowed[key]
        try:
            if typ is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                options[key] = value.lower() in ("1", "true", "yes")
            else:
                options[key] = typ(value)
        except ValueError as exc:
            raise ConfigError(f"source {spec!r}: option {key}={value!r} must be {typ.__name__}") from exc
        if typ in (int, float) and not options[key] > 0:
            raise ConfigError(f"source {spec!r}: option {key} must be positive")
    return path, options


def next_input_id() -> str:
    return f"in-{next(_counter)}"
