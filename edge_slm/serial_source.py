"""serial:// source: a microcontroller behind the firmware bridge streams sensor samples or audio.

Uses firmware_bridge (pyserial, the optional `edge-slm[serial]` extra). Never imports TensorFlow,
converters or devices.

    serial:///dev/ttyUSB0?baud=921600           a local port
    serial://socket://192.168.1.20:7000         any pyserial URL after serial://
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edge_slm.errors import ConfigError, EdgeSlmError
from edge_slm.sources import Deliver, RawInput, parse_options
from edge_slm.streams import AudioBlock, SensorBlock

log = logging.getLogger(__name__)

def split_spec(spec: str) -> tuple[str, float, bool]:
    """serial://... -> (the URL firmware_bridge opens, hello timeout, send start?); unknown options are named."""
    target, options = parse_options(spec, {"baud": int, "hello_timeout_s": float, "start": bool})
    if not target:
        raise ConfigError(f"source {spec!r} names no port; write serial:///dev/ttyUSB0?baud=921600")
    hello_timeout, send_start = options.get("hello_timeout_s", 5.0), options.get("start", True)
    if "://" in target:  # a pyserial URL: socket://, rfc2217://, loop://
        if "baud" in options:
            raise ConfigError(f"source {spec!r}: baud only applies to a local port")
        return target, hello_timeout, send_start
    baud = f"?baud={options['baud']}" if "baud" in options else ""
    return f"serial://{target}{baud}", hello_timeout, send_start


class SerialSource:
    """Blocks of the kind the pipeline's task takes (audio or sensor) from an McuSession.

    After every hello (boot, replug) the source sends `start` for the device's streams of that kind
    (start=0 in the spec: the firmware streams by itself). The device may be unplugged at start or
    later: the link keeps reopening, and a new hello starts a new stream (the task resets). Lost
    frames arrive as NaN samples, which sensor tasks report as missing; a device that stops talking
    is logged as stale.
    """

    finite = False

    def __init__(self, spec: str, kind: str | None = None) -> None:
        self.spec = spec
        self.url, self.hello_timeout, self.send_start = split_spec(spec)
        self.kind = kind
        self._hellos = threading.Event()
        self._stop = threading.Event()
        self.session: Any = None
        self.dropped_other_kind = 0
        self._deliver: Deliver | None = None
        try:
            import serial  # noqa: F401 - pyserial, checked before serving
        except ImportError as exc:
            raise ConfigError("source serial:// needs pyserial: pip install 'edge-slm[serial]'") from exc

    def start(self, deliver: Deliver, on_end: Callable[[], None]) -> None:
        from firmware_bridge.mcu import McuSession

        self._deliver = deliver
        self.session = McuSession.from_url(self.url, on_block=self._on_block, on_event=self._on_event)
        threading.Thread(target=self._handshake, name="source-serial-hello", daemon=True).start()

    def _handshake(self) -> None:
        try:
            hello = self.session.start(timeout=self.hello_timeout)
            log.info("serial %s: %s %s", self.url, hello.device_name, hello.firmware_version)
        except EdgeSlmError as exc:  # not there yet: the session keeps asking while the link reopens
            log.warning("serial %s: %s; still waiting for the device", self.url, exc)
        # commands cannot be sent from the session's own callbacks: this thread answers each hello
        while not self._stop.is_set():
            if self._hellos.wait(0.2):
                self._hellos.clear()
                self._start_streams()

    def _start_streams(self) -> None:
        if not self.send_start or self.session.capabilities is None:
            return
        from firmware_bridge.protocol import StreamKind

        wanted = {None: None, "audio": StreamKind.AUDIO, "sensor": StreamKind.SENSOR}[self.kind]
        for stream in self.session.capabilities.streams:
            if wanted is not None and stream.kind != wanted:
                continue
            try:
                self.session.command("start", {"stream": stream.name}, timeout=1.0, retries=3)
                log.info("serial %s: started stream %s", self.url, stream.name)
            except EdgeSlmError as exc:
                log.warning("serial %s: could not start stream %s: %s", self.url, stream.name, exc)

    def _on_block(self, block: AudioBlock | SensorBlock) -> None:
        kind = "audio" if isinstance(block, AudioBlock) else "sensor"
        if self.kind is not None and kind != self.kind:
            self.dropped_other_kind += 1
            return
        assert self._deliver is not None
        t0 = block.t0 if block.t0 is not None else 0.0
        self._deliver(RawInput(b"", f"serial:{self.url}", input_id=f"{block.stream}@{t0:.3f}", data=block))

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "hello":
            self._hellos.set()
        if kind in ("stale", "reconnect", "gap"):
            log.warning("serial %s: %s %s", self.url, kind, data)

    def counters(self) -> dict[str, Any]:
        return self.session.counters() if self.session is not None else {}

    def stop(self) -> None:
        self._stop.set()
        if self.session is not None:
            self.session.stop()

    def describe(self) -> str:
        return self.spec
