"""Compare a converted .tflite model with the float model it came from, on the user's eval set.

Host only (the candidate runs through edge_slm.runtime, exactly as on the device).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from converters.tf_env import silenced
from edge_slm import runtime


def is_classifier(ref: np.ndarray) -> bool:
    return ref.ndim == 2 and ref.shape[-1] > 1


def run_tflite(
    model_bytes: bytes,
    inputs: list[np.ndarray],
    tick: Callable[[], None] | None = None,
    names: list[str] | None = None,
) -> tuple[list[np.ndarray], float]:
    """All examples through the interpreter one at a time; returns (outputs, median invoke ms).

    With several inputs, names says which is which (TFLite orders them alphabetically).
    """
    with silenced():  # the runtime's one-time XNNPACK notice
        model = runtime.load(content=model_bytes, threads=1)
    n = len(inputs[0])
    outs: list[list[np.ndarray]] = [[] for _ in model.outputs]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        if names and len(names) > 1:
            res = model.run_named(**{n: x[i : i + 1] for n, x in zip(names, inputs)})
        else:
            res = model.run(*[x[i : i + 1] for x in inputs])
        times.append(time.perf_counter() - t0)
        for j, r in enumerate(res):
            outs[j].append(r.reshape(r.shape[1:]) if r.shape[:1] == (1,) else r)
        if tick:
            tick()
    return [np.stack(o) for o in outs], float(np.median(times) * 1000.0)


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray | None = None,
    classifier: bool | None = None,
) -> dict[str, Any]:
    """Agreement, accuracy, cosine and error of the first output; all floats rounded for the manifest."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    report: dict[str, Any] = {"n": int(len(ref))}
    finite = bool(np.all(np.isfinite(cand)))
    report["finite"] = finite
    cand = np.nan_to_num(cand, nan=0.0, posinf=0.0, neginf=0.0)
    num = np.sum(ref * cand, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)
    report["cosine_mean"] = round(float(np.mean(cos)), 6)
    report["cosine_min"] = round(float(np.min(cos)), 6)
    err = np.abs(ref - cand)
    report["max_abs_error"] = round(float(np.max(err)), 6)
    report["mean_abs_error"] = round(float(np.mean(err)), 6)
    if classifier is None:
        classifier = is_classifier(reference.reshape(len(reference), -1))
    if classifier:
        ref_top = np.argmax(ref, axis=1)
        cand_top = np.argmax(cand, axis=1)
        report["top1_agreement"] = round(float(np.mean(ref_top == cand_top)), 6)
        if labels is not None:
            y = labels.reshape(-1).astype(np.int64)
            report["accuracy_float"] = round(float(np.mean(ref_top == y)), 6)
            report["accuracy_quantized"] = round(float(np.mean(cand_top == y)), 6)
    if not finite:
        report["top1_agreement"] = 0.0 if "top1_agreement" in report else None
        report["cosine_mean"] = 0.0
    return report


def gate(report: dict[str, Any], min_agreement: float, min_cosine: float) -> dict[str, Any]:
    """The pass/fail rule, written into the manifest next to the numbers it judged."""
    if "top1_agreement" in report and report["top1_agreement"] is not None:
        metric, threshold = "top1_agreement", min_agreement
    else:
        metric, threshold = "cosine_mean", min_cosine
    value = report.get(metric) or 0.0
    passed = bool(report.get("finite", True)) and value >= threshold
    return {"metric": metric, "min": threshold, "value": value, "passed": passed}
