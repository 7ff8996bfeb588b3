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


CLASSIFIER_TASKS = ("text-classification", "sensor-classification", "keyword-spotting")


def target_problems(target: Any, recipe: str, model_bytes: bytes | None = None) -> list[str]:
    """Why TARGET (a devices.profiles.DeviceProfile) cannot run RECIPE's model: recipes its runtime has no
    kernels for (MCUs: full int8 or float32 only), then every op version its runtime cannot load."""
    if target is None:
        return []
    if target.is_mcu and recipe not in ("int8", "float32"):
        return [f"{target.runtime} on {target.name} runs full-int8 or float32 models only"]
    if model_bytes is None:
        return []
    from firmware_bridge.tflite_flatbuffer import parse

    model = parse(model_bytes)
    problems = [f"needs {p}" for p in target.runtime_ops.problems(model.op_versions())]
    if target.is_mcu:
        from firmware_bridge.tflm_export import _problems

        problems += [p for p in _problems(model) if not p.startswith("unsupported ops")]
    return problems


def per_channel_dense(target: Any) -> bool:
    """False when the target's runtime cannot load per-channel dynamic-range FULLY_CONNECTED (v12)."""
    if target is None:
        return True
    limit = target.runtime_ops.ops.get("FULLY_CONNECTED", None)
    return limit is None or limit >= 12


def _try(recipe: str, src: SourceModel, calib, ev, labels, reference, min_agreement, min_cosine, progress,  # noqa: ANN001
         classifier: bool | None = None, target: Any = None) -> Attempt:
    attempt = Attempt(recipe)
    problems = target_problems(target, recipe)
    if problems:
        attempt.error = f"recipe {recipe} for {target.name}: {'; '.join(problems)}"
        return attempt
    try:
        attempt.model_bytes = _recipes.convert(src, recipe, calib, progress, per_channel_dense=per_channel_dense(target))
    except ConversionError as exc:
        attempt.error = str(exc)
        return attempt
    attempt.size_bytes = len(attempt.model_bytes)
    problems = target_problems(target, recipe, attempt.model_bytes)
    if problems:
        attempt.error = f"recipe {recipe} for {target.name}: {'; '.join(problems)}"
        return attempt
    tick = progress(len(ev[0]), f"validating {recipe}") if progress else None
    try:
        outputs, attempt.latency_ms = run_tflite(attempt.model_bytes, ev, tick, src.input_names)
    except Exception as exc:  # a model that converts but cannot run is a failed recipe, not a crash
        attempt.error = f"recipe {recipe} converted but does not run: {exc}"
        return attempt
    attempt.report = compare(reference[0], outputs[0], labels, classifier)
    attempt.gate = gate(attempt.report, min_agreement, min_cosine)
    return attempt


def search_recipes(
    src: SourceModel,
    calib: list[np.ndarray] | None,
    ev: list[np.ndarray],
    ev_labels: np.ndarray | None,
    quantize: str,
    min_agreement: float,
    min_cosine: float,
    progress: bool,
    say: Callable[[str], None],
    task: str | None = None,
    target: Any = None,
) -> tuple[list[Attempt], Attempt, Attempt, str]:
    """Convert with each wanted recipe and gate it; returns (attempts, float baseline, chosen, reason).

    TARGET (a devices.profiles.DeviceProfile) decides the converter flags, and recipes whose model its
    runtime cannot load are reported as failed attempts; MCU targets try full int8 only under auto.
    """
    wanted = AUTO_ORDER if quantize == "auto" else (quantize,)
    if target is not None and target.is_mcu and quantize == "auto":
        wanted = ("int8",)
    say(f"float reference on {len(ev[0])} eval examples")
    reference = src.predict(ev)
    bar = _tqdm_progress(progress)
    classifier = None if task is None else task in CLASSIFIER_TASKS
    baseline = _try("float32", src, calib, ev, ev_labels, reference, min_agreement, min_cosine, bar, classifier)
    if baseline.error:
        raise ConversionError(f"the float model does not convert to TFLite: {baseline.error}")
    if quantize == "float32" and target is not None:
        problems = target_problems(target, "float32", baseline.model_bytes)
        if problems:
            baseline.error = f"recipe float32 for {target.name}: {'; '.join(problems)}"
    attempts = [baseline] if quantize == "float32" else []
    for recipe in wanted:
        if recipe == "float32":
            break
        say(f"trying {recipe}: {_recipes.DESCRIPTIONS[recipe]}")
        a = _try(recipe, src, calib, ev, ev_labels, reference, min_agreement, min_cosine, bar, classifier, target)
        attempts.append(a)
        verdict = "passes" if a.passed else ("fails: " + (a.error or f"{a.gate['metric']} {a.gate['value']} < {a.gate['min']}"))
        say(f"  {recipe}: {a.size_bytes / 1024:.1f} KiB, {verdict}")
    chosen, reason = choose(attempts, quantize, baseline, min_agreement, min_cosine)
    return attempts, baseline, chosen, reason


