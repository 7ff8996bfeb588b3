"""Device tasks: turn one decoded input into a model call and a JSON-ready output.

One class per manifest task; imports numpy, edge_slm.runtime and edge_slm.text only.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edge_slm import runtime
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.text import TextEncoder


class Task(Protocol):
    package: ModelPackage
    model: runtime.Model

    def __call__(self, text: str) -> dict[str, Any]: ...


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


class TextClassifier:
    """text-classification: tokenizer.json -> ids -> model -> label, score and every label's score."""

    def __init__(self, package: ModelPackage, model: runtime.Model, top_k: int = 3) -> None:
        self.package = package
        self.model = model
        self.top_k = top_k
        if package.tokenizer_path is None:
            raise ModelError(f"{package.path}: text-classification needs tokenizer.json")
        if len(model.inputs) != 1 or not np.issubdtype(model.inputs[0].dtype, np.integer):
            raise ModelError(f"{package.path}: text-classification expects one integer token-id input")
        max_length = int(package.preprocessing.get("max_length", model.inputs[0].shape[-1]))
        if max_length != model.inputs[0].shape[-1]:
            raise ModelError(
                f"{package.path}: manifest max_length {max_length} does not match the model input "
                f"length {model.inputs[0].shape[-1]}"
            )
        self.encoder = TextEncoder.from_file(package.tokenizer_path, max_length)
        self.labels = package.labels
        n_out = model.outputs[0].shape[-1]
        if self.labels and len(self.labels) != n_out:
            raise ModelError(f"{package.path}: {len(self.labels)} labels but the model has {n_out} outputs")
        self.apply_softmax = bool(package.preprocessing.get("logits", True))

    def __call__(self, text: str) -> dict[str, Any]:
        ids, truncated = self.encoder.encode(text)
        out = self.model.run(ids)[0].reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(out)):
            raise InputError("inference_failed", "model produced non-finite scores")
        probs = softmax(out) if self.apply_softmax else out
        order = np.argsort(-probs)
        names = self.labels or [str(i) for i in range(len(probs))]
        result: dict[str, Any] = {
            "label": names[int(order[0])],
            "score": round(float(probs[order[0]]), 6),
            "top": [{"label": names[int(i)], "score": round(float(probs[i]), 6)} for i in order[: self.top_k]],
        }
        if truncated:
            result["truncated"] = True
        return result


TASKS = {"text-classification": TextClassifier}


def load_task(package: ModelPackage, *, threads: int | None = None, backend: str | None = None) -> Task:
    """Build the task the package's manifest names, with its model loaded and checked."""
    cls = TASKS.get(package.task)
    if cls is None:
        raise ModelError(
            f"{package.path}: task {package.task!r} is not supported by this agent yet "
            f"(supported: {', '.join(TASKS)})"
        )
    model = runtime.load(package.model_path, threads=threads, backend=backend)
    _check_io(package, model)
    return cls(package, model)


def _check_io(package: ModelPackage, model: runtime.Model) -> None:
    """The manifest's inputs/outputs must describe the model that is actually there."""
    for section, tensors in (("inputs", model.inputs), ("outputs", model.outputs)):
        declared = package.manifest[section]
        if len(declared) != len(tensors):
            raise ModelError(
                f"{package.path}: manifest lists {len(declared)} {section}, the model has {len(tensors)}"
            )
        for d, t in zip(declared, tensors):
            if d["dtype"] != t.dtype.name or list(d["shape"]) != list(t.shape):
                raise ModelError(
                    f"{package.path}: manifest {section} {d['name']!r} is {d['dtype']}{d['shape']} "
                    f"but the model has {t.dtype.name}{list(t.shape)}"
                )
