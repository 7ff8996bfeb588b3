"""Serial link to microcontrollers: frame protocol (Python + C99), pyserial link, device session.

Must never import TensorFlow. SerialLink and McuSession need pyserial and load on first use, so
`firmware_bridge.protocol` (and the TFLM exporter) work without it.
"""

from __future__ import annotations

from typing import Any

from firmware_bridge.protocol import (
    PROTOCOL_VERSION,
    AckStatus,
    Command,
    CommandId,
    Frame,
    FrameDecoder,
    Heartbeat,
    Hello,
    LogLevel,
    MsgType,
    StreamInfo,
    StreamKind,
    encode_frame,
)

__all__ = [
    "PROTOCOL_VERSION",
    "AckStatus",
    "Command",
    "CommandId",
    "Frame",
    "FrameDecoder",
    "Heartbeat",
    "Hello",
    "LogLevel",
    "MsgType",
    "StreamInfo",
    "StreamKind",
    "encode_frame",
    "SerialLink",
    "McuSession",
    "Ack",
    "link_from_url",
]

_LAZY = {"SerialLink": "firmware_bridge.link", "McuSession": "firmware_bridge.mcu", "Ack": "firmware_bridge.mcu",
         "link_from_url": "firmware_bridge.mcu"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'firmware_bridge' has no attribute {name!r}")
