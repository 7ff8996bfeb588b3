"""Load what the user converts (.keras file or SavedModel dir) as a batch-1 float reference.

Host only: imports TensorFlow through converters.tf_env.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.tf_env import tf
from edge_slm.errors import ConversionError


@dataclass
class SourceModel:
    """A float model with a fixed batch-1 signature: what the converter sees and the validator trusts."""

    path: Path
    format: str  # "keras" or "saved_model"
    input_names: list[str]
    input_specs: list[tuple[tuple[int, ...], np.dtype]]  # per-example shape (no batch), dtype
    keras_model: Any = None  # batch-1 Keras model (format keras)
    saved_model_dir: Path | None = None  # batch-1 SavedModel (format saved_model)
    _fn: Any = None
    _tmp: Any = None

    def predict(self, inputs: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """Float reference outputs for N examples, in batches; each output is (N, ...)."""
        n = len(inputs[0])
        outs: list[list[np.ndarray]] = []
        for start in range(0, n, batch_size):
            chunk = [x[start : start + batch_size] for x in inputs]
            res = self._fn(chunk)
            outs.append([np.asarray(r) for r in res])
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]

    _sha: str | None = None

    def sha256(self) -> str:
        if self._sha is not None:
            return self._sha
        h = hashlib.sha256()
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        for f in files:
            h.update(f.read_bytes())
        return h.hexdigest()


def load_source_model(path: str | Path) -> SourceModel:
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"model not found: {p}")
    if p.is_file() and p.suffix == ".keras":
        return _load_keras(p)
    if p.is_dir() and (p / "saved_model.pb").is_file():
        return _load_saved_model(p)
    raise ConversionError(f"{p}: expected a Keras 3 .keras file or a SavedModel directory (with saved_model.pb)")


def _load_keras(p: Path) -> SourceModel:
    keras = tf().keras
    try:
        model = keras.models.load_model(p, compile=False)
    except Exception as exc:
        raise ConversionError(f"{p}: Keras could not load it ({type(exc).__name__}: {exc})") from exc
    return source_from_keras(model, p, "keras")


def source_from_keras(model: Any, path: Path, fmt: str = "keras", sha256: str | None = None) -> SourceModel:
    """Wrap an in-memory Keras model: batch-1 copy for the converter, batched calls for the reference."""
    keras = tf().keras
    try:
        model_inputs = list(model.inputs)
    except (AttributeError, ValueError):
        model_inputs = []
    if not model_inputs:
        raise ConversionError(f"{path}: the model has no defined inputs; save a functional or Sequential model built on keras.Input")
    fixed_inputs = []
    specs = []
    names = []
    for i, t_in in enumerate(model_inputs):
        shape = tuple(t_in.shape[1:])
        if any(d is None for d in shape):
            raise ConversionError(
                f"{path}: input {i} has a variable dimension {tuple(t_in.shape)}; edge devices need fixed shapes, "
                "rebuild the model with keras.Input(shape=(LENGTH, ...))"
            )
        dtype = np.dtype(t_in.dtype)
        name = getattr(t_in, "name", None) or f"input_{i}"
        names.append(name)
        specs.append((tuple(int(d) for d in shape), dtype))
        # keep the user's input names: they become the TFLite signature's input names
        fixed_inputs.append(keras.Input(shape=shape, batch_size=1, dtype=str(dtype), name=name))
    out = model(fixed_inputs if len(fixed_inputs) > 1 else fixed_inputs[0])
    fixed = keras.Model(fixed_inputs, out)

    def fn(chunk: list[np.ndarray]) -> list[np.ndarray]:
        res = model(chunk if len(chunk) > 1 else chunk[0], training=False)
        return [np.asarray(r) for r in (res if isinstance(res, (list, tuple)) else [res])]

    src = SourceModel(path, fmt, names, specs, keras_model=fixed, _fn=fn)
    if sha256 is not None:
        src._sha = sha256
    return src


def _load_saved_model(p: Path) -> SourceModel:
    t = tf()
    try:
        loaded = t.saved_model.load(str(p))
    except Exception as exc:
        raise ConversionError(f"{p}: TensorFlow could not load the SavedModel ({exc})") from exc
    sigs = loaded.signatures
    if "serving_default" not in sigs:
        raise ConversionError(f"{p}: no serving_default signature (found: {', '.join(sigs) or 'none'})")
    sig = sigs["serving_default"]
    arg_specs = sig.structured_input_signature[1]
    names = sorted(arg_specs)
    specs = []
    for n in names:
        s = arg_specs[n]
        shape = tuple(s.shape[1:])
        if any(d is None for d in shape):
            raise ConversionError(f"{p}: input {n!r} has a variable dimension {s.shape}; export it with a fixed shape")
        specs.append((tuple(int(d) for d in shape), np.dtype(s.dtype.as_numpy_dtype)))
    out_keys = sorted(sig.structured_outputs)

    # Re-export with a batch-1 signature: from_saved_model then sees fixed shapes. (from_concrete_functions
    # was measured to produce a silently broken model, so it is never used.)
    module = t.Module()
    module.loaded = loaded  # tracks the variables the signature captures
    module.sig = sig
    tensor_specs = [t.TensorSpec((1, *shape), t.as_dtype(dtype), name=n) for n, (shape, dtype) in zip(names, specs)]

    @t.function(input_signature=tensor_specs)
    def serve(*args):  # noqa: ANN202
        res = module.sig(**dict(zip(names, args)))
        return {k: res[k] for k in out_keys}

    tmp = tempfile.TemporaryDirectory(prefix="edge-slm-sm-")
    fixed_dir = Path(tmp.name) / "batch1"
    t.saved_model.save(module, str(fixed_dir), signatures={"serving_default": serve})

    def fn(chunk: list[np.ndarray]) -> list[np.ndarray]:
        res = sig(**{n: t.constant(x) for n, x in zip(names, chunk)})
        return [res[k].numpy() for k in out_keys]

    return SourceModel(p, "saved_model", names, specs, saved_model_dir=fixed_dir, _fn=fn, _tmp=tmp)