def choose(attempts: list[Attempt], quantize: str, baseline: Attempt, min_agreement: float,
           min_cosine: float) -> tuple[Attempt, str]:
    """The smallest recipe that passed; among those within 10% of it in size, the fastest.

    Full int8 is often no smaller than dynamic range for transformers yet 2-3x slower on x86, so
    size alone would pick the worse model.
    """
    passing = [a for a in attempts if a.passed]
    if not passing:
        classifier = "top1_agreement" in baseline.report
        raise GateError(
            f"no recipe met the gate ({'top-1 agreement' if classifier else 'mean cosine'} "
            f">= {min_agreement if classifier else min_cosine}); nothing was written. "
            "Try --quantize dynamic or float16, more --calib data, or a lower --min-agreement",
            attempts,
            baseline,
        )
    smallest = min(passing, key=lambda a: a.size_bytes)
    near = [a for a in passing if a.size_bytes <= smallest.size_bytes * 1.10]
    chosen = min(near, key=lambda a: a.latency_ms)
    if quantize != "auto":
        return chosen, f"{chosen.recipe} was asked for and passed the gate"
    reason = f"{chosen.recipe} is the smallest recipe that passed the gate"
    if chosen is not smallest:
        reason = (f"{chosen.recipe} passed the gate, is within 10% of the smallest ({smallest.recipe}) "
                  f"and {smallest.latency_ms / max(chosen.latency_ms, 1e-9):.1f}x faster")
    failed = [a.recipe for a in attempts if not a.passed]
    if failed:
        reason += f" ({', '.join(failed)} did not pass)"
    return chosen, reason


def build_manifest(
    *,
    src: SourceModel,
    chosen: Attempt,
    baseline: Attempt,
    attempts: list[Attempt],
    reason: str,
    quantize: str,
    task: str,
    name: str,
    version: str,
    source_path: Path,
    labels: list[str] | None,
    preprocessing: dict[str, Any],
    eval_examples: int,
    target: Any = None,
) -> dict[str, Any]:
    info = describe(chosen.model_bytes)
    probe = runtime.load(content=chosen.model_bytes)
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "task": task,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sha256": "0" * 64,
        "source": {"path": source_path.name, "format": src.format, "sha256": src.sha256()},
        "quantization": {
            "recipe": chosen.recipe,
            "requested": quantize,
            "description": _recipes.DESCRIPTIONS[chosen.recipe],
            "float_ops": info["float_ops"],
            "reason": reason,
        },
        "inputs": [t.to_json() for t in probe.inputs],
        "outputs": [t.to_json() for t in probe.outputs],
        "preprocessing": preprocessing,
        "labels": list(labels or []),
        "validation": {
            "eval_examples": eval_examples,
            "gate": chosen.gate,
            "float": {k: v for k, v in baseline.report.items() if k in ("accuracy_float", "n")} | {
                "size_bytes": baseline.size_bytes, "latency_ms": round(baseline.latency_ms, 4)},
            "quantized": chosen.report | {"size_bytes": chosen.size_bytes, "latency_ms": round(chosen.latency_ms, 4)},
            "tried": [a.to_json() for a in attempts],
        },
        "min_runtime": {"ops": info["ops"]},
        **({"target": target_json(target)} if target is not None else {}),
    }


