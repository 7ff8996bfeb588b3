"""Device tasks for sensor streams: vibration anomaly detection and fault classification, one result per window.

numpy, edge_slm.runtime and edge_slm.sensors only; never imports TensorFlow, converters or devices.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from edge_slm import runtime
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.sensors import SensorFeatures, SensorWindower, Window
from edge_slm.streams import SensorBlock, StreamOutput


def reconstruction_error(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Mean squared error over the last axis between normalized features and their reconstruction."""
    d = np.asarray(x, np.float64) - np.asarray(recon, np.float64)
    return np.mean(d * d, axis=-1)


def error_to_score(error: np.ndarray | float, scale: float) -> np.ndarray | float:
    """Squash a reconstruction error into [0, 1): error / (error + scale); scale is the median normal error.

    Monotonic, so detection quality is unchanged; 0.5 is a typical normal window.
    """
    return error / (error + scale)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x)
    e = np.exp(z)
    return e / np.sum(e)


class _SensorStream(ABC):
    """What both sensor tasks share: manifest checks, windowing, stream changes, one-shot windows."""

    input_kind = "sensor"
    task_name = ""

    def __init__(self, package: ModelPackage, model: runtime.Model, hop: int | None) -> None:
        self.package = package
        self.model = model
        prep = package.preprocessing
        self.features = SensorFeatures.from_manifest(prep.get("features"), f"{package.path}: preprocessing.features")
        if self.features.mean is None or self.features.std is None:
            raise ModelError(f"{package.path}: preprocessing.features has no mean/std; re-train the model")
        if len(model.inputs) != 1 or model.inputs[0].shape[-1] != self.features.n_features:
            raise ModelError(f"{package.path}: the model takes {[list(t.shape) for t in model.inputs]} but the "
                             f"manifest's features make {self.features.n_features} values per window")
        hop = hop if hop else prep.get("hop", self.features.window // 2)
        if not isinstance(hop, int) or isinstance(hop, bool) or hop < 1:
            raise ModelError(f"{package.path}: sensor hop must be a positive number of samples, got {hop!r}")
        self.hop = hop
        self.sample_rate = self.features.sample_rate
        self.channels = self.features.channels
        self.window = self.features.window
        self.windower = SensorWindower(self.window, hop, self.channels, self.sample_rate,
                                       full_scale=self.features.full_scale, units=self.features.units)
        self._stream: str | None = None
        self.invocations = 0  # model runs so far: errors never reach the model

    def feed(self, block: SensorBlock) -> list[StreamOutput]:
        """Buffer BLOCK; return one result (or InputError) per window it completes."""
        if not isinstance(block, SensorBlock):
            return [InputError("bad_request", f"{self.task_name} takes sensor blocks, got {type(block).__name__}")]
        if self._stream is not None and block.stream != self._stream:
            self.reset()
        self._stream = block.stream
        return [item if isinstance(item, InputError) else self._result(item)
                for item in self.windower.feed(block)]

    def flush(self) -> list[StreamOutput]:
        """The stream ended; a partial window is not analysed (reported when the stream had no window at all)."""
        out: list[StreamOutput] = list(self.windower.flush())
        self._stream = None
        return out

    def reset(self) -> None:
        self.windower.reset()
        self._stream = None

    def classify_window(self, samples: np.ndarray, sample_rate: float) -> dict[str, Any]:
        """One window given whole ([window, channels] in the manifest's channel order); raises InputError."""
        arr = np.asarray(samples, dtype=np.float32)
        if arr.ndim == 1 and len(self.channels) == 1:
            arr = arr[:, None]
        n_ch = len(self.channels)
        if arr.ndim == 2 and arr.shape == (n_ch, self.window) and arr.shape[1] != n_ch:
            arr = arr.T  # given channel-major
        if arr.ndim != 2 or arr.shape != (self.window, n_ch):
            raise InputError("bad_window", f"{self.task_name} needs one window of {self.window} samples x {n_ch} "
                                           f"channels ({', '.join(self.channels)}), got shape {list(arr.shape)}")
        one = SensorWindower(self.window, self.window, self.channels, self.sample_rate,
                             full_scale=self.features.full_scale, units=self.features.units)
        items = one.feed(SensorBlock(arr, sample_rate, self.channels))
        if isinstance(items[0], InputError):
            raise items[0]
        return self._result(items[0])

    def _result(self, w: Window) -> dict[str, Any]:
        x = self.features(w.samples)
        self.invocations += 1
        y = self.model.run(x[None, :])[0].reshape(-1)
        if not np.all(np.isfinite(y)):
            raise InputError("inference_failed", "the model produced non-finite values")
        return self._output(x, y) | {"t_start": round(w.t_start, 6), "t_end": round(w.t_end, 6)}

    @abstractmethod
    def _output(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """The task's answer for one window: features x, model output y."""


class SensorAnomalyDetector(_SensorStream):
    """sensor-anomaly: autoencoder reconstruction error of each window's features, against a threshold.

    The manifest's preprocessing.anomaly holds the threshold (score units, calibrated on held-out
    normal machines) and error_scale; threshold= overrides it for this device.
    """

    task_name = "sensor-anomaly"

    def __init__(self, package: ModelPackage, model: runtime.Model, *, hop: int | None = None,
                 threshold: float | None = None) -> None:
        super().__init__(package, model, hop)
        if model.outputs[0].shape[-1] != self.features.n_features:
            raise ModelError(f"{package.path}: an anomaly autoencoder must output {self.features.n_features} values, "
                             f"the model outputs {list(model.outputs[0].shape)}")
        anomaly = package.preprocessing.get("anomaly")
        if not isinstance(anomaly, dict):
            raise ModelError(f"{package.path}: preprocessing.anomaly (threshold, error_scale) is missing; re-train the model")
        for key in ("threshold", "error_scale"):
            v = anomaly.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ModelError(f"{package.path}: preprocessing.anomaly.{key} must be a positive number, got {v!r}")
        self.error_scale = float(anomaly["error_scale"])
        self.threshold = float(anomaly["threshold"] if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ModelError(f"anomaly threshold is a score in (0, 1), got {self.threshold}")
        self._per_channel = self.features.per_channel

    def _output(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        err = float(reconstruction_error(x, y))
        score = float(error_to_score(err, self.error_scale))
        per_ch = ((x.astype(np.float64) - y) ** 2).reshape(len(self.channels), self._per_channel).mean(axis=1)
        return {
            "anomaly": score > self.threshold,
            "score": round(score, 6),
            "threshold": round(self.threshold, 6),
            "error": round(err, 6),
            "channel": self.channels[int(np.argmax(per_ch))],  # where the window differs most from normal
        }


class SensorClassifier(_SensorStream):
    """sensor-classification: features of each window -> model -> label, score and top labels."""

    task_name = "sensor-classification"

    def __init__(self, package: ModelPackage, model: runtime.Model, *, hop: int | None = None, top_k: int = 3) -> None:
        super().__init__(package, model, hop)
        self.labels = package.labels
        n_out = model.outputs[0].shape[-1]
        if not self.labels or len(self.labels) != n_out:
            raise ModelError(f"{package.path}: {len(self.labels)} labels but the model has {n_out} outputs")
        self.top_k = max(1, int(top_k))

    def _output(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        probs = _softmax(y.astype(np.float64))
        order = np.argsort(-probs)
        return {
            "label": self.labels[int(order[0])],
            "score": round(float(probs[order[0]]), 6),
            "top": [{"label": self.labels[int(i)], "score": round(float(probs[i]), 6)} for i in order[: self.top_k]],
        }
