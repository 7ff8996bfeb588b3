"""Device tasks: turn one decoded input into a model call and a JSON-ready output.

One class per manifest task; imports numpy, edge_slm.runtime, edge_slm.text and tokenizers only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from edge_slm import runtime
from edge_slm.config import PipelineConfig
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.text import TextEncoder

TokenCallback = Callable[[dict[str, Any]], None]


class Task(Protocol):
    package: ModelPackage
    model: runtime.Model

    def __call__(self, text: str, params: dict[str, Any] | None = None,
                 on_token: TokenCallback | None = None) -> dict[str, Any]: ...


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def no_params(task: str, params: dict[str, Any] | None) -> None:
    if params:
        raise InputError("bad_request", f"{task} takes no parameters besides id and text; got {', '.join(sorted(params))}")


def max_length_of(package: ModelPackage, model: runtime.Model) -> int:
    value = package.preprocessing.get("max_length", model.inputs[0].shape[-1])
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{package.path}: manifest preprocessing.max_length must be a positive integer, got {value!r}")
    return value


class TextClassifier:
    """text-classification: tokenizer.json -> ids (and mask) -> model -> label, score, top labels."""

    def __init__(self, package: ModelPackage, model: runtime.Model, top_k: int = 3) -> None:
        self.package = package
        self.model = model
        self.top_k = top_k
        if package.tokenizer_path is None:
            raise ModelError(f"{package.path}: text-classification needs tokenizer.json")
        if len(model.inputs) not in (1, 2) or not all(np.issubdtype(t.dtype, np.integer) for t in model.inputs):
            raise ModelError(f"{package.path}: text-classification expects integer token ids (and an attention mask)")
        max_length = max_length_of(package, model)
        if max_length != model.inputs[0].shape[-1]:
            raise ModelError(
                f"{package.path}: manifest max_length {max_length} does not match the model input "
                f"length {model.inputs[0].shape[-1]}"
            )
        self.with_mask = len(model.inputs) == 2
        self.encoder = TextEncoder.from_file(package.tokenizer_path, max_length)
        self.labels = package.labels
        n_out = model.outputs[0].shape[-1]
        if self.labels and len(self.labels) != n_out:
            raise ModelError(f"{package.path}: {len(self.labels)} labels but the model has {n_out} outputs")

    def __call__(self, text: str, params: dict[str, Any] | None = None, on_token: TokenCallback | None = None) -> dict[str, Any]:
        no_params("text-classification", params)
        if self.with_mask:
            ids, mask, truncated = self.encoder.encode_with_mask(text)
            out = self.model.run_named(input_ids=ids, attention_mask=mask)[0]
        else:
            ids, truncated = self.encoder.encode(text)
            out = self.model.run(ids)[0]
        logits = out.reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(logits)):
            raise InputError("inference_failed", "model produced non-finite scores")
        probs = softmax(logits)
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


def _build(package: ModelPackage, model: runtime.Model, options: PipelineConfig | None) -> Task:
    task = package.task
    if task == "text-classification":
        return TextClassifier(package, model)
    if task == "embedding":
        from edge_slm.embed import SentenceEmbedder

        return SentenceEmbedder(package, model, examples=options.examples if options else None,
                                threshold=options.match_threshold if options else 0.0,
                                include_embedding=(options.include_embedding or not options.examples) if options else None)
    if task == "text-generation":
        from edge_slm.generate import TextGenerator

        g = options.generation if options else None
        defaults = {} if g is None else {
            "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_k": g.top_k,
            "top_p": g.top_p, "stop": list(g.stop), "seed": None if g.seed < 0 else g.seed}
        return TextGenerator(package, model, defaults)
    st = options.stream if options else None

    def opt(value: float) -> float | None:
        return None if value == -1 else value

    if task == "keyword-spotting":
        from edge_slm.kws import KeywordSpotter

        if st is None:
            return KeywordSpotter(package, model)
        return KeywordSpotter(package, model, threshold=opt(st.threshold), smoothing_ms=opt(st.smoothing_ms),
                              refractory_ms=opt(st.refractory_ms), stride_ms=opt(st.stride_ms),
                              vad=st.vad or None)
    if task == "sensor-anomaly":
        from edge_slm.sensor_tasks import SensorAnomalyDetector

        return SensorAnomalyDetector(package, model, hop=(st.hop or None) if st else None,
                                     threshold=opt(st.threshold) if st else None)
    if task == "sensor-classification":
        from edge_slm.sensor_tasks import SensorClassifier

        return SensorClassifier(package, model, hop=(st.hop or None) if st else None)
    raise ModelError(f"{package.path}: task {task!r} is not supported by this agent")


def load_task(package: ModelPackage, *, threads: int | None = None, backend: str | None = None,
              options: PipelineConfig | None = None) -> Task:
    """Build the task the package's manifest names, with its model loaded and checked."""
    model = runtime.load(package.model_path, threads=threads, backend=backend)
    _check_io(package, model)
    return _build(package, model, options)


def _check_io(package: ModelPackage, model: runtime.Model) -> None:
    """The manifest's inputs/outputs must describe the model that is actually there."""
    if "signatures" in package.manifest:
        declared_sigs = package.manifest["signatures"]
        if not isinstance(declared_sigs, dict) or sorted(declared_sigs) != model.signature_names():
            raise ModelError(f"{package.path}: manifest signatures do not match the model's {model.signature_names()}")
        for name, decl in declared_sigs.items():
            runner = model.signature(name)
            for section, tensors in (("inputs", runner.inputs), ("outputs", runner.outputs)):
                for d in decl.get(section, []):
                    t = tensors.get(d.get("name"))
                    if t is None or d.get("dtype") != t.dtype.name or list(d.get("shape", [])) != list(t.shape):
                        raise ModelError(f"{package.path}: manifest signature {name}.{section} {d.get('name')!r} "
                                         "does not match the model")
        return
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
