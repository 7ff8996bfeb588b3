"""The on-device agent: loads model packages, wires sources -> tasks -> sinks, talks MQTT.

Device path: numpy, the TFLite runtime, paho-mqtt, tokenizers. Never TensorFlow, converters or devices.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_slm.config import AgentConfig
from edge_slm.mqtt import MqttLink, Topics
from edge_slm.package import ModelPackage
from edge_slm.pipeline import MqttSink, Pipeline, StdoutSink
from edge_slm.seq import SeqCounter
from edge_slm.sources import LinesSource, MqttSource, build_source
from edge_slm.tasks import load_task

log = logging.getLogger(__name__)


class Agent:
    """Runs every pipeline of an AgentConfig until stopped (or until all finite sources end)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
        stdout=None,  # noqa: ANN001 - a text stream for the stdout sink
    ) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix, config.device_id)
        self.on_record = on_record
        self._stdout = stdout
        self.link: MqttLink | None = None
        self.pipelines: list[Pipeline] = []
        self._sources: list[tuple[Pipeline, MqttSource | LinesSource]] = []
        self._mqtt_sink: MqttSink | None = None
        self._stop = threading.Event()
        self.seq: SeqCounter | None = None
        self._started = False

    def start(self) -> None:
        """Load every model, connect to the broker if any pipeline needs it, start the sources.

        Raises ModelError/ConfigError/BrokerError before anything runs if something is wrong.
        """
        cfg = self.config
        tasks = []
        for p in cfg.pipelines:
            package = ModelPackage.open(p.model)
            task = load_task(package, threads=p.threads or None, backend=cfg.runtime or None, options=p)
            tasks.append(task)
            log.info("pipeline %s: model %s %s (%s) loaded with %s", p.name, package.name,
                     package.version, package.sha256[:12], task.model.backend)
        sources = [build_source(p.source, self.topics.input(p.name)) for p in cfg.pipelines]
        self.seq = SeqCounter(Path(cfg.state_dir) / f"{cfg.device_id}.seq")
        if cfg.uses_mqtt():
            m = cfg.mqtt
            self.link = MqttLink(
                m.broker,
                m.client_id or f"edge-slm-{cfg.device_id}",
                self.topics,
                username=m.username,
                password=m.password,
                keepalive=m.keepalive,
                qos=m.qos,
            )
            try:
                self.link.connect(timeout=m.connect_timeout_s)
            except Exception:
                self.seq.close()
                raise
            self._mqtt_sink = MqttSink(self.link, self.topics)
        stdout_sink = StdoutSink(self._stdout)
        for p, task, source in zip(cfg.pipelines, tasks, sources):
            sinks = [self._mqtt_sink if s == "mqtt" else stdout_sink for s in p.sinks]
            pipe = Pipeline(
                p.name, cfg.device_id, task, self.seq, sinks,
                max_input_bytes=p.max_input_bytes, queue_size=p.queue_size, on_record=self.on_record,
                stream_tokens=p.generation.stream_tokens,
            )
            self.pipelines.append(pipe)
            self._sources.append((pipe, source))
        for pipe, source in self._sources:
            pipe.start()
            if isinstance(source, MqttSource):
                assert self.link is not None
                source.start(pipe.submit, self.link)
            else:
                source.start(pipe.submit, pipe.end)
            log.info("pipeline %s: listening on %s", pipe.name, source.describe())
        if self.link is not None:
            self.link.announce_online()
        self._started = True

    @property
    def finite(self) -> bool:
        """True when every source ends by itself (files, stdin): the agent exits when they are done."""
        return all(isinstance(s, LinesSource) for _, s in self._sources)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() is called or, for finite sources, every pipeline has drained."""
        if self.finite:
            for pipe in self.pipelines:
                while not pipe.done.wait(0.2):
                    if self._stop.is_set():
                        return True
            return True
        return self._stop.wait(timeout)

    def stop(self) -> None:
        self._stop.set()

    def close(self, drain_timeout: float = 10.0) -> None:
        """Finish queued inputs, wait for broker acks, say offline, save seq."""
        if not self._started:
            return
        for pipe in self.pipelines:
            if not pipe.done.is_set():
                pipe.end()
        for pipe in self.pipelines:
            if not pipe.join(drain_timeout):
                log.warning("pipeline %s did not drain in %.0fs", pipe.name, drain_timeout)
        if self.link is not None:
            self.link.close(timeout=5.0)
        if self.seq is not None:
            self.seq.close()
        self._started = False
        log.info("agent %s stopped", self.config.device_id)

    def run_forever(self) -> None:
        """start(), serve until SIGINT/SIGTERM (or the end of finite sources), close()."""
        self.start()
        previous = {}

        def on_signal(signum, frame) -> None:  # noqa: ANN001
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            while not self.wait(0.5):
                pass
        finally:
            self.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
