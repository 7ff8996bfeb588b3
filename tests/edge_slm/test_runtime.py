"""Loading and running .tflite models through the interpreter backends this machine has."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm import runtime
from edge_slm.errors import InputError, ModelError, RuntimeNotFoundError
from edge_slm.package import ModelPackage
from edge_slm.runtime import TensorInfo, dequantize, quantize


def info(dtype: str, scale: float, zero_point: int, shape: tuple[int, ...] = (1, 4)) -> TensorInfo:
    return TensorInfo("t", 0, np.dtype(dtype), shape, scale, zero_point)


QPARAMS = st.one_of(
    st.tuples(st.just("int8"), st.floats(1e-4, 10.0), st.integers(-128, 127)),
    st.tuples(st.just("uint8"), st.floats(1e-4, 10.0), st.integers(0, 255)),
)


@settings(max_examples=200, deadline=None)
@given(QPARAMS, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16))
def test_quantize_round_trip_is_within_half_a_step_in_range(params, fractions):
    dtype, scale, zp = params
    ti = info(dtype, scale, zp)
    lim = np.iinfo(ti.dtype)
    lo, hi = (lim.min - zp) * scale, (lim.max - zp) * scale
    x = np.asarray([lo + f * (hi - lo) for f in fractions], dtype=np.float32)
    q = quantize(x, ti)
    assert q.dtype == ti.dtype
    back = dequantize(q, ti)
    assert back.dtype == np.float32
    # half a step, plus float32 rounding of values up to 255 * scale
    assert np.all(np.abs(back - x) <= scale / 2 + 1e-5 * max(1.0, abs(lo), abs(hi)))


@settings(max_examples=200, deadline=None)
@given(QPARAMS, st.floats(1.0, 1e6))
def test_quantize_clips_outside_the_representable_range(params, beyond):
    dtype, scale, zp = params
    ti = info(dtype, scale, zp)
    lim = np.iinfo(ti.dtype)
    lo, hi = (lim.min - zp) * scale, (lim.max - zp) * scale
    q = quantize(np.asarray([hi + beyond * scale, lo - beyond * scale, 1e30, -1e30], dtype=np.float32), ti)
    assert q.tolist() == [lim.max, lim.min, lim.max, lim.min]


def test_quantize_rounds_half_to_even():
    ti = info("int8", 1.0, 0)
    assert quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5]), ti).tolist() == [0, 2, 2, 0, -2]


def test_tensor_info_quantized_only_for_8_bit_integers_with_a_scale():
    assert info("int8", 0.1, 0).quantized and info("uint8", 0.1, 3).quantized
    assert not info("int8", 0.0, 0).quantized
    assert not info("int32", 0.1, 0).quantized and not info("float32", 0.1, 0).quantized
    assert info("int8", 0.5, -3).to_json() == {"name": "t", "dtype": "int8", "shape": [1, 4], "scale": 0.5, "zero_point": -3}


# --- the real text model (int32 token ids in, float scores out) ----------------------------------

@pytest.fixture(scope="module")
def text_pkg(text_model) -> ModelPackage:
    return ModelPackage.open(text_model.package)


@pytest.fixture(scope="module")
def ids(text_model) -> np.ndarray:
    return np.load(text_model.eval)["x"][:1].astype(np.int32)


def test_load_prefers_ai_edge_litert(text_pkg, ids):
    m = runtime.load(text_pkg.model_path)
    assert m.backend == "ai-edge-litert" and m.path == text_pkg.model_path
    (inp,) = m.inputs
    assert inp.dtype == np.int32 and list(inp.shape) == text_pkg.manifest["inputs"][0]["shape"]
    (out,) = m.run(ids)
    assert out.shape == tuple(text_pkg.manifest["outputs"][0]["shape"]) and np.all(np.isfinite(out))
    assert "ai-edge-litert" in runtime.available_backends()


def test_tensorflow_backend_gives_the_same_scores(text_pkg, ids):
    lite = runtime.load(text_pkg.model_path).run(ids)[0]
    tf_model = runtime.load(text_pkg.model_path, backend="tensorflow")
    assert tf_model.backend == "tensorflow"
    np.testing.assert_allclose(tf_model.run(ids)[0], lite, rtol=1e-4, atol=1e-4)
    assert "tensorflow" in runtime.available_backends()


def test_load_from_bytes_and_num_threads_is_recorded(text_pkg, ids):
    m = runtime.load(content=text_pkg.model_path.read_bytes(), threads=2)
    assert m.threads == 2 and m.path is None
    np.testing.assert_allclose(m.run(ids)[0], runtime.load(text_pkg.model_path, threads=1).run(ids)[0], atol=1e-5)
    assert runtime.load(text_pkg.model_path).threads is None


def test_unknown_backend_is_runtime_not_found(text_pkg):
    with pytest.raises(RuntimeNotFoundError, match="unknown runtime 'onnx'"):
        runtime.load(text_pkg.model_path, backend="onnx")


@pytest.mark.skipif(importlib.util.find_spec("tflite_runtime") is not None, reason="tflite-runtime is installed here")
def test_missing_backend_is_runtime_not_found_with_install_hint(text_pkg):
    with pytest.raises(RuntimeNotFoundError, match="pip install"):
        runtime.load(text_pkg.model_path, backend="tflite-runtime")


def test_missing_file_and_non_tflite_bytes_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        runtime.load(tmp_path / "nope.tflite")
    junk = tmp_path / "model.tflite"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a flatbuffer")
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        runtime.load(junk)
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        runtime.load(content=b"TFL")
    with pytest.raises(ModelError, match="cannot be loaded"):
        runtime.load(content=b"\x00\x00\x00\x00TFL3" + b"\x07" * 200)
    with pytest.raises(ValueError):
        runtime.load()


def test_wrong_input_shape_is_bad_shape(text_pkg, ids):
    m = runtime.load(text_pkg.model_path)
    for bad in (ids[:, :-1], np.concatenate([ids, ids]), ids.reshape(-1)[:5]):
        with pytest.raises(InputError) as err:
            m.run(bad)
        assert err.value.code == "bad_shape" and str(list(m.inputs[0].shape)) in str(err.value)


def test_single_example_without_batch_axis_is_accepted(text_pkg, ids):
    m = runtime.load(text_pkg.model_path)
    np.testing.assert_array_equal(m.run(ids.reshape(-1))[0], m.run(ids)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_non_integer_into_token_ids_is_bad_dtype(text_pkg, ids, dtype):
    m = runtime.load(text_pkg.model_path)
    with pytest.raises(InputError) as err:
        m.run(ids.astype(dtype))
    assert err.value.code == "bad_dtype"


def test_int64_ids_are_accepted_and_cast(text_pkg, ids):
    m = runtime.load(text_pkg.model_path)
    np.testing.assert_array_equal(m.run(ids.astype(np.int64))[0], m.run(ids)[0])


def test_wrong_number_of_inputs_is_bad_input_count(text_pkg, ids):
    m = runtime.load(text_pkg.model_path)
    with pytest.raises(InputError) as err:
        m.run(ids, ids)
    assert err.value.code == "bad_input_count"


# --- a full-int8 model (int8 in, int8 out) --------------------------------------------------------

@pytest.fixture(scope="module")
def int8_sensor(sensor_model, tmp_path_factory) -> ModelPackage:
    from converters.convert import convert_model

    out = tmp_path_factory.mktemp("int8_sensor") / "pkg"
    result = convert_model(sensor_model.keras_path, out, quantize="int8", task="sensor-classification",
                           eval_data=sensor_model.eval, calib=sensor_model.calib, progress=False)
    assert result.chosen == "int8"
    return result.package


def test_full_int8_model_quantizes_float_input_like_doing_it_by_hand(int8_sensor, sensor_model):
    m = runtime.load(int8_sensor.model_path)
    (inp,), (out,) = m.inputs, m.outputs
    assert inp.quantized and out.quantized and inp.dtype == np.int8 and out.dtype == np.int8
    windows = np.load(sensor_model.eval)["x"][:5].astype(np.float32)
    for x in windows:
        x = x[None]
        got = m.run(x)[0]
        assert got.dtype == np.float32
        # by hand, with the tensor's own scale and zero point
        q = np.clip(np.round(x / inp.scale) + inp.zero_point, -128, 127).astype(np.int8)
        m._interp.set_tensor(inp.index, q)
        m._interp.invoke()
        raw = m._interp.get_tensor(out.index)
        expected = (raw.astype(np.float32) - out.zero_point) * out.scale
        np.testing.assert_array_equal(got, expected)


def test_full_int8_model_takes_int8_as_is_and_refuses_other_integers(int8_sensor):
    m = runtime.load(int8_sensor.model_path)
    (inp,) = m.inputs
    q = np.zeros(inp.shape, dtype=np.int8)
    assert np.all(np.isfinite(m.run(q)[0]))
    with pytest.raises(InputError) as err:
        m.run(q.astype(np.int32))
    assert err.value.code == "bad_dtype"
