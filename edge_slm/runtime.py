"""Load and run a .tflite model through whichever TFLite interpreter this machine has.

Device path: imports numpy and one interpreter backend, never TensorFlow unless asked to fall back.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_slm.errors import InputError, ModelError, RuntimeNotFoundError

log = logging.getLogger(__name__)

# Tried in this order unless the caller (or EDGE_SLM_RUNTIME, read only by the CLI) says otherwise.
BACKENDS: dict[str, str] = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
    # Not "tensorflow.lite": importing that path gives the bare package, which has no Interpreter.
    "tensorflow": "tensorflow.lite.python.interpreter",
}


@dataclass(frozen=True)
class TensorInfo:
    """What a model input or output looks like: name, dtype, shape and int8 quantization."""

    name: str
    index: int
    dtype: np.dtype
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer) and self.dtype.itemsize == 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


def _import_backend(name: str) -> Any:
    if name not in BACKENDS:
        raise RuntimeNotFoundError(
            f"unknown runtime {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    module = importlib.import_module(BACKENDS[name])
    return module.Interpreter


def available_backends() -> list[str]:
    """Names of the interpreter backends that import on this machine, in preference order."""
    found = []
    for name in BACKENDS:
        try:
            _import_backend(name)
        except ImportError:
            continue
        found.append(name)
    return found


def _tensor_info(detail: dict[str, Any]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorInfo(
        name=detail["name"],
        index=detail["index"],
        dtype=np.dtype(detail["dtype"]),
        shape=tuple(int(d) for d in detail["shape"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float values to the tensor's integer type with its own scale and zero point (round half to even, clipped)."""
    limits = np.iinfo(info.dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / info.scale) + info.zero_point
    return np.clip(q, limits.min, limits.max).astype(info.dtype)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Integer tensor values back to float32 with the tensor's scale and zero point."""
    return ((q.astype(np.int32) - info.zero_point) * info.scale).astype(np.float32)


