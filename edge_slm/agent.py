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
from edge_slm.control import ControlPlane
from edge_slm.mqtt import MqttLink, Topics
from edge_slm.outbox import Outbox, OutboxSender, outbox_path
from edge_slm.package import ModelPackage
from edge_slm.pipeline import MqttSink, Pipeline, StdoutSink
from edge_slm.seq import SeqCounter
from edge_slm.sources import MqttSource, build_source
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
        config_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.control: ControlPlane | None = None
        self.update_store: Any = None
        self.update_receiver: Any = None
        self._reload_lock = threading.Lock()
        self.topics = Topics(config.mqtt.topic_prefix, config.device_id)
        self.on_record = on_record
        self._stdout = stdout
        self.link: MqttLink | None = None
        self.pipelines: list[Pipeline] = []
        self._sources: list[tuple[Pipeline, Any]] = []
        self._mqtt_sink: MqttSink | None = None
        self.outbox: Outbox | None = None
        self.outbox_sender: OutboxSender | None = None
        self._stop = threading.Event()
        self.seq: SeqCounter | None = None
        self._started = False

    def start(self) -> None:
        """Load every model, connect to the broker if any pipeline needs it, start the sources.

        Raises ModelError/ConfigError/BrokerError before anything runs if something is wrong.
        """
        cfg = self.config
        if cfg.uses_mqtt() and cfg.update_public_key:
            self._open_update_store(cfg)
        tasks = self._load_tasks(cfg)
        sources = [build_source(p.source, self.topics.input(p.name), getattr(t, "sample_rate", None),
                                getattr(t, "input_kind", None)) for p, t in zip(cfg.pipelines, tasks)]
        self.seq = SeqCounter(Path(cfg.state_dir) / f"{cfg.device_id}.seq")
        try:
            if cfg.uses_mqtt():
                self._make_link(cfg)
            stdout_sink = StdoutSink(self._stdout)
            for p, task, source in zip(cfg.pipelines, tasks, sources):
                sinks = [self._mqtt_sink if s == "mqtt" else stdout_sink for s in p.sinks]
                pipe = Pipeline(
                    p.name, cfg.device_id, task, self.seq, sinks,
                    max_input_bytes=p.max_input_bytes, queue_size=p.queue_size, on_record=self._record,
                    stream_tokens=p.generation.stream_tokens,
                )
                self.pipelines.append(pipe)
                self._sources.append((pipe, source))
                pipe.start()
            if self.link is not None:
                # Handlers first, then connect: a persistent session delivers its backlog right after CONNACK.
                for pipe, source in self._sources:
                    if isinstance(source, MqttSource):
                        source.start(pipe.submit, self.link)
                self.control = ControlPlane(self)
                self.control.subscribe()
                self.link.connect(timeout=cfg.mqtt.connect_timeout_s)
                if self.outbox is not None:
                    self.outbox_sender = OutboxSender(self.outbox, self.link, window=cfg.outbox.window)
                    self.outbox_sender.start()
        except Exception:
            for pipe in self.pipelines:
                pipe.end()
            if self.outbox is not None:
                self.outbox.close()
                self.outbox = None
            self.seq.close()
            raise
        for pipe, source in self._sources:
            if not isinstance(source, MqttSource):
                source.start(pipe.submit, pipe.end)
            log.info("pipeline %s: listening on %s", pipe.name, source.describe())
        if self.link is not None:
            self.link.announce_online()
            assert self.control is not None
            self.control.start()
        self._started = True

    def _load_tasks(self, cfg: AgentConfig) -> list[Any]:
        tasks = []
        for p in cfg.pipelines:
            package = ModelPackage.open(self._model_path(p.model))
            task = load_task(package, threads=p.threads or None, backend=cfg.runtime or None, options=p)
            tasks.append(task)
            log.info("pipeline %s: model %s %s (%s) loaded with %s", p.name, package.name,
                     package.version, package.sha256[:12], task.model.backend)
        return tasks

    def _model_path(self, configured: str) -> Path:
        """The configured package, or a newer signed update of it from the update store."""
        if self.update_store is not None:
            try:
                current = self.update_store.current_package()
                configured_pkg = ModelPackage.open(configured, verify=False)
                if current.name == configured_pkg.name:
                    return current.path
            except Exception:  # no update installed yet, or the store is empty
                pass
        return Path(configured)

    def _make_link(self, cfg: AgentConfig) -> None:
        m = cfg.mqtt
        self.link = MqttLink(
            m.broker, m.client_id or f"edge-slm-{cfg.device_id}", self.topics,
            username=m.username, password=m.password, keepalive=m.keepalive, qos=m.qos,
            fallback_brokers=list(m.fallback_brokers), protocol=m.protocol, session_expiry_s=m.session_expiry_s,
            ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file,
            reconnect_min_s=m.reconnect_min_s, reconnect_max_s=m.reconnect_max_s,
        )
        o = cfg.outbox
        if o.enabled:
            # Opened before connecting: a bad state_dir or database fails the start, not the first result.
            self.outbox = Outbox(outbox_path(cfg.state_dir, cfg.device_id), max_bytes=o.max_bytes,
                                 max_age_s=o.max_age_s, overflow=o.overflow, sync=o.sync)
        self._mqtt_sink = MqttSink(self.link, self.topics, self.outbox)

    def _open_update_store(self, cfg: AgentConfig) -> None:
        """The versioned model store signed updates go into. recover() first: a crash or a kill during
        an update trial reverts to the previous model. An empty store is seeded with the configured
        package, so the first update has something to fall back to."""
        from edge_slm.updates import ModelStore, UpdateReceiver

        store = ModelStore(Path(cfg.state_dir) / "models" / cfg.device_id)
        store.recover()
        try:
            store.current_package()
        except Exception:
            store.install(Path(cfg.pipelines[0].model))
            log.info("update store seeded with %s", cfg.pipelines[0].model)
        self.update_store = store
        self.update_receiver = UpdateReceiver(store, Path(cfg.update_public_key), cfg.device_id,
                                              trial_s=cfg.update_trial_s, max_bytes=256 * 1024 * 1024)

    def _record(self, kind: str, record: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.metrics.record(record["pipeline"], kind, record.get("latency_ms"))
        if self.on_record is not None:
            self.on_record(kind, record)

    def reload(self, new_config: AgentConfig | None = None) -> dict[str, Any]:
        """Reload models and task options (from the config file when there is one); all or nothing.

        Sources, sinks, broker and device id need a restart: that is refused with restart_required.
        """
        from edge_slm.commands import CommandError
        from edge_slm.config import load_agent_config

        with self._reload_lock:
            cfg = new_config or (load_agent_config(self.config_path) if self.config_path else self.config)
            old = self.config
            shape = lambda c: (c.device_id, c.mqtt, [(p.name, p.source, tuple(p.sinks)) for p in c.pipelines])  # noqa: E731
            if shape(cfg) != shape(old):
                raise CommandError("restart_required", "device_id, [mqtt] or a pipeline's name/source/sinks changed; "
                                   "restart the agent to apply that")
            tasks = self._load_tasks(cfg)  # raises before anything is swapped
            for pipe, task in zip(self.pipelines, tasks):
                pipe.task = task
            self.config = cfg
            log.info("reloaded %d pipelines", len(tasks))
            return {"reloaded": [p.name for p in self.pipelines],
                    "models": {p.name: p.task.package.identity() for p in self.pipelines}}

    def apply_config_text(self, toml_text: str) -> dict[str, Any]:
        """Validate a whole new AGENT.toml, reload with it, then write it over the config file."""
        import os
        import sys

        from edge_slm.commands import CommandError
        from edge_slm.config import agent_config_from_dict

        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        if self.config_path is None:
            raise CommandError("no_config_file", "this agent was not started from a config file")
        try:
            data = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise CommandError("bad_config", f"invalid TOML: {exc}") from exc
        cfg = agent_config_from_dict(data, "config command", self.config_path.parent.resolve())
        result = self.reload(cfg)
        tmp = self.config_path.with_suffix(".toml.tmp")
        tmp.write_text(toml_text, encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.config_path)
        return result | {"written": str(self.config_path)}

    def adopt_update(self) -> dict[str, Any]:
        """After a verified update: load the new package into the pipelines serving its name.

        The update stays on trial for update_trial_s: it is committed only if this process is still
        serving at the end; if the agent dies first, ModelStore.recover() at the next start reverts it.
        A model that does not load here is rolled back at once.
        """
        store = self.update_store
        new = store.current_package()
        try:
            with self._reload_lock:
                swapped = []
                for pipe, p in zip(self.pipelines, self.config.pipelines):
                    if pipe.task.package.name == new.name:
                        pipe.task = load_task(new, threads=p.threads or None, backend=self.config.runtime or None,
                                              options=p)
                        swapped.append(pipe.name)
            if not swapped:
                raise RuntimeError(f"no pipeline serves a model named {new.name!r}")
        except Exception:
            store.rollback()
            raise
        threading.Thread(target=self._finish_trial, args=(self.config.update_trial_s,), name="update-trial",
                         daemon=True).start()
        log.info("model update %s %s serving on trial for %.0fs in %s", new.name, new.version,
                 self.config.update_trial_s, ", ".join(swapped))
        return {"pipelines": swapped, "model": new.identity(), "trial_s": self.config.update_trial_s}

    def _finish_trial(self, trial_s: float) -> None:
        if self._stop.wait(trial_s):
            return  # stopping during the trial: the next start reverts to the previous model
        if self.update_store.commit():
            log.info("model update committed after a %.0fs trial", trial_s)

    @property
    def finite(self) -> bool:
        """True when every source ends by itself (files, stdin): the agent exits when they are done."""
        return all(s.finite for _, s in self._sources)

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
        for _, source in self._sources:
            if hasattr(source, "stop"):
                source.stop()  # microphones and serial ports stop capturing; what is queued still drains
        for pipe in self.pipelines:
            if not pipe.done.is_set():
                pipe.end()
        for pipe in self.pipelines:
            if not pipe.join(drain_timeout):
                log.warning("pipeline %s did not drain in %.0fs", pipe.name, drain_timeout)
        if self.control is not None:
            self.control.publish_metrics()
            self.control.stop()
        if self.outbox_sender is not None:
            timeout = self.config.outbox.drain_timeout_s
            if not self.outbox_sender.wait_drained(timeout):
                log.warning("outbox: %d records not acknowledged within %.0fs; they are sent on the next start",
                            self.outbox_sender.outbox.depth, timeout)
            self.outbox_sender.close()
            self.outbox_sender = None
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if self.link is not None:
            self.link.close(timeout=5.0)
        if self.seq is not None:
            self.seq.close()
        self._started = False
        log.info("agent %s stopped", self.config.device_id)

    def outbox_stats(self) -> dict[str, Any] | None:
        """depth, bytes, dropped {overflow, expired}, rejected, sent, acked, inflight; None without an outbox."""
        if self.outbox_sender is not None:
            return self.outbox_sender.stats()
        return self.outbox.stats() if self.outbox is not None else None

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
