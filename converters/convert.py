"""Convert a float model to a validated model package: try recipes, gate each, keep the best.

Host only. `auto` tries int8, int8-float-attention and dynamic, and keeps the smallest that passes.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters import recipes as _recipes
from converters.source_model import SourceModel, load_source_model
from converters.tf_env import console, silenced
from converters.tflite_info import describe
from converters.validate import compare, gate, run_tflite
from edge_slm import runtime
from edge_slm.errors import ConversionError
from edge_slm.package import LABELS_FILE, TASKS, TOKENIZER_FILE, ModelPackage, write_package

log = logging.getLogger(__name__)

RECIPES = _recipes.RECIPES
AUTO_ORDER = ("int8", "int8-float-attention", "dynamic")
QUANTIZE_CHOICES = ("auto", "int8", "int8-float-attention", "dynamic", "float16", "float32")


@dataclass
class Attempt:
    """One recipe tried: its size, validation numbers and gate verdict (or why it did not convert)."""

    recipe: str
    size_bytes: int = 0
    latency_ms: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    model_bytes: bytes = b""

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.gate.get("passed"))

    def to_json(self) -> dict[str, Any]:
        d = {"recipe": self.recipe, "size_bytes": self.size_bytes, "latency_ms": round(self.latency_ms, 4),
             "passed": self.passed, **self.report}
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class ConversionResult:
    package: ModelPackage | None
    chosen: str | None
    reason: str
    attempts: list[Attempt]
    baseline: Attempt | None


class GateError(ConversionError):
    """No recipe met the validation gate; carries every attempt for the report."""

    def __init__(self, message: str, attempts: list[Attempt], baseline: Attempt | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.baseline = baseline


def load_npz(path: str | Path, src: SourceModel, what: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Arrays for the model's inputs (key 'x' for one input, else the input names) and labels 'y'."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"{what} file not found: {p}")
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{p}: not a readable .npz file ({exc})") from exc
    keys = list(data.keys())
    arrays = []
    for i, (name, (shape, dtype)) in enumerate(zip(src.input_names, src.input_specs)):
        candidates = ([name, "x"] if len(src.input_names) == 1 else [name, f"x{i}"])
        key = next((k for k in candidates if k in keys), None)
        if key is None:
            raise ConversionError(f"{p}: no array for input {name!r}; store it under key {candidates[-1]!r} (found {keys})")
        arr = data[key]
        if tuple(arr.shape[1:]) != shape:
            raise ConversionError(f"{p}: key {key!r} has shape {arr.shape}, the model takes (N, {', '.join(map(str, shape))})")
        if np.issubdtype(dtype, np.integer) != np.issubdtype(arr.dtype, np.integer):
            raise ConversionError(f"{p}: key {key!r} is {arr.dtype}, the model input is {dtype}")
        arrays.append(arr.astype(dtype))
    if len(arrays[0]) == 0:
        raise ConversionError(f"{p}: {what} set is empty")
    if any(len(a) != len(arrays[0]) for a in arrays):
        raise ConversionError(f"{p}: inputs have different numbers of examples")
    labels = None
    for k in ("y", "labels"):
        if k in keys:
            labels = data[k]
            if len(labels) != len(arrays[0]):
                raise ConversionError(f"{p}: key {k!r} has {len(labels)} labels for {len(arrays[0])} examples")
            break
    return arrays, labels


def _tqdm_progress(enabled: bool) -> Callable[[int, str], Callable[[], None]] | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bars: list[Any] = []

    def factory(total: int, desc: str) -> Callable[[], None]:
        bar = tqdm(total=total, desc=desc, unit="ex", leave=False, dynamic_ncols=True, file=console())
        bars.append(bar)

        def tick() -> None:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return tick

    return factory


def _try(recipe: str, src: SourceModel, calib, ev, labels, reference, min_agreement, min_cosine, progress) -> Attempt:  # noqa: ANN001
    attempt = Attempt(recipe)
    try:
        attempt.model_bytes = _recipes.convert(src, recipe, calib, progress)
    except ConversionError as exc:
        attempt.error = str(exc)
        return attempt
    attempt.size_bytes = len(attempt.model_bytes)
    tick = progress(len(ev[0]), f"validating {recipe}") if progress else None
    try:
        outputs, attempt.latency_ms = run_tflite(attempt.model_bytes, ev, tick)
    except Exception as exc:  # a model that converts but cannot run is a failed recipe, not a crash
        attempt.error = f"recipe {recipe} converted but does not run: {exc}"
        return attempt
    attempt.report = compare(reference[0], outputs[0], labels)
    attempt.gate = gate(attempt.report, min_agreement, min_cosine)
    return attempt


def convert_model(
    model: str | Path,
    out: str | Path,
    *,
    calib: str | Path | None = None,
    eval_data: str | Path,
    quantize: str = "auto",
    min_agreement: float = 0.99,
    min_cosine: float = 0.99,
    task: str | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    tokenizer: str | Path | None = None,
    labels: list[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    progress: bool = True,
    say: Callable[[str], None] = lambda s: None,
) -> ConversionResult:
    """Convert MODEL into a package at OUT; raise GateError (nothing written) when no recipe passes."""
    if quantize not in QUANTIZE_CHOICES:
        raise ConversionError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConversionError(f"tokenizer not found: {tokenizer}")
    task = task or ("text-classification" if tokenizer else None)
    if task is None:
        raise ConversionError(f"say what the model does with --task ({', '.join(TASKS)})")
    if task not in TASKS:
        raise ConversionError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "text-classification" and tokenizer is None:
        raise ConversionError("text-classification needs the tokenizer: --tokenizer tokenizer.json")
    wanted = AUTO_ORDER if quantize == "auto" else (quantize,)
    if calib is None and any(r.startswith("int8") for r in wanted):
        raise ConversionError(f"--quantize {quantize} needs calibration data: --calib CALIB.npz (a few hundred typical inputs)")

    say(f"loading {model}")
    with silenced():
        src = load_source_model(model)
    calib_arrays = load_npz(calib, src, "calibration")[0] if calib is not None else None
    ev, ev_labels = load_npz(eval_data, src, "eval")
    if ev_labels is not None and labels and (ev_labels.min() < 0 or ev_labels.max() >= len(labels)):
        raise ConversionError(f"{eval_data}: labels outside 0..{len(labels) - 1}")
    say(f"float reference on {len(ev[0])} eval examples")
    reference = src.predict(ev)
    bar = _tqdm_progress(progress)

    baseline = _try("float32", src, calib_arrays, ev, ev_labels, reference, min_agreement, min_cosine, bar)
    if baseline.error:
        raise ConversionError(f"the float model does not convert to TFLite: {baseline.error}")
    attempts = [baseline] if quantize == "float32" else []
    for recipe in wanted:
        if recipe == "float32":
            break
        say(f"trying {recipe}: {_recipes.DESCRIPTIONS[recipe]}")
        a = _try(recipe, src, calib_arrays, ev, ev_labels, reference, min_agreement, min_cosine, bar)
        attempts.append(a)
        verdict = "passes" if a.passed else ("fails: " + (a.error or f"{a.gate['metric']} {a.gate['value']} < {a.gate['min']}"))
        say(f"  {recipe}: {a.size_bytes / 1024:.1f} KiB, {verdict}")

    passing = [a for a in attempts if a.passed]
    if not passing:
        raise GateError(
            f"no recipe met the gate ({'top-1 agreement' if 'top1_agreement' in baseline.report else 'mean cosine'} "
            f">= {min_agreement if 'top1_agreement' in baseline.report else min_cosine}); nothing was written. "
            "Try --quantize dynamic or float16, more --calib data, or a lower --min-agreement",
            attempts,
            baseline,
        )
    chosen = min(passing, key=lambda a: a.size_bytes)
    if quantize == "auto":
        failed = [a.recipe for a in attempts if not a.passed]
        reason = f"{chosen.recipe} is the smallest recipe that passed the gate"
        if failed:
            reason += f" ({', '.join(failed)} did not)"
    else:
        reason = f"{chosen.recipe} was asked for and passed the gate"

    info = describe(chosen.model_bytes)
    probe = runtime.load(content=chosen.model_bytes)
    extra: dict[str, bytes] = {}
    if tokenizer is not None:
        extra[TOKENIZER_FILE] = Path(tokenizer).read_bytes()
    if labels:
        extra[LABELS_FILE] = ("\n".join(labels) + "\n").encode()
    prep = dict(preprocessing or {})
    if task == "text-classification":
        prep.setdefault("max_length", int(src.input_specs[0][0][-1]))
    manifest = {
        "schema_version": 1,
        "name": name or Path(model).stem,
        "version": version,
        "task": task,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sha256": "0" * 64,
        "source": {"path": str(Path(model).name), "format": src.format, "sha256": src.sha256()},
        "quantization": {
            "recipe": chosen.recipe,
            "requested": quantize,
            "description": _recipes.DESCRIPTIONS[chosen.recipe],
            "float_ops": info["float_ops"],
            "reason": reason,
        },
        "inputs": [t.to_json() for t in probe.inputs],
        "outputs": [t.to_json() for t in probe.outputs],
        "preprocessing": prep,
        "labels": list(labels or []),
        "validation": {
            "eval_examples": len(ev[0]),
            "gate": chosen.gate,
            "float": {k: v for k, v in baseline.report.items() if k in ("accuracy_float", "n")} | {
                "size_bytes": baseline.size_bytes, "latency_ms": round(baseline.latency_ms, 4)},
            "quantized": chosen.report | {"size_bytes": chosen.size_bytes, "latency_ms": round(chosen.latency_ms, 4)},
            "tried": [a.to_json() for a in attempts],
        },
        "min_runtime": {"ops": info["ops"]},
    }
    package = write_package(out, chosen.model_bytes, manifest, extra)
    return ConversionResult(package, chosen.recipe, reason, attempts, baseline)
