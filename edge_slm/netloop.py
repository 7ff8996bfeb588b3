"""The MQTT network loop the agent runs itself: broker failover and jittered exponential backoff.

paho's loop_start() reconnects with a doubling delay and no jitter, and to one broker only; after a
broker restart a whole fleet then comes back in the same instant. This loop drives paho's
client.loop() directly and owns the reconnect policy. Imports paho and the standard library only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from edge_slm.backoff import Backoff

log = logging.getLogger(__name__)


class NetworkLoop:
    """Keeps one paho client connected to the first broker of `addresses` that answers.

    connect_fn(client, address) performs client.connect(...) with the right protocol options; it may
    raise OSError. `connected` is set by the owner's on_connect (call `mark_connected()`), so the
    backoff resets only after a real CONNACK, not after a bare TCP connect.
    """

    def __init__(self, client: paho.Client, addresses: list[Any], backoff: Backoff,
                 connect_fn: Callable[[paho.Client, Any], None]) -> None:
        if not addresses:
            raise ValueError("at least one broker address")
        self.client = client
        self.addresses = list(addresses)
        self.backoff = backoff
        self._connect_fn = connect_fn
        self._index = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket_open = False
        self.attempts = 0
        self.last_error: str = ""

    @property
    def current(self) -> Any:
        return self.addresses[self._index]

    def mark_connected(self) -> None:
        self.backoff.reset()

    def try_connect_once(self) -> bool:
        """One connect attempt to the current broker; on failure move to the next one."""
        self.attempts += 1
        try:
            self._connect_fn(self.client, self.current)
        except (OSError, ValueError) as exc:
            self.last_error = f"{self.current.url}: {getattr(exc, 'strerror', None) or exc}"
            self._index = (self._index + 1) % len(self.addresses)
            self._socket_open = False
            return False
        self._socket_open = True
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._socket_open:
                if not self.try_connect_once():
                    self._stop.wait(self.backoff.next_delay())
                    continue
            rc = self.client.loop(timeout=0.2)
            if rc != paho.MQTT_ERR_SUCCESS and not self._stop.is_set():
                # connection lost (or refused after CONNECT): wait a jittered delay, then the next broker
                self._socket_open = False
                delay = self.backoff.next_delay()
                log.info("MQTT connection to %s lost (%s); retrying in %.2fs", self.current.url,
                         paho.error_string(rc), delay)
                if len(self.addresses) > 1:
                    self._index = (self._index + 1) % len(self.addresses)
                self._stop.wait(delay)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread; the caller disconnects first if it wants a clean DISCONNECT."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def pump(self, seconds: float) -> None:
        """Run the loop in the caller's thread for a while (used before start(), for the first CONNACK)."""
        import time

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rc = self.client.loop(timeout=0.05)
            if rc != paho.MQTT_ERR_SUCCESS:
                self._socket_open = False
                return
