"""The hand-written .tflite reader agrees with TensorFlow's generated schema reader on real converted models."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm.errors import ModelError
from firmware_bridge import tflite_flatbuffer as tfl


def _keras_models():  # noqa: ANN202
    from converters.tf_env import tf

    keras = tf().keras
    keras.utils.set_random_seed(1)
    inp = keras.Input((10, 10, 1), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    h = keras.layers.DepthwiseConv2D(3, activation="relu6")(h)
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, activation="softmax")(h)
    conv = keras.Model(inp, out)
    inp = keras.Input((12,), name="features")
    dense = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Dense(8, activation="tanh")(inp)))
    return conv, dense


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, bytes]:  # noqa: ANN001
    """Real converter output: full int8, float32, dynamic-range, float16, a TOPK_V2 and a Flex model."""
    from converters import recipes
    from converters.source_model import source_from_keras
    from converters.tf_env import silenced, tf

    work = tmp_path_factory.mktemp("flatbuffer_models")
    rng = np.random.default_rng(0)
    conv, dense = _keras_models()
    out: dict[str, bytes] = {}
    src = source_from_keras(conv, work / "conv.keras")
    calib = [rng.normal(size=(32, 10, 10, 1)).astype(np.float32)]
    for recipe in ("int8", "float32", "dynamic", "float16"):
        out[f"conv_{recipe}"] = recipes.convert(src, recipe, calib)
    src = source_from_keras(dense, work / "dense.keras")
    out["dense_int8"] = recipes.convert(src, "int8", [rng.normal(size=(32, 12)).astype(np.float32)])
    t = tf()

    @t.function(input_signature=[t.TensorSpec([1, 8], t.float32)])
    def topk(x):  # noqa: ANN001, ANN202
        return t.math.top_k(x * 2.0, k=3)[0]

    @t.function(input_signature=[t.TensorSpec([1, 3, 3], t.float32)])
    def det(x):  # noqa: ANN001, ANN202
        return t.linalg.det(x + 1.0)

    with silenced():
        out["topk"] = t.lite.TFLiteConverter.from_concrete_functions([topk.get_concrete_function()], topk).convert()
        c = t.lite.TFLiteConverter.from_concrete_functions([det.get_concrete_function()], det)
        c.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS, t.lite.OpsSet.SELECT_TF_OPS]
        out["flex"] = c.convert()
    return out


def _reference(model_bytes: bytes) -> dict:
    """The same facts read with TensorFlow's schema_py_generated."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_") and isinstance(v, int)}
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAs(bytearray(model_bytes), 0))
    codes = [(names[max(c.builtinCode, c.deprecatedBuiltinCode)], c.version,
              c.customCode.decode() if c.customCode else None) for c in m.operatorCodes]
    graphs = []
    for g in m.subgraphs:
        tensors = []
        for t in g.tensors:
            q = t.quantization
            quant = None
            if q is not None and q.scale is not None and len(q.scale):
                quant = ([float(s) for s in q.scale], [int(z) for z in q.zeroPoint], q.quantizedDimension)
            tensors.append((t.name.decode(), types[t.type], [int(d) for d in t.shape] if t.shape is not None else [],
                            None if t.shapeSignature is None else [int(d) for d in t.shapeSignature],
                            t.buffer, bool(t.isVariable), quant))
        ops = [(o.opcodeIndex, [int(i) for i in o.inputs], [int(i) for i in o.outputs],
                [] if o.intermediates is None else [int(i) for i in o.intermediates]) for o in g.operators]
        graphs.append(([int(i) for i in g.inputs], [int(i) for i in g.outputs], tensors, ops))
    buffers = [0 if b.data is None else len(b.data) for b in m.buffers]
    return {"codes": codes, "graphs": graphs, "buffers": buffers, "version": m.version}


def _ours(model_bytes: bytes) -> dict:
    m = tfl.parse(model_bytes)
    codes = [(c.name, c.version, c.custom_code) for c in m.operator_codes]
    graphs = []
    for g in m.subgraphs:
        tensors = [(t.name, t.dtype, list(t.shape), None if t.shape_signature is None else list(t.shape_signature),
                    t.buffer, t.is_variable,
                    None if t.quantization is None else (list(t.quantization.scale), list(t.quantization.zero_point),
                                                         t.quantization.quantized_dimension))
                   for t in g.tensors]
        ops = [(o.opcode_index, list(o.inputs), list(o.outputs), list(o.intermediates)) for o in g.operators]
        graphs.append((list(g.inputs), list(g.outputs), tensors, ops))
    return {"codes": codes, "graphs": graphs, "buffers": list(m.buffer_sizes), "version": m.version}


def test_reader_matches_tensorflow_schema_reader_on_every_model(models) -> None:  # noqa: ANN001
    for name, data in models.items():
        ours, ref = _ours(data), _reference(data)
        assert ours["codes"] == ref["codes"], name
        assert ours["buffers"] == ref["buffers"], name
        assert ours["version"] == ref["version"] == 3, name
        assert len(ours["graphs"]) == len(ref["graphs"]) == 1, name
        for (i1, o1, t1, p1), (i2, o2, t2, p2) in zip(ours["graphs"], ref["graphs"]):
            assert (i1, o1) == (i2, o2), name
            assert t1 == t2, name
            assert p1 == p2, name


def test_op_versions_match_converters_tflite_info(models) -> None:  # noqa: ANN001
    from converters.tflite_info import op_versions

    seen = set()
    for name, data in models.items():
        ours = tfl.parse(data).op_versions()
        assert ours == op_versions(data), name
        seen |= set(ours)
    # The models cover what the export must tell apart: int8 kernels, hybrid FC, float16 weights, TOPK, Flex.
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "DEQUANTIZE", "TOPK_V2",
            "CUSTOM:FlexMatrixDeterminant"} <= seen


def test_constant_tensors_are_those_with_buffer_data(models) -> None:  # noqa: ANN001
    m = tfl.parse(models["conv_int8"])
    g = m.subgraphs[0]
    for i in g.inputs:
        assert not m.is_constant(g.tensors[i])
    conv = next(op for op in g.operators if op.name == "CONV_2D")
    weights = g.tensors[conv.inputs[1]]
    assert m.is_constant(weights) and weights.dtype == "INT8"
    assert m.buffer_sizes[weights.buffer] == weights.nbytes == 4 * 3 * 3 * 1
    assert len(weights.quantization.scale) == 4  # per-channel, one scale per output channel


def test_not_a_tflite_file_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="TFL3"):
        tfl.parse(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelError):
        tfl.parse(b"")


def test_truncated_model_is_a_model_error(models) -> None:  # noqa: ANN001
    data = models["conv_int8"]
    with pytest.raises(ModelError, match="corrupt"):
        tfl.parse(data[: len(data) // 3])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_model_parses_or_raises_model_error(models, data) -> None:  # noqa: ANN001
    """Any damage to the bytes gives a parsed model or a ModelError, never another exception."""
    model = bytearray(models["dense_int8"])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(8, len(model) - 1))
        model[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(8, len(model))))
    try:
        parsed = tfl.parse(bytes(model[:cut] if cut else model))
    except ModelError:
        return
    for g in parsed.subgraphs:
        for t in g.tensors:
            assert t.nbytes >= 0