class Model:
    """A loaded .tflite model: float in, float out, whatever the tensors hold inside.

    Inputs given as float are quantized when the input tensor is int8/uint8; integer inputs
    (token ids) are passed as they are, after a dtype and shape check. Outputs are dequantized.
    """

    def __init__(self, interpreter: Any, backend: str, path: Path | None, threads: int | None) -> None:
        self._interp = interpreter
        self.backend = backend
        self.path = path
        self.threads = threads
        self._interp.allocate_tensors()
        self.inputs = [_tensor_info(d) for d in self._interp.get_input_details()]
        self.outputs = [_tensor_info(d) for d in self._interp.get_output_details()]

    def _prepare(self, value: np.ndarray, info: TensorInfo) -> np.ndarray:
        arr = np.asarray(value)
        if arr.shape != info.shape:
            if arr.size == int(np.prod(info.shape)) and arr.ndim == len(info.shape) - 1:
                arr = arr.reshape(info.shape)  # a single example without its batch axis
            else:
                raise InputError(
                    "bad_shape",
                    f"input {info.name!r} expects shape {list(info.shape)}, got {list(arr.shape)}",
                )
        if info.quantized:
            if np.issubdtype(arr.dtype, np.floating):
                return quantize(arr, info)
            if arr.dtype != info.dtype:
                raise InputError(
                    "bad_dtype", f"input {info.name!r} expects float or {info.dtype.name}, got {arr.dtype.name}"
                )
            return arr
        if np.issubdtype(info.dtype, np.integer):
            if not np.issubdtype(arr.dtype, np.integer):
                raise InputError(
                    "bad_dtype", f"input {info.name!r} expects integer ids ({info.dtype.name}), got {arr.dtype.name}"
                )
            return arr.astype(info.dtype)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError("bad_dtype", f"input {info.name!r} expects numbers, got {arr.dtype.name}")
        return arr.astype(info.dtype)

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Run one example (batch 1). Returns every output as float32 (dequantized) or its integer type."""
        if len(inputs) != len(self.inputs):
            raise InputError("bad_input_count", f"model takes {len(self.inputs)} input(s), got {len(inputs)}")
        for value, info in zip(inputs, self.inputs):
            self._interp.set_tensor(info.index, self._prepare(value, info))
        self._interp.invoke()
        return [self.read_output(i) for i in range(len(self.outputs))]

    def read_output(self, i: int) -> np.ndarray:
        info = self.outputs[i]
        raw = self._interp.get_tensor(info.index)
        return dequantize(raw, info) if info.quantized else raw.copy()

    def input_position(self, name: str) -> int:
        """Index in self.inputs of the input called name ("input_ids" finds "serving_default_input_ids:0")."""
        for i, info in enumerate(self.inputs):
            bare = info.name.split(":")[0].removeprefix("serving_default_")
            if bare == name:
                return i
        raise ModelError(f"model has no input named {name!r} (inputs: {[t.name for t in self.inputs]})")

    def run_named(self, **inputs: np.ndarray) -> list[np.ndarray]:
        """Like run(), with inputs given by name; converters order TFLite inputs alphabetically."""
        ordered: list[np.ndarray | None] = [None] * len(self.inputs)
        for name, value in inputs.items():
            ordered[self.input_position(name)] = value
        missing = [self.inputs[i].name for i, v in enumerate(ordered) if v is None]
        if missing:
            raise InputError("bad_input_count", f"missing model inputs {missing}")
        return self.run(*ordered)  # type: ignore[arg-type]

    def signature_names(self) -> list[str]:
        try:
            return sorted(self._interp.get_signature_list())
        except AttributeError:
            return []

    def signature(self, name: str) -> SignatureRunner:
        """A callable for one of the model's signatures (e.g. a decoder's prefill and decode)."""
        if name not in self.signature_names():
            raise ModelError(f"model has no signature {name!r} (has: {self.signature_names()})")
        return SignatureRunner(self._interp.get_signature_runner(name), name)

    def invoke_raw(self) -> None:
        """Invoke on whatever the input tensors hold now (for benchmarks)."""
        self._interp.invoke()

    def op_names(self) -> list[str]:
        """Builtin op names used by the model (best effort; empty when the backend cannot tell)."""
        try:
            ops = self._interp._get_ops_details()  # noqa: SLF001 - only public way to list ops
        except AttributeError:
            return []
        return sorted({op["op_name"] for op in ops})


class SignatureRunner:
    """Named inputs in, named outputs out, for one signature; checks names and shapes first."""

    def __init__(self, runner: Any, name: str) -> None:
        self._runner = runner
        self.name = name
        self.inputs = {k: _tensor_info(v) for k, v in runner.get_input_details().items()}
        self.outputs = {k: _tensor_info(v) for k, v in runner.get_output_details().items()}

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if set(inputs) != set(self.inputs):
            raise InputError("bad_input_count", f"signature {self.name} takes {sorted(self.inputs)}, got {sorted(inputs)}")
        feed = {}
        for key, value in inputs.items():
            info = self.inputs[key]
            arr = np.asarray(value)
            if arr.shape != info.shape:
                raise InputError("bad_shape", f"{self.name}.{key} expects shape {list(info.shape)}, got {list(arr.shape)}")
            feed[key] = quantize(arr, info) if info.quantized and np.issubdtype(arr.dtype, np.floating) else arr.astype(info.dtype)
        out = self._runner(**feed)
        return {k: dequantize(v, self.outputs[k]) if self.outputs[k].quantized else v for k, v in out.items()}


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    content: bytes | None = None,
    backend: str | None = None,
    threads: int | None = None,
) -> Model:
    """Load a .tflite model from a path (or bytes) with the first backend that imports.

    backend: "ai-edge-litert", "tflite-runtime" or "tensorflow" to force one.
    threads: interpreter threads (None lets the runtime decide).
    """
    if (path is None) == (content is None):
        raise ValueError("give exactly one of path or content")
    model_path = Path(path) if path is not None else None
    if model_path is not None:
        if not model_path.is_file():
            raise ModelError(f"model file not found: {model_path}")
        content = model_path.read_bytes()
    assert content is not None
    if len(content) < 8 or content[4:8] != b"TFL3":
        where = model_path or "model bytes"
        raise ModelError(f"{where} is not a TFLite flatbuffer (no TFL3 identifier); re-run edge-slm convert")

    order = [backend] if backend else list(BACKENDS)
    errors: list[str] = []
    for name in order:
        try:
            interpreter_cls = _import_backend(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        try:
            interp = interpreter_cls(model_content=content, num_threads=threads)
            model = Model(interp, name, model_path, threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model_path or 'model'} cannot be loaded by {name}: {exc}") from exc
        log.debug("loaded %s with %s", model_path, name)
        return model
    raise RuntimeNotFoundError(
        "no TFLite runtime could be imported (" + "; ".join(errors) + "); pip install ai-edge-litert"
    )
