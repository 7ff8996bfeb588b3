"""edge-slm on the device: load a model package, run it on inputs, publish results over MQTT.

The public API is what this module re-exports. Never imports TensorFlow, converters or devices.
"""

from __future__ import annotations

from edge_slm.errors import (
    BrokerError,
    ConfigError,
    ConversionError,
    EdgeSlmError,
    FrameError,
    InputError,
    ModelError,
    RuntimeNotFoundError,
    UpdateError,
)
from edge_slm.package import ModelPackage
from edge_slm.runtime import Model, load
from edge_slm.streams import AudioBlock, SensorBlock, StreamEnd

__version__ = "0.1.0"

__all__ = [
    "AudioBlock",
    "BrokerError",
    "ConfigError",
    "ConversionError",
    "EdgeSlmError",
    "FrameError",
    "InputError",
    "Model",
    "ModelError",
    "ModelPackage",
    "RuntimeNotFoundError",
    "SensorBlock",
    "StreamEnd",
    "UpdateError",
    "__version__",
    "load",
]