def target_json(target: Any) -> dict[str, Any]:
    """What the manifest records about the device profile a package was converted for."""
    return {"name": target.name, "runtime": target.runtime, "runtime_version": target.runtime_version,
            "per_channel_dense": per_channel_dense(target)}


def load_target(target: str | None) -> Any:
    """The DeviceProfile called TARGET, or None."""
    if target is None:
        return None
    from devices.profiles import load_profile

    return load_profile(target)


def check_common(quantize: str, task: str | None, calib: object, tokenizer: object) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ConversionError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if task is not None and task not in TASKS:
        raise ConversionError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    wanted = AUTO_ORDER if quantize == "auto" else (quantize,)
    if calib is None and any(r.startswith("int8") for r in wanted):
        raise ConversionError(f"--quantize {quantize} needs calibration data: --calib CALIB.npz (a few hundred typical inputs)")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConversionError(f"tokenizer not found: {tokenizer}")


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
    target: str | None = None,
    **checkpoint_options: Any,
) -> ConversionResult:
    """Convert MODEL (.keras, SavedModel dir or transformer checkpoint dir) into a package at OUT.

    TARGET names a device profile (devices/profiles/NAME.toml): only recipes and op versions its runtime
    loads are kept, and the manifest records it. Raises GateError (nothing written) when no recipe passes.
    """
    from converters.checkpoint.loader import is_checkpoint

    profile = load_target(target)

    if is_checkpoint(Path(model)):
        from converters.convert_checkpoint import convert_checkpoint

        return convert_checkpoint(model, out, calib=calib, eval_data=eval_data, quantize=quantize,
                                  min_agreement=min_agreement, min_cosine=min_cosine, name=name, version=version,
                                  progress=progress, say=say, target=target, **checkpoint_options)
    if checkpoint_options:
        raise ConversionError(f"{', '.join(checkpoint_options)} only apply to transformer checkpoints")
    check_common(quantize, task, calib, tokenizer)
    task = task or ("text-classification" if tokenizer else None)
    if task is None:
        raise ConversionError(f"say what the model does with --task ({', '.join(TASKS)})")
    if task == "text-classification" and tokenizer is None:
        raise ConversionError("text-classification needs the tokenizer: --tokenizer tokenizer.json")

    say(f"loading {model}")
    with silenced():
        src = load_source_model(model)
    calib_arrays = load_npz(calib, src, "calibration")[0] if calib is not None else None
    ev, ev_labels = load_npz(eval_data, src, "eval")
    if ev_labels is not None and labels and (ev_labels.min() < 0 or ev_labels.max() >= len(labels)):
        raise ConversionError(f"{eval_data}: labels outside 0..{len(labels) - 1}")
    attempts, baseline, chosen, reason = search_recipes(
        src, calib_arrays, ev, ev_labels, quantize, min_agreement, min_cosine, progress, say, task, profile)

    extra: dict[str, bytes] = {}
    if tokenizer is not None:
        extra[TOKENIZER_FILE] = Path(tokenizer).read_bytes()
    if labels:
        extra[LABELS_FILE] = ("\n".join(labels) + "\n").encode()
    prep = dict(preprocessing or {})
    if task == "text-classification":
        prep.setdefault("max_length", int(src.input_specs[0][0][-1]))
    manifest = build_manifest(src=src, chosen=chosen, baseline=baseline, attempts=attempts, reason=reason,
                              quantize=quantize, task=task, name=name or Path(model).stem, version=version,
                              source_path=Path(model), labels=labels, preprocessing=prep, eval_examples=len(ev[0]),
                              target=profile)
    package = write_package(out, chosen.model_bytes, manifest, extra)
    return ConversionResult(package, chosen.recipe, reason, attempts, baseline)
