"""Vibration data physics, and the int8 sensor models re-checked through the device runtime on held-out machines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from converters.datasets import vibration
from edge_slm import runtime
from edge_slm.package import ModelPackage
from edge_slm.sensor_tasks import SensorAnomalyDetector, SensorClassifier
from edge_slm.streams import SensorBlock


def _envelope_spectrum(x: np.ndarray, fs: float, lo: float) -> tuple[np.ndarray, np.ndarray]:
    spec = np.fft.fft(x - x.mean())
    f = np.fft.fftfreq(len(x), 1 / fs)
    env = np.abs(np.fft.ifft(np.where((f > lo) & (f < 0.95 * fs / 2), 2 * spec, 0)))
    return np.fft.rfftfreq(len(x), 1 / fs), np.abs(np.fft.rfft((env - env.mean()) * np.hanning(len(x))))


def test_bearing_defect_frequencies_follow_the_geometry() -> None:
    b6205 = vibration.Bearing(9, 7.94, 39.04, 0.0)  # the CWRU drive-end bearing: BPFO 3.585x, BPFI 5.415x
    assert b6205.bpfo(1.0) == pytest.approx(3.585, abs=0.002)
    assert b6205.bpfi(1.0) == pytest.approx(5.415, abs=0.002)
    assert b6205.bpfo(30.0) + b6205.bpfi(30.0) == pytest.approx(9 * 30.0)


@pytest.mark.parametrize("condition", ["bearing_outer", "bearing_inner"])
def test_bearing_fault_shows_in_the_envelope_spectrum_at_its_ball_pass_frequency(condition: str) -> None:
    m = vibration.make_machine(3, seed=5)
    r = vibration.simulate(m, condition, 8.0, seed=1, severity=1.0, artefacts=vibration.Artefacts.clean())
    f, env = _envelope_spectrum(r.samples[:, 0].astype(np.float64), r.sample_rate, 600.0)
    band = (f > 0.6 * m.shaft_hz) & (f < 400)
    peak = f[band][np.argmax(env[band])]
    mx = env[band].max()

    def near(hz: float) -> float:  # the line, allowing for the slow speed wander and slip
        return float(env[np.abs(f - hz) < 0.02 * hz].max()) / mx

    bpfo, bpfi = m.bearing.bpfo(m.shaft_hz), m.bearing.bpfi(m.shaft_hz)
    if condition == "bearing_outer":
        assert peak == pytest.approx(bpfo, rel=0.03)
        assert near(m.shaft_hz) < 0.2 and near(bpfi) < 0.2  # stationary defect: no shaft-rate modulation
    else:  # the defect turns with the shaft: 1x modulation, the BPFI line and its sideband at BPFI - 1x
        assert near(m.shaft_hz) > 0.8
        assert near(bpfi) > 0.2 and near(bpfi - m.shaft_hz) > 0.15
        assert near(bpfo) < 0.1


def test_imbalance_raises_the_phase_locked_1x_and_misalignment_the_2x_and_axial() -> None:
    m = vibration.make_machine(2, seed=5)
    clean = vibration.Artefacts.clean()

    def line(r: vibration.Recording, order: float, ch: int) -> float:
        x = r.samples[:, ch].astype(np.float64)
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        f = np.fft.rfftfreq(len(x), 1 / r.sample_rate)
        return float(spec[np.abs(f - order * m.shaft_hz) < 0.05 * m.shaft_hz * order + 1].max())

    normal = vibration.simulate(m, "normal", 4.0, seed=1, artefacts=clean)
    imb = vibration.simulate(m, "imbalance", 4.0, seed=1, severity=0.8, artefacts=clean)
    mis = vibration.simulate(m, "misalignment", 4.0, seed=1, severity=0.8, artefacts=clean)
    assert line(imb, 1, 0) > 3 * line(normal, 1, 0)
    assert line(imb, 2, 0) < 1.5 * line(normal, 2, 0)
    assert line(mis, 2, 0) > 3 * line(normal, 2, 0)
    assert line(mis, 1, 2) > 3 * line(normal, 1, 2)  # axial


def test_generator_is_deterministic_and_machines_differ() -> None:
    a = vibration.make_dataset(3, 1.0, seed=4)
    b = vibration.make_dataset(3, 1.0, seed=4)
    c = vibration.make_dataset(3, 1.0, seed=5)
    assert all(np.array_equal(x.samples, y.samples, equal_nan=True) for x, y in zip(a, b))
    assert not np.array_equal(a[0].samples, c[0].samples)
    speeds = {round(vibration.make_machine(i, 0).shaft_hz, 3) for i in range(10)}
    assert len(speeds) == 10


def test_sensor_artefacts_dropouts_are_nan_and_shocks_clip_at_int16_full_scale() -> None:
    m = vibration.make_machine(1, seed=0)
    r = vibration.simulate(m, "normal", 10.0, seed=2, artefacts=vibration.Artefacts(dropout_rate=1.0, shock_rate=0.5))
    assert r.events["dropout"] and r.events["shock"]
    nan_rows = np.isnan(r.samples).any(axis=1)
    assert nan_rows.sum() >= 5 and np.isnan(r.samples[nan_rows]).all()  # a lost packet loses every axis
    finite = r.samples[~nan_rows]
    lsb = m.full_scale_g / vibration.INT16_FULL
    assert finite.max() <= m.full_scale_g - lsb + 1e-6 and finite.min() >= -m.full_scale_g - 1e-6
    assert (np.abs(finite[:, 0]) >= m.full_scale_g - lsb - 1e-6).sum() >= 2  # clipped
    counts = finite / lsb
    assert np.allclose(counts, np.round(counts), atol=1e-2)  # 16-bit ADC steps


def test_split_by_machine_never_shares_a_machine(vibration_dataset) -> None:  # noqa: ANN001
    d = vibration_dataset.data
    groups = [set(d.machine_ids(s)) for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    for s in ("val", "test"):  # every held-out group has every condition
        assert set(np.unique(d.labels[d.split == s])) == set(range(len(vibration.CONDITIONS)))


def _is_full_int8(pkg: ModelPackage, model: runtime.Model) -> None:
    assert pkg.manifest["quantization"]["recipe"] == "int8"
    assert pkg.manifest["quantization"]["float_ops"] == []
    assert [t.dtype for t in model.inputs + model.outputs] == [np.dtype(np.int8)] * 2
    assert set(pkg.manifest["min_runtime"]["ops"]) <= {"FULLY_CONNECTED", "QUANTIZE", "RELU"}  # from the flatbuffer


def _stream_results(task, recordings):  # noqa: ANN001, ANN202
    """Feed each recording in uneven blocks, as a device receives them; results per recording."""
    out = []
    for i, r in enumerate(recordings):
        res = []
        for a, b in zip((0, 700, 2900), (700, 2900, len(r.samples))):
            res += task.feed(SensorBlock(r.samples[a:b], r.sample_rate, r.channels, t0=a / r.sample_rate, stream=str(i)))
        res += task.flush()
        assert all(isinstance(x, dict) for x in res), [x for x in res if not isinstance(x, dict)][:2]
        out.append(res)
    return out


def test_anomaly_model_detects_faults_on_held_out_machines_through_the_device_task(
        anomaly_trained, vibration_dataset) -> None:  # noqa: ANN001
    pkg = ModelPackage.open(anomaly_trained.path)
    model = runtime.load(pkg.model_path, threads=1)
    _is_full_int8(pkg, model)
    task = SensorAnomalyDetector(pkg, model)
    recs = vibration_dataset.test_recordings()
    results = _stream_results(task, recs)
    normal = np.array([o["score"] for r, res in zip(recs, results) if r.condition == "normal" for o in res])
    fault = np.array([o["score"] for r, res in zip(recs, results) if r.condition != "normal" for o in res])
    flags_n = np.array([o["anomaly"] for r, res in zip(recs, results) if r.condition == "normal" for o in res])
    flags_f = np.array([o["anomaly"] for r, res in zip(recs, results) if r.condition != "normal" for o in res])
    false_alarms, detection = flags_n.mean(), flags_f.mean()
    assert false_alarms <= 0.05
    assert detection >= 0.9
    from converters.sensor_models import auc

    assert auc(normal, fault) >= 0.98
    # the manifest's int8 numbers are what the device measures on the same windows
    report = pkg.manifest["validation"]["anomaly"]
    assert report["int8"]["false_alarm_rate"] == pytest.approx(false_alarms, abs=1e-6)
    assert report["int8"]["detection_rate"] == pytest.approx(detection, abs=1e-6)
    assert report["int8"]["threshold"] == task.threshold
    assert report["test_machines"] == vibration_dataset.data.machine_ids("test")


def test_int8_autoencoder_scores_keep_the_float_models_detection_quality(anomaly_trained, vibration_dataset) -> None:  # noqa: ANN001
    from converters.sensor_models import auc, tflite_outputs
    from converters.tf_env import tf
    from edge_slm.sensor_tasks import reconstruction_error

    d = vibration_dataset.data
    keras_model = tf().keras.models.load_model(anomaly_trained.keras_path)
    int8 = runtime.load(ModelPackage.open(anomaly_trained.path).model_path, threads=1)
    x_normal = d.x("test", "normal")
    x_fault = np.concatenate([d.x("test", c) for c in vibration.CONDITIONS[1:]])
    scores = {}
    for kind, run in (("float", lambda x: keras_model.predict(x, verbose=0)), ("int8", lambda x: tflite_outputs(int8, x))):
        scores[kind] = (reconstruction_error(x_normal, run(x_normal)), reconstruction_error(x_fault, run(x_fault)))
    auc_f, auc_q = auc(*scores["float"]), auc(*scores["int8"])
    assert auc_q >= auc_f - 0.01
    both = np.concatenate(scores["float"]), np.concatenate(scores["int8"])
    assert np.corrcoef(np.log(both[0]), np.log(both[1]))[0, 1] > 0.98
    manifest = ModelPackage.open(anomaly_trained.path).manifest["validation"]["anomaly"]
    assert manifest["float"]["auc"] == pytest.approx(auc_f, abs=2e-3)


def test_fault_classifier_is_accurate_on_held_out_machines_and_int8_agrees_with_float(
        fault_trained, vibration_dataset) -> None:  # noqa: ANN001
    from converters.tf_env import tf

    pkg = ModelPackage.open(fault_trained.path)
    model = runtime.load(pkg.model_path, threads=1)
    _is_full_int8(pkg, model)
    assert pkg.labels == list(vibration.CONDITIONS)
    task = SensorClassifier(pkg, model)
    recs = vibration_dataset.test_recordings()
    results = _stream_results(task, recs)
    truth = np.array([r.condition for r, res in zip(recs, results) for _ in res])
    pred = np.array([o["label"] for res in results for o in res])
    accuracy = float(np.mean(truth == pred))
    assert accuracy >= 0.9
    for c in vibration.CONDITIONS:  # no class is given up
        assert np.mean(pred[truth == c] == c) >= 0.6, c
    # float vs int8 on the same windows, float from the Keras model the package was converted from
    d = vibration_dataset.data
    x = d.x("test")
    float_top = tf().keras.models.load_model(fault_trained.keras_path).predict(x, verbose=0).argmax(axis=1)
    int8_top = np.array([np.argmax(model.run(row[None])[0]) for row in x])
    assert np.mean(float_top == int8_top) >= 0.99
    q = pkg.manifest["validation"]["quantized"]
    assert q["accuracy_quantized"] == pytest.approx(accuracy, abs=1e-6)
    assert q["top1_agreement"] >= 0.99
    assert pkg.manifest["validation"]["held_out"]["test_machines"] == d.machine_ids("test")


def test_train_sensor_cli_has_help() -> None:
    out = subprocess.run([sys.executable, "-m", "converters.sensor_models", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "--out" in out.stdout and "--percentile" in out.stdout and "percentile" in out.stdout
