"""The edge-slm error hierarchy: one root, one subclass per kind of failure.

Must never import TensorFlow or anything outside the standard library.
"""

from __future__ import annotations


class EdgeSlmError(Exception):
    """Root of every error edge-slm raises on purpose; the CLI prints its message as one line."""


class ConfigError(EdgeSlmError):
    """A configuration file or value is wrong; the message names the key and the file."""


class ModelError(EdgeSlmError):
    """A model package or .tflite file is missing, corrupt, or does not match its manifest."""


class RuntimeNotFoundError(ModelError):
    """No TFLite interpreter (ai-edge-litert, tflite-runtime, tensorflow) could be imported."""


class InputError(EdgeSlmError):
    """One input cannot be processed; carries a stable code for the error record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConversionError(EdgeSlmError):
    """Converting or validating a model failed (host side)."""


class BrokerError(EdgeSlmError):
    """The MQTT broker cannot be reached or refused the connection."""


class UpdateError(EdgeSlmError):
    """A model update was refused or could not be applied; carries a stable code for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FrameError(EdgeSlmError):
    """A serial-bridge frame or payload cannot be built or parsed; the message says which field."""
