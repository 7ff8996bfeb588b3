"""The agent's control plane: remote commands, Home Assistant discovery and periodic metrics.

Runs beside the pipelines on its own threads (never on paho's network thread). Device path only:
standard library, paho through MqttLink, and edge_slm.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from edge_slm import __version__
from edge_slm.commands import CommandError, CommandRouter
from edge_slm.homeassistant import discovery_messages
from edge_slm.metrics import Metrics

if TYPE_CHECKING:  # pragma: no cover
    from edge_slm.agent import Agent

log = logging.getLogger(__name__)


class ControlPlane:
    """Subscribes to <root>/cmd/#, answers on cmd/<name>/reply; publishes discovery and metrics."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.link = agent.link
        self.topics = agent.topics
        self.metrics = Metrics()
        self._queue: queue.Queue = queue.Queue(maxsize=100)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        handlers = {
            "ping": self._ping,
            "metrics": lambda args: self.snapshot(),
            "reload": lambda args: agent.reload(),
            "config": self._config,
        }
        self.router = CommandRouter(handlers)

    # --- wiring -----------------------------------------------------------------------------------
    def subscribe(self) -> None:
        """Register handlers; called before connecting so a persistent session's backlog is not lost."""
        assert self.link is not None
        self.link.subscribe(f"{self.topics.root}/cmd/#", self._on_command)
        ha = self.agent.config.homeassistant
        if ha.enabled:
            self.link.subscribe(f"{ha.prefix}/status", self._on_ha_status)

    def start(self) -> None:
        for target, name in ((self._serve_commands, "commands"), (self._publish_metrics, "metrics")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.announce()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for t in self._threads:
            t.join(5)

    # --- commands ---------------------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes) -> None:
        name = topic[len(f"{self.topics.root}/cmd/"):]
        if name.endswith("/reply") or name == "reply":
            return  # our own answers (or someone else's) are not commands
        if name == "model/update/blob" and self.agent.update_receiver is not None:
            self.agent.update_receiver.on_blob(payload)
            return
        try:
            self._queue.put_nowait((name, payload))
        except queue.Full:
            self._reply(name, {"schema_version": 1, "id": None, "command": name, "ok": False, "error": "busy",
                               "message": "too many commands queued; retry later"})

    def _serve_commands(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            name, payload = item
            if name == "model/update" and self.agent.update_receiver is not None:
                self._reply(name, self._apply_update(payload))
            else:
                self._reply(name, self.router.handle(name, payload))

    def _apply_update(self, payload: bytes) -> dict[str, Any]:
        reply = self.agent.update_receiver.on_command(payload)
        if reply.get("ok"):
            try:
                reply["adopted"] = self.agent.adopt_update()
            except Exception as exc:  # the new model did not load here: it was rolled back
                reply.update(ok=False, code="adopt_failed", message=f"{type(exc).__name__}: {exc}; rolled back")
        return reply

    def _reply(self, name: str, reply: dict[str, Any]) -> None:
        assert self.link is not None
        self.link.publish(f"{self.topics.root}/cmd/{name}/reply", json.dumps(reply).encode(), qos=1)

    def _ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "device_id": self.agent.config.device_id, "version": __version__,
                "uptime_s": round(time.monotonic() - self.metrics.started, 1),
                "pipelines": [p.name for p in self.agent.pipelines]}

    def _config(self, args: dict[str, Any]) -> dict[str, Any]:
        toml_text = args.get("toml")
        if not isinstance(toml_text, str):
            raise CommandError("bad_request", 'config needs {"args": {"toml": "<the whole AGENT.toml>"}}')
        return self.agent.apply_config_text(toml_text)

    # --- Home Assistant ---------------------------------------------------------------------------
    def _on_ha_status(self, topic: str, payload: bytes) -> None:
        if payload.strip().lower() == b"online":
            threading.Thread(target=self.announce, name="ha-discovery", daemon=True).start()

    def announce(self) -> None:
        cfg = self.agent.config
        if not cfg.homeassistant.enabled or self.link is None:
            return
        pipes = [(p.name, p.task.package.task, p.task.package.identity()) for p in self.agent.pipelines]
        for topic, payload in discovery_messages(self.topics, pipes, cfg.homeassistant.prefix):
            self.link.publish(topic, payload, qos=1, retain=True)
        log.info("Home Assistant discovery published under %s/", cfg.homeassistant.prefix)

    # --- metrics ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"device_id": self.agent.config.device_id}
        if self.link is not None:
            extra["reconnects"] = self.link.reconnects
            extra["broker"] = self.link.address.url
        stats = self.agent.outbox_stats()
        if stats is not None:
            extra["outbox"] = stats
        extra["queue_depth"] = sum(p.queue.qsize() for p in self.agent.pipelines)
        return self.metrics.snapshot(extra)

    def _publish_metrics(self) -> None:
        interval = self.agent.config.metrics_interval_s
        while not self._stop.wait(interval):
            self.publish_metrics()

    def publish_metrics(self) -> None:
        if self.link is not None and self.link.connected:
            self.link.publish(self.topics.metrics, json.dumps(self.snapshot()).encode(), qos=0, retain=True)
