"""Blocks of audio and sensor samples as sources hand them to streaming tasks, and the task contract.

numpy only. Sources (wav, microphone, serial, MQTT chunks) make blocks; keyword-spotting and sensor
tasks consume them. Never imports TensorFlow, converters or devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge_slm.errors import InputError
from edge_slm.package import ModelPackage
from edge_slm.runtime import Model


@dataclass
class AudioBlock:
    """Mono audio. samples: float32 [n] in [-1, 1]; t0: stream time (s) of the first sample."""

    samples: np.ndarray
    sample_rate: int
    t0: float | None = None
    stream: str = ""  # a new value tells the task a new stream began (another file, a reconnected MCU)

    def __post_init__(self) -> None:
        self.samples = np.asarray(self.samples, dtype=np.float32).reshape(-1)
        if int(self.sample_rate) <= 0:
            raise InputError("bad_audio", f"sample rate must be positive, got {self.sample_rate}")
        self.sample_rate = int(self.sample_rate)


@dataclass
class SensorBlock:
    """Sensor samples. samples: float32 [n, channels]; NaN marks a sample that did not arrive."""

    samples: np.ndarray
    sample_rate: float
    channels: Sequence[str] = field(default_factory=tuple)
    t0: float | None = None
    stream: str = ""
    units: str = ""  # "": already in the model's units; "si": SI units (m/s^2, rad/s), as the serial bridge sends

    def __post_init__(self) -> None:
        a = np.asarray(self.samples, dtype=np.float32)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2:
            raise InputError("bad_sensor_block", f"sensor samples must be [n, channels], got shape {a.shape}")
        self.samples = a
        if not self.sample_rate or float(self.sample_rate) <= 0:
            raise InputError("bad_sensor_block", f"sample rate must be positive, got {self.sample_rate}")
        self.sample_rate = float(self.sample_rate)
        if not self.channels:
            self.channels = tuple(f"ch{i}" for i in range(a.shape[1]))
        if len(self.channels) != a.shape[1]:
            raise InputError("bad_sensor_block", f"{len(self.channels)} channel names for {a.shape[1]} channels")


@dataclass
class StreamEnd:
    """Delivered after the last block of a finite stream (the end of a WAV file): the task flushes."""

    stream: str = ""


Block = AudioBlock | SensorBlock
# What feed() returns: outputs (JSON-ready dicts, one result record each) and InputErrors (one error record each).
StreamOutput = dict[str, Any] | InputError


class StreamTask(Protocol):
    """A task that consumes a stream of blocks and emits zero or more outputs per block."""

    package: ModelPackage
    model: Model
    input_kind: str  # "audio" or "sensor"

    def feed(self, block: Block) -> list[StreamOutput]: ...

    def flush(self) -> list[StreamOutput]:
        """The stream ended: emit what the buffered tail still yields."""
        ...

    def reset(self) -> None:
        """Forget buffered samples (a new stream starts)."""
        ...
