"""The converter on real models trained in the test session: recipes, gate, package, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from converters.convert import convert_model
from edge_slm import runtime
from edge_slm.errors import ConversionError
from edge_slm.package import ModelPackage
from tests.conftest import run_cli


def test_auto_picks_the_smallest_passing_recipe_and_records_why(text_model):
    m = json.loads((text_model.package / "manifest.json").read_text())
    tried = {t["recipe"]: t for t in m["validation"]["tried"]}
    assert set(tried) == {"int8", "int8-float-attention", "dynamic"}
    chosen = m["quantization"]["recipe"]
    assert tried[chosen]["passed"]
    passing = [t for t in tried.values() if t["passed"]]
    assert tried[chosen]["size_bytes"] == min(t["size_bytes"] for t in passing)
    assert chosen in m["quantization"]["reason"]
    gate = m["validation"]["gate"]
    assert gate["metric"] == "top1_agreement" and gate["value"] >= 0.99 and gate["passed"]
    # sizes and quality are measured, not assumed: every quantized recipe beats float32 on size
    assert all(t["size_bytes"] < m["validation"]["float"]["size_bytes"] for t in tried.values())
    assert 0 < m["validation"]["quantized"]["accuracy_quantized"] <= 1


def test_token_id_input_stays_int32_and_manifest_matches_model(text_model):
    pkg = ModelPackage.open(text_model.package)
    model = runtime.load(pkg.model_path)
    assert model.inputs[0].dtype == np.int32 and model.inputs[0].shape == (1, 24)
    assert pkg.manifest["inputs"][0]["dtype"] == "int32"
    assert pkg.manifest["outputs"][0]["shape"] == [1, len(text_model.labels)]
    assert pkg.manifest["preprocessing"]["max_length"] == 24
    assert "FULLY_CONNECTED" in pkg.manifest["min_runtime"]["ops"]
    assert (text_model.package / "tokenizer.json").is_file()
    assert pkg.labels == text_model.labels


def test_packaged_model_agrees_with_keras_on_eval(text_model):
    from converters.source_model import load_source_model

    data = np.load(text_model.eval)
    x = data["x"][:100]
    ref = load_source_model(text_model.keras_path).predict([x])[0]
    model = runtime.load(ModelPackage.open(text_model.package).model_path)
    got = np.stack([model.run(x[i : i + 1])[0][0] for i in range(len(x))])
    assert np.mean(np.argmax(ref, 1) == np.argmax(got, 1)) >= 0.97


def test_float_attention_recipe_keeps_attention_ops_float(text_model, tmp_path):
    res = convert_model(text_model.keras_path, tmp_path / "p", calib=text_model.calib, eval_data=text_model.eval,
                        quantize="int8-float-attention", tokenizer=text_model.tokenizer, labels=text_model.labels,
                        min_agreement=0.0, progress=False)
    fops = res.package.manifest["quantization"]["float_ops"]
    assert "BATCH_MATMUL" in fops and "SOFTMAX" in fops
    assert "FULLY_CONNECTED" not in fops


def test_full_int8_conv_model_has_int8_io_and_keeps_agreement(sensor_model, tmp_path):
    res = convert_model(sensor_model.keras_path, tmp_path / "s", calib=sensor_model.calib,
                        eval_data=sensor_model.eval, quantize="int8", task="sensor-classification", progress=False)
    m = res.package.manifest
    assert m["inputs"][0]["dtype"] == "int8" and m["inputs"][0]["scale"] > 0
    assert m["outputs"][0]["dtype"] == "int8"
    assert m["validation"]["quantized"]["top1_agreement"] >= 0.99
    assert m["quantization"]["float_ops"] == []
    base = res.baseline.size_bytes
    assert res.attempts[0].size_bytes < base / 2, "full int8 is at least 2x smaller than float32"


def test_saved_model_directory_converts_with_batch_one(sensor_model, tmp_path):
    from converters.tf_env import tf

    keras = tf().keras
    model = keras.models.load_model(sensor_model.keras_path)
    sm = tmp_path / "sm"
    model.export(str(sm), verbose=False)
    res = convert_model(sm, tmp_path / "pkg", eval_data=sensor_model.eval, quantize="dynamic",
                        task="sensor-classification", progress=False)
    m = res.package.manifest
    assert m["source"]["format"] == "saved_model"
    assert m["inputs"][0]["shape"] == [1, 64, 2]
    assert m["validation"]["quantized"]["top1_agreement"] >= 0.99


def test_float16_and_float32_recipes(sensor_model, tmp_path):
    for recipe in ("float16", "float32"):
        res = convert_model(sensor_model.keras_path, tmp_path / recipe, eval_data=sensor_model.eval,
                            quantize=recipe, task="sensor-classification", progress=False)
        assert res.chosen == recipe
        assert res.package.manifest["validation"]["quantized"]["max_abs_error"] < 0.05


def test_gate_failure_fails_the_command_with_a_report_and_writes_nothing(text_model, tmp_path):
    out = tmp_path / "never"
    res = run_cli("convert", str(text_model.keras_path), "-o", str(out), "--calib", str(text_model.calib),
                  "--eval", str(text_model.eval), "--tokenizer", str(text_model.tokenizer), "--quantize", "dynamic",
                  "--min-agreement", "1.01", "-q")
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "dynamic" in err and "FAIL" in err, err
    assert err.strip().splitlines()[-1].startswith("edge-slm convert: error: no recipe met the gate")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")], "no temp dir left behind"


def test_convert_cli_json_report(sensor_model, tmp_path):
    res = run_cli("convert", str(sensor_model.keras_path), "-o", str(tmp_path / "pkg"), "--calib", str(sensor_model.calib),
                  "--eval", str(sensor_model.eval), "--task", "sensor-classification", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["chosen"] in ("int8", "int8-float-attention", "dynamic")
    assert len(report["tried"]) == 3 and report["float"]["recipe"] == "float32"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "int8", "calib": None}, "needs calibration data"),
        ({"eval_data": "missing.npz"}, "eval file not found"),
        ({"task": "nonsense"}, "--task 'nonsense'"),
        ({"quantize": "int4"}, "choose one of"),
    ],
)
def test_bad_arguments_get_clear_errors(sensor_model, tmp_path, kwargs, message):
    args = {"calib": sensor_model.calib, "eval_data": sensor_model.eval, "quantize": "auto",
            "task": "sensor-classification", "progress": False} | kwargs
    with pytest.raises(ConversionError, match=message):
        convert_model(sensor_model.keras_path, tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_eval_npz_with_wrong_shape_names_the_key(sensor_model, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 10, 2), np.float32))
    with pytest.raises(ConversionError, match=r"key 'x' has shape \(4, 10, 2\)"):
        convert_model(sensor_model.keras_path, tmp_path / "x", eval_data=bad, quantize="dynamic",
                      task="sensor-classification", progress=False)


def test_not_a_model_is_refused(tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ConversionError, match="Keras could not load it"):
        convert_model(junk, tmp_path / "x", eval_data=tmp_path / "e.npz", quantize="dynamic", task="embedding",
                      progress=False)


def test_validate_command_on_the_device_side(text_model, tmp_path):
    res = run_cli("validate", str(text_model.package), "--eval", str(text_model.eval), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["sha256_ok"] and rep["runtime"] == "ai-edge-litert"
    m = json.loads((text_model.package / "manifest.json").read_text())
    assert rep["eval"]["accuracy"] == pytest.approx(m["validation"]["quantized"]["accuracy_quantized"], abs=1e-3)
    pkg = tmp_path / "pkg"
    shutil.copytree(text_model.package, pkg)
    (pkg / "model.tflite").write_bytes((pkg / "model.tflite").read_bytes()[:-10])
    res = run_cli("validate", str(pkg))
    assert res.returncode == 1 and b"sha256" in res.stderr


def test_bench_command_prints_a_table(text_model):
    res = run_cli("bench", str(text_model.package), "--runs", "50", "--threads", "1", "2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["runtime", "threads", "runs"] and len(lines) == 4
