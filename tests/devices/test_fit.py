"""`edge-slm fit` on real packages, and `edge-slm convert --target` producing models the target's runtime loads."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from converters.cli import attempts_table
from converters.convert import GateError, convert_model
from converters.tflite_info import op_versions
from devices import fit as fitmod
from devices.fit import count_macs, fit, format_report, kv_cache_bytes, to_json
from devices.profiles import known_profiles, load_profile
from edge_slm.errors import ConfigError
from edge_slm.package import ModelPackage
from firmware_bridge.tflite_flatbuffer import parse
from tests.conftest import run_cli


def _cli(*argv: str, capsys) -> tuple[int, str]:  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="edge-slm")
    fitmod.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fit", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


# --- MACs -----------------------------------------------------------------------------------------------


def test_mac_count_equals_the_hand_computation(tmp_path):
    from converters.tf_env import silenced, tf

    keras = tf().keras
    inp = keras.Input((8, 8, 3), batch_size=1)
    h = keras.layers.Conv2D(4, 3)(inp)  # 6x6x4 outputs x (3x3x3) = 3888
    h = keras.layers.DepthwiseConv2D(3)(h)  # 4x4x4 outputs x (3x3) = 576
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(10)(h)  # 10 outputs x 64 inputs = 640
    a = keras.Input((5, 7), batch_size=1)
    b = keras.Input((7, 3), batch_size=1)
    mm = keras.ops.matmul(a, b)  # 5x3 outputs x 7 = 105
    with silenced():
        conv = tf().lite.TFLiteConverter.from_keras_model(keras.Model(inp, out))
        conv_bytes = bytes(conv.convert())
        mm_bytes = bytes(tf().lite.TFLiteConverter.from_keras_model(keras.Model([a, b], mm)).convert())
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= set(op_versions(conv_bytes))
    assert count_macs(parse(conv_bytes)) == {"main": {"int8": 0, "float": 3888 + 576 + 640}}
    assert "BATCH_MATMUL" in op_versions(mm_bytes)
    assert count_macs(parse(mm_bytes)) == {"main": {"int8": 0, "float": 105}}
    path = tmp_path / "conv.tflite"
    path.write_bytes(conv_bytes)
    report = fit(path, "pi-4b")
    p = load_profile("pi-4b")
    expected_ms = 5104 / (p.float32_gmacs_per_core * (1 + fitmod.PARALLEL_EFFICIENCY * 3)) / 1e6
    assert report.latency_ms["main"] == pytest.approx(expected_ms, abs=1e-3)


# --- the text classifier --------------------------------------------------------------------------------


def test_text_model_fits_pi5_and_not_nrf52840(text_model, capsys):
    pkg = ModelPackage.open(text_model.package)
    pi5 = fit(text_model.package, "pi-5")
    assert pi5.verdict in ("fits", "fits with warnings") and pi5.fits and not pi5.incompatible
    model_size = (text_model.package / "model.tflite").stat().st_size
    assert pi5.ram["weights (model.tflite, mmapped)"] == model_size
    assert pi5.ram["activation arena"] > 0 and "tokenizer" in pi5.ram
    assert pi5.storage["package"] == sum(f.stat().st_size for f in text_model.package.iterdir())
    assert pi5.ops == op_versions(pkg.model_path.read_bytes())
    macs = pi5.macs["main"]
    assert macs["int8"] + macs["float"] > 0
    nrf = fit(text_model.package, "nrf52840")
    assert nrf.verdict == "does not fit" and not nrf.fits
    text = " ".join(nrf.reasons)
    assert "cannot load" in text or "RAM" in text or "flash" in text
    assert any(w in text for w in ("GELU", "hybrid", "flash", "RAM")), text
    assert nrf.latency_ms["main"] > pi5.latency_ms["main"]
    code, out = _cli(str(text_model.package), "--target", "pi-5", capsys=capsys)
    assert code == 0 and "verdict: FITS" in out and "activation arena" in out
    code, out = _cli(str(text_model.package), "--target", "nrf52840", "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 1 and data["verdict"] == "does not fit" and data["reasons"]
    assert data["ram"]["total"] == sum(data["ram"]["parts"].values())


def test_dynamic_range_model_is_incompatible_with_tflite_runtime_214(text_model, capsys):
    versions = op_versions((text_model.package / "model.tflite").read_bytes())
    if versions.get("FULLY_CONNECTED", 0) < 12:
        pytest.fail(f"the session text model is expected to be dynamic-range with FULLY_CONNECTED v12: {versions}")
    report = fit(text_model.package, "pi-3b")
    limit = load_profile("pi-3b").runtime_ops.ops["FULLY_CONNECTED"]
    assert f"FULLY_CONNECTED v12 (tflite-runtime 2.14.0 has v{limit})" in report.incompatible
    assert report.verdict == "does not fit"
    assert "convert --target pi-3b" in report.reasons[0]
    assert "FULLY_CONNECTED" in format_report(report)
    code, _ = _cli(str(text_model.package), "--target", "pi-3b", capsys=capsys)
    assert code == 1


def test_convert_for_pi3b_writes_a_model_tflite_runtime_214_loads(text_model, tmp_path):
    out = tmp_path / "pi3b"
    proc = run_cli("convert", str(text_model.keras_path), "-o", str(out), "--calib", str(text_model.calib),
                   "--eval", str(text_model.eval), "--tokenizer", str(text_model.tokenizer), "--quantize", "dynamic",
                   "--labels", str(_labels(text_model, tmp_path)), "--target", "pi-3b", "--json")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    versions = op_versions((out / "model.tflite").read_bytes())
    limits = load_profile("pi-3b").runtime_ops.ops
    assert versions["FULLY_CONNECTED"] <= limits["FULLY_CONNECTED"] < 12
    assert all(v <= limits[op] for op, v in versions.items()), versions
    manifest = ModelPackage.open(out).manifest
    assert manifest["target"] == {"name": "pi-3b", "runtime": "tflite-runtime", "runtime_version": "2.14.0",
                                  "per_channel_dense": False}
    assert manifest["quantization"]["recipe"] == "dynamic"
    assert json.loads(proc.stdout)["chosen"] == "dynamic"
    report = fit(out, "pi-3b")
    assert report.fits and not report.incompatible


def _labels(text_model, tmp_path):  # noqa: ANN001, ANN202
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(text_model.labels) + "\n")
    return path


def test_mcu_target_tries_full_int8_only_and_names_ops_it_lacks(text_model, sensor_model, tmp_path):
    with pytest.raises(GateError) as err:
        convert_model(sensor_model.keras_path, tmp_path / "dyn", calib=sensor_model.calib, eval_data=sensor_model.eval,
                      quantize="dynamic", task="sensor-classification", progress=False, target="nrf52840")
    assert [a.recipe for a in err.value.attempts] == ["dynamic"]
    assert "full-int8 or float32" in err.value.attempts[0].error
    # a full-int8 transformer still has GELU, which TFLM has no kernel for: reported in the attempts table
    with pytest.raises(GateError) as err:
        convert_model(text_model.keras_path, tmp_path / "txt", calib=text_model.calib, eval_data=text_model.eval,
                      quantize="auto", tokenizer=text_model.tokenizer, labels=text_model.labels, progress=False,
                      target="nrf52840")
    assert [a.recipe for a in err.value.attempts] == ["int8"]
    table = attempts_table(err.value.attempts, err.value.baseline)
    assert "no: needs GELU (not in tflite-micro cmsis-nn)" in table


@pytest.fixture(scope="module")
def sensor_int8(sensor_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sensor_int8") / "pkg"
    result = convert_model(sensor_model.keras_path, out, calib=sensor_model.calib, eval_data=sensor_model.eval,
                           quantize="auto", task="sensor-classification", labels=["a", "b", "c"], progress=False,
                           target="nrf52840")
    return result


def test_int8_sensor_model_fits_the_microcontrollers(sensor_int8):
    assert sensor_int8.chosen == "int8" and [a.recipe for a in sensor_int8.attempts] == ["int8"]
    pkg = sensor_int8.package.path
    assert ModelPackage.open(pkg).manifest["target"]["name"] == "nrf52840"
    size = (pkg / "model.tflite").stat().st_size
    for target in ("nrf52840", "esp32-s3"):
        report = fit(pkg, target)
        assert report.fits and not report.incompatible and not report.reasons, (target, report.reasons)
        assert report.storage == {"model (flash)": size, "TFLM + kernels (estimate)": fitmod.TFLM_CODE}
        arena = report.ram["tensor arena (TFLM, +25% margin)"]
        assert 1024 < arena < 256 * 1024 and arena % 16 == 0
        assert report.macs["main"]["int8"] > 0 and report.macs["main"]["float"] == 0
    # the same int8 model on Linux runs with int8 kernels: dotprod makes it faster per GMAC on a Pi 5
    pi4, pi5 = fit(pkg, "pi-4b"), fit(pkg, "pi-5")
    assert pi5.latency_ms["main"] < pi4.latency_ms["main"]


# --- text generation ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_package(llama_lm_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit_lm") / "pkg"
    convert_model(llama_lm_checkpoint.path, out, eval_data=llama_lm_checkpoint.eval_txt, quantize="dynamic",
                  prefill_len=16, max_cache=48, progress=False)
    return out


def test_generation_package_counts_the_kv_cache(lm_package):
    manifest = ModelPackage.open(lm_package).manifest
    prep = manifest["preprocessing"]
    expected = 2 * prep["n_layers"] * prep["n_kv_heads"] * prep["max_cache"] * prep["head_dim"] * 4
    assert kv_cache_bytes(manifest) == expected
    report = fit(lm_package, "pi-5")
    assert report.ram["KV cache (k + v, agent copy)"] == expected
    assert report.fits
    assert len(report.macs) == 2, report.macs
    per_run = sorted(m["int8"] + m["float"] for m in report.macs.values())
    assert 0 < per_run[0] < per_run[1], "one decode step does fewer MACs than a 16-token prefill"
    doc = to_json(report)
    assert doc["ram"]["parts"]["KV cache (k + v, agent copy)"] == expected
    nrf = fit(lm_package, "nrf52840")
    assert not nrf.fits and any("flash" in r or "SRAM" in r or "cannot load" in r for r in nrf.reasons)


def test_decoder_converted_for_pi3b_loads_on_its_runtime(llama_lm_checkpoint, lm_package, tmp_path):
    needs = op_versions((lm_package / "model.tflite").read_bytes())
    limits = load_profile("pi-3b").runtime_ops.ops
    assert needs["FULLY_CONNECTED"] > limits["FULLY_CONNECTED"]  # the default conversion would not load there
    result = convert_model(llama_lm_checkpoint.path, tmp_path / "pkg", eval_data=llama_lm_checkpoint.eval_txt,
                           quantize="dynamic", prefill_len=16, max_cache=48, progress=False, target="pi-3b")
    got = op_versions((result.package.path / "model.tflite").read_bytes())
    assert all(v <= limits.get(op, 0) for op, v in got.items()), got
    assert result.package.manifest["target"]["name"] == "pi-3b"
    assert fit(result.package.path, "pi-3b").fits


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_list_and_usage_errors(capsys):
    code, out = _cli("--list", capsys=capsys)
    assert code == 0
    for name in known_profiles():
        assert name in out
    assert "tflite-runtime 2.14.0" in out and "Cortex-A76" in out
    code, out = _cli("--list", "--json", capsys=capsys)
    data = json.loads(out)
    assert data["pi-3b"]["runtime"] == "tflite-runtime" and data["pi-3b"]["runtime_ops"]["ops"]["FULLY_CONNECTED"] < 12
    with pytest.raises(ConfigError, match="--target"):
        _cli("somewhere", capsys=capsys)
    with pytest.raises(ConfigError, match="known targets"):
        _cli("somewhere", "--target", "pi-9", capsys=capsys)


def test_fit_rejects_a_directory_without_a_model(tmp_path):
    from edge_slm.errors import ModelError

    with pytest.raises(ModelError, match="no model.tflite"):
        fit(tmp_path, "pi-5")
    assert np.isfinite(fitmod.throughput_gmacs(load_profile("pi-5"), True))
