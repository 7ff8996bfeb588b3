"""An embedded MQTT broker (amqtt) on a free loopback port, run on its own thread and event loop.

For demos and simulation on a laptop; tests that need a trusted broker start mosquitto instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from edge_slm.errors import BrokerError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """amqtt broker on host:port; start() returns once it accepts connections, stop() shuts it down."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise BrokerError("the embedded broker needs amqtt: pip install 'edge-slm[sim]', or pass --broker mqtt://HOST:PORT") from exc
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(self._config(), loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise BrokerError(f"embedded broker did not start on {self.url}: {self._error or 'timeout'}")
        log.info("embedded amqtt broker on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(timeout)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.debug("amqtt shutdown raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
