"""The agent's MQTT connection: broker URLs, topic names, status with last will, QoS 1 publish.

Imports paho-mqtt 2 and the standard library; never TensorFlow.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_slm.backoff import Backoff
from edge_slm.errors import BrokerError, ConfigError
from edge_slm.netloop import NetworkLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker {url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker {url!r}: bad port") from exc
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


@dataclass(frozen=True)
class Topics:
    """Topic names under <prefix>/<device_id>/ as DESIGN.md fixes them."""

    prefix: str
    device_id: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics"

    def result(self, pipeline: str) -> str:
        return f"{self.root}/{pipeline}/result"

    def error(self, pipeline: str) -> str:
        return f"{self.root}/{pipeline}/error"

    def tokens(self, pipeline: str) -> str:
        return f"{self.root}/{pipeline}/tokens"

    def input(self, pipeline: str) -> str:
        return f"{self.root}/{pipeline}/input"


MessageHandler = Callable[[str, bytes], None]


def _set_nodelay(client, userdata, sock) -> None:  # noqa: ANN001
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (websockets/unix): nothing to tune
        pass


class MqttLink:
    """One paho client: connects with a retained 'offline' last will, says 'online', publishes QoS 1.

    paho's network thread reconnects after a drop; subscriptions are renewed on every connect.
    """

    def __init__(
        self,
        broker: str,
        client_id: str,
        topics: Topics,
        *,
        username: str = "",
        password: str = "",
        keepalive: int = 30,
        qos: int = 1,
        fallback_brokers: list[str] | None = None,
        protocol: str = "5",
        session_expiry_s: int = 3600,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.addresses = [parse_broker_url(b) for b in [broker, *(fallback_brokers or [])]]
        self.address = self.addresses[0]
        self.protocol = protocol
        self.session_expiry_s = session_expiry_s
        self.topics = topics
        self.qos = qos
        self._subs: dict[str, MessageHandler] = {}
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._lock = threading.Lock()
        self.reconnects = 0
        self._ever_connected = False
        self._online = False  # say "online" only once the agent is ready to take inputs
        self._subacks: dict[int, threading.Event] = {}
        # QoS>0 publishes not yet acknowledged. paho keeps them in memory and resends them after a
        # reconnect, but its MQTTMessageInfo raises while disconnected, so acks are tracked here.
        self._unacked: set[int] = set()
        self._acked_early: set[int] = set()
        self._ack_cv = threading.Condition()
        # Called with the mid of every publish paho reports done (PUBACK for QoS 1, written for QoS 0),
        # on paho's network thread while paho holds its message lock: it must be quick and must not
        # call publish() (the outbox only queues the mid for its sender thread).
        self.on_ack: Callable[[int], None] | None = None
        # A persistent session (MQTT 5: clean_start False + an explicit expiry; 3.1.1: clean_session
        # False) lets the broker queue inputs for the device while it is away.
        if protocol == "5":
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        else:
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                                      clean_session=False)
        self.keepalive = keepalive
        # 0 = unlimited: paho must never drop an outgoing QoS 1 result on its own.
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
        if username:
            self.client.username_pw_set(username, password or None)
        if any(a.tls for a in self.addresses) or ca_file or cert_file:
            try:
                self.client.tls_set(ca_certs=ca_file or None, certfile=cert_file or None, keyfile=key_file or None,
                                    cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[mqtt] TLS files cannot be used ({exc}); check ca_file, cert_file and key_file") from exc
        self.loop = NetworkLoop(self.client, self.addresses, Backoff(reconnect_min_s, reconnect_max_s),
                                self._connect_to)
        self.client.will_set(topics.status, b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        # Without TCP_NODELAY, Nagle's algorithm held the result publish behind the input's PUBACK
        # until a delayed ACK: measured 88 ms per round trip here instead of 0.5 ms. paho never sets it.
        self.client.on_socket_open = _set_nodelay

    def _connect_to(self, client: paho.Client, address: BrokerAddress) -> None:
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            client.connect(address.host, address.port, keepalive=self.keepalive, clean_start=False, properties=props)
        else:
            client.connect(address.host, address.port, keepalive=self.keepalive)

    # paho callbacks run on the network thread.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            log.warning("broker %s refused the connection: %s", self.loop.current.url, reason_code)
            return
        self.address = self.loop.current
        self.loop.mark_connected()
        if self._ever_connected:
            self.reconnects += 1
            log.info("reconnected to %s", self.address.url)
        else:
            log.info("connected to %s", self.address.url)
        self._ever_connected = True
        # Subscribe before saying online: the broker handles one client's packets in order, so
        # whoever sees "online" can publish inputs without racing the subscription.
        with self._lock:
            for topic in self._subs:
                client.subscribe(topic, qos=1)
            if self._online:
                client.publish(self.topics.status, b"online", qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        if reason_code != 0:
            log.warning("lost connection to %s (%s); paho will reconnect", self.address.url, reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        handler = self._subs.get(msg.topic)
        if handler is None:
            for pattern, h in self._subs.items():
                if paho.topic_matches_sub(pattern, msg.topic):
                    handler = h
                    break
        if handler is not None:
            handler(msg.topic, msg.payload)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        with self._lock:
            ev = self._subacks.pop(mid, None)
        if ev is not None:
            ev.set()

    def subscribe(self, topic: str, handler: MessageHandler, timeout: float = 10.0) -> None:
        """Route messages on topic to handler; waits for the broker's SUBACK when connected."""
        with self._lock:
            self._subs[topic] = handler
            if not self._connected.is_set():
                return  # on_connect subscribes
            ev = threading.Event()
            rc, mid = self.client.subscribe(topic, qos=1)
            if mid is not None:
                self._subacks[mid] = ev
        if rc == paho.MQTT_ERR_SUCCESS and not ev.wait(timeout):
            log.warning("no SUBACK for %s within %.0fs", topic, timeout)

    def announce_online(self) -> None:
        """Publish the retained 'online' status now and after every reconnect."""
        with self._lock:
            self._online = True
            if self._connected.is_set():
                self.client.publish(self.topics.status, b"online", qos=1, retain=True)

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the first broker that answers (in order) and wait for CONNACK, then keep the
        connection up on the network thread. BrokerError with every broker's reason if none answers."""
        urls = ", ".join(a.url for a in self.addresses)
        errors = []
        deadline = time.monotonic() + timeout
        for _ in self.addresses:
            if self.loop.try_connect_once():
                while not self._connected.is_set() and self._connect_error is None and time.monotonic() < deadline:
                    self.loop.pump(0.05)
                if self._connected.is_set():
                    self.loop.start()
                    return
                if self._connect_error is not None:
                    self.client.disconnect()
                    raise BrokerError(f"broker {self.loop.current.url} refused the connection: {self._connect_error}; "
                                      "check [mqtt] username/password or the client certificate")
                hint = " (a broker that only speaks MQTT 3.1.1, like amqtt, needs [mqtt].protocol = \"3.1.1\")" \
                    if self.protocol == "5" else ""
                errors.append(f"{self.loop.current.url}: no CONNACK within {timeout:g}s{hint}")
            else:
                errors.append(self.loop.last_error)
        raise BrokerError(f"cannot reach broker {urls}: {'; '.join(errors)}; start a broker there or set [mqtt].broker")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        with self._ack_cv:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                # an ack that beat publish() returning, or a QoS 0 write: keep only recent ones, or
                # QoS 0 token mids would pile up and collide once message ids wrap
                self._acked_early.add(mid)
                if len(self._acked_early) > 1000:
                    self._acked_early.clear()
            self._ack_cv.notify_all()
        on_ack = self.on_ack
        if on_ack is not None:
            on_ack(mid)

    def publish(self, topic: str, payload: bytes, *, qos: int | None = None, retain: bool = False) -> int:
        """Queue a message (kept by paho across reconnects for QoS>0); returns its message id."""
        qos = self.qos if qos is None else qos
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise BrokerError("MQTT client queue is full")
        if qos > 0:
            with self._ack_cv:
                if info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                else:
                    self._unacked.add(info.mid)
        return info.mid

    @property
    def unacked(self) -> int:
        with self._ack_cv:
            return len(self._unacked)

    def wait_acked(self, timeout: float) -> bool:
        """Wait until every QoS>0 publish so far is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._ack_cv:
            while self._unacked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ack_cv.wait(min(left, 0.1))
            return True

    def close(self, timeout: float = 5.0) -> bool:
        """Wait for outstanding acks, say 'offline' (retained), disconnect. False if acks were missing."""
        deadline = time.monotonic() + timeout
        acked = self.wait_acked(timeout)
        if not acked:
            log.warning("%d results were not acknowledged by %s before shutdown", self.unacked, self.address.url)
        if self.connected:
            self.publish(self.topics.status, b"offline", qos=1, retain=True)
            self.wait_acked(max(0.1, deadline - time.monotonic()))
        self.client.disconnect()
        self.loop.stop()
        return acked
