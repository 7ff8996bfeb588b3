"""Quantization recipes: one function turns a SourceModel + calibration data into .tflite bytes.

Host only. Recipes: int8 (full integer), int8-float-attention, dynamic, float16, float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from converters.source_model import SourceModel
from converters.tf_env import silenced, tf
from edge_slm.errors import ConversionError

RECIPES = ("int8", "int8-float-attention", "dynamic", "float16", "float32")
DESCRIPTIONS = {
    "int8": "full integer: int8 weights and activations (float inputs/outputs become int8)",
    "int8-float-attention": "int8 everywhere except attention BATCH_MATMUL and SOFTMAX, kept float",
    "dynamic": "dynamic-range: int8 weights, activations quantized on the fly",
    "float16": "float16 weights, float32 compute",
    "float32": "no quantization",
}
# Measured here: full int8 attention broke a small transformer; these two kept float restore it.
ATTENTION_OPS = ["BATCH_MATMUL", "SOFTMAX"]

ProgressFactory = Callable[[int, str], Callable[[], None]]


def _converter(src: SourceModel):  # noqa: ANN202
    t = tf()
    if src.keras_model is not None:
        conv = t.lite.TFLiteConverter.from_keras_model(src.keras_model)
    else:
        conv = t.lite.TFLiteConverter.from_saved_model(str(src.saved_model_dir))
    return conv


def _representative(calib: list[np.ndarray], tick: Callable[[], None] | None,
                    names: list[str] | None = None) -> Callable[[], Iterator[object]]:
    """Calibration examples one at a time. With several inputs they go by name: the converted model
    orders its inputs alphabetically, so a list in Keras order fed token ids in as the attention mask."""
    n = len(calib[0])

    def gen() -> Iterator[object]:
        for i in range(n):
            if tick:
                tick()
            if names and len(names) > 1:
                yield {name: x[i : i + 1] for name, x in zip(names, calib)}
            else:
                yield [x[i : i + 1] for x in calib]

    return gen


def convert(
    src: SourceModel,
    recipe: str,
    calib: list[np.ndarray] | None,
    progress: ProgressFactory | None = None,
    *,
    per_channel_dense: bool = True,
) -> bytes:
    """Convert with one recipe. Raises ConversionError with TensorFlow's reason when it cannot.

    per_channel_dense=False quantizes Dense weights per tensor: FULLY_CONNECTED then stays at a version
    older runtimes load (TF 2.21 writes v12 for per-channel dynamic-range dense layers; tflite-runtime 2.14
    loads up to v10).
    """
    if recipe not in RECIPES:
        raise ConversionError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    needs_calib = recipe in ("int8", "int8-float-attention")
    if needs_calib and calib is None:
        raise ConversionError(f"recipe {recipe} needs calibration data: pass --calib CALIB.npz")
    tick = progress(len(calib[0]), f"calibrating {recipe}") if (needs_calib and progress) else None
    try:
        with silenced():
            return _convert(src, recipe, calib, tick, per_channel_dense)
    except ConversionError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        reason = next((line for line in msg if "error" in line.lower()), msg[0] if msg else type(exc).__name__)
        raise ConversionError(f"recipe {recipe} failed to convert: {reason[:300]}") from exc


def _convert(src: SourceModel, recipe: str, calib: list[np.ndarray] | None, tick: Callable[[], None] | None,
             per_channel_dense: bool = True) -> bytes:
    t = tf()
    conv = _converter(src)
    if not per_channel_dense:
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True  # noqa: SLF001
    if recipe == "float16":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [t.float16]
    elif recipe == "dynamic":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
    elif recipe == "int8":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.representative_dataset = _representative(calib, tick, src.input_names)
        conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Token-id inputs stay int32; float inputs and all outputs become int8 with their own scale.
        if all(np.issubdtype(dt, np.floating) for _, dt in src.input_specs):
            conv.inference_input_type = t.int8
        conv.inference_output_type = t.int8
    elif recipe == "int8-float-attention":
        conv.optimizations = [t.lite.Optimize.DEFAULT]
        conv.representative_dataset = _representative(calib, tick, src.input_names)
        options = t.lite.experimental.QuantizationDebugOptions(denylisted_ops=ATTENTION_OPS)
        debugger = t.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=_representative(calib, None, src.input_names), debug_options=options
        )
        return bytes(debugger.get_nondebug_quantized_model())
    return bytes(conv.convert())
