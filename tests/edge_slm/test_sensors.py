"""Sensor windowing, features and the streaming sensor tasks: block splits, missing samples, gaps, channels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm import runtime
from edge_slm.errors import InputError, ModelError
from edge_slm.package import ModelPackage
from edge_slm.sensor_tasks import SensorAnomalyDetector, SensorClassifier
from edge_slm.sensors import FEATURES_KIND, SensorFeatures, SensorWindower, Window
from edge_slm.streams import SensorBlock

CH = ("ax", "ay", "az")


def _signal(n: int, seed: int = 0, rate: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / rate
    return (np.sin(2 * np.pi * 7 * t + np.arange(3)) + 0.1 * rng.normal(size=(n, 3))).astype(np.float32)


def _feed_split(w: SensorWindower, x: np.ndarray, cuts: list[int], rate: float, t0: float = 0.0,
                timed: bool = True) -> list:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(x))), len(x)]
    out = []
    for a, b in zip(edges, edges[1:]):
        out += w.feed(SensorBlock(x[a:b], rate, CH, t0=(t0 + a / rate) if timed else None))
    return out


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if isinstance(x, Window):
            assert np.array_equal(x.samples, y.samples) and x.t_start == y.t_start and x.t_end == y.t_end
        else:
            assert (x.code, str(x)) == (y.code, str(y))


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 299), max_size=12), window=st.integers(4, 40), hop=st.integers(1, 50),
       timed=st.booleans())
def test_any_block_split_gives_the_same_windows(cuts: list[int], window: int, hop: int, timed: bool) -> None:
    x = _signal(300)
    x[137, 1] = np.nan  # one missing sample: the error outputs must line up too
    whole = SensorWindower(window, hop, CH, 100.0).feed(SensorBlock(x, 100.0, CH, t0=2.0))
    split = _feed_split(SensorWindower(window, hop, CH, 100.0), x, cuts, 100.0, t0=2.0, timed=timed)
    if not timed:  # without block times the stream starts at 0
        whole = SensorWindower(window, hop, CH, 100.0).feed(SensorBlock(x, 100.0, CH))
    _same(whole, split)
    starts = [2.0 * timed + i * hop / 100.0 for i in range((300 - window) // hop + 1)]
    assert [w.t_start for w in whole if isinstance(w, Window)] == pytest.approx(
        [s for s, w in zip(starts, whole) if isinstance(w, Window)])
    assert len(whole) == len(starts)


def test_windows_take_the_models_channels_in_its_order() -> None:
    x = _signal(64)
    w1 = SensorWindower(32, 32, CH, 100.0).feed(SensorBlock(x, 100.0, CH))
    shuffled = SensorBlock(np.concatenate([x[:, [2, 0]], np.ones((64, 1)), x[:, [1]]], axis=1), 100.0,
                           ("az", "ax", "temp", "ay"))
    w2 = SensorWindower(32, 32, CH, 100.0).feed(shuffled)
    _same(w1, w2)


def test_missing_samples_are_an_error_naming_channel_count_and_time() -> None:
    x = _signal(200)
    x[50:60, 2] = np.nan
    x[55, 0] = np.nan
    out = SensorWindower(100, 100, CH, 100.0).feed(SensorBlock(x, 100.0, CH, t0=10.0))
    assert isinstance(out[0], InputError) and isinstance(out[1], Window)
    assert out[0].code == "missing_samples"
    msg = str(out[0])
    assert "ax: 1" in msg and "az: 10" in msg and "ay:" not in msg
    assert "10.5000 s" in msg and "10.5900 s" in msg  # first and last missing sample


def test_time_gap_between_blocks_is_reported_and_windowing_restarts() -> None:
    x = _signal(400)
    w = SensorWindower(50, 25, CH, 100.0)
    out = w.feed(SensorBlock(x[:80], 100.0, CH, t0=0.0))
    assert [o.t_start for o in out] == [0.0, 0.25]
    out = w.feed(SensorBlock(x[80:200], 100.0, CH, t0=1.3))  # 0.5 s of samples never arrived
    assert isinstance(out[0], InputError) and out[0].code == "time_gap"
    assert "0.8000 s" in str(out[0]) and "1.3000 s" in str(out[0]) and "50 samples" in str(out[0])
    assert [o.t_start for o in out[1:]] == pytest.approx([1.3, 1.55, 1.8])
    back = w.feed(SensorBlock(x[:10], 100.0, CH, t0=0.5))
    assert back[0].code == "time_gap" and "went back" in str(back[0])
    ok = w.feed(SensorBlock(x[:60], 100.0, CH, t0=0.6 + 0.004))  # within 1.5 samples: clock jitter, not a gap
    assert all(isinstance(o, Window) for o in ok) and len(ok) == 1


def test_wrong_sample_rate_or_missing_channel_is_an_error_for_that_block() -> None:
    w = SensorWindower(32, 16, CH, 100.0)
    out = w.feed(SensorBlock(_signal(64), 200.0, CH))
    assert out[0].code == "sample_rate_mismatch" and "200 Hz" in str(out[0]) and "100 Hz" in str(out[0])
    out = w.feed(SensorBlock(_signal(64)[:, :2], 100.0, ("ax", "ay")))
    assert out[0].code == "channel_mismatch" and "missing az" in str(out[0])
    assert len(w.feed(SensorBlock(_signal(64), 100.0, CH))) == 3  # the stream goes on


def test_saturated_window_and_too_short_stream_are_reported() -> None:
    x = _signal(64) * 0.5
    x[10:14, 1] = 4.0
    w = SensorWindower(32, 32, CH, 100.0, full_scale=4.0)
    out = w.feed(SensorBlock(x, 100.0, CH))
    assert out[0].code == "sensor_saturated" and "ay: 4" in str(out[0]) and isinstance(out[1], Window)
    w.reset()
    assert w.feed(SensorBlock(x[:20], 100.0, CH)) == []
    end = w.flush()
    assert end[0].code == "stream_too_short" and "20 sample" in str(end[0])
    assert w.flush() == []


def test_features_ignore_offset_and_linear_drift() -> None:
    f = SensorFeatures(3200.0, 1024, CH)
    x = _signal(1024, rate=3200.0) * 0.1
    drift = 1.0 + np.linspace(0, 0.3, 1024)[:, None] * np.array([1.0, -2.0, 0.5])
    a, b = f.raw(x), f.raw(x + drift.astype(np.float32))
    assert np.allclose(a, b, atol=2e-3)
    batch = f.raw(np.stack([x, 2 * x]))
    assert np.array_equal(batch[0], a) and batch.shape == (2, f.n_features)
    assert batch[1][0] == pytest.approx(a[0] + np.log10(2), abs=1e-4)  # log RMS of channel ax
    assert len(f.feature_names()) == f.n_features


def test_feature_manifest_round_trips_and_names_bad_keys() -> None:
    f = SensorFeatures(3200.0, 1024, CH, full_scale=4.0).fitted(np.random.default_rng(0).normal(size=(50, 153)))
    g = SensorFeatures.from_manifest(json.loads(json.dumps(f.to_manifest())))
    x = _signal(1024, rate=3200.0)
    assert np.allclose(f(x), g(x), atol=1e-4)
    bad = f.to_manifest() | {"bandz": 3}
    with pytest.raises(ModelError, match="bandz"):
        SensorFeatures.from_manifest(bad)
    with pytest.raises(ModelError, match="kind"):
        SensorFeatures.from_manifest(f.to_manifest() | {"kind": "mel-v9"})
    with pytest.raises(ModelError, match="mean"):
        SensorFeatures.from_manifest(f.to_manifest() | {"mean": [0.0] * 3})
    with pytest.raises(ModelError, match="window"):
        SensorFeatures.from_manifest({k: v for k, v in f.to_manifest().items() if k != "window"})


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=5),
                    st.lists(st.one_of(st.text(max_size=3), st.floats()), max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(["kind", "sample_rate", "window", "channels", "bands", "f_min",
                                                "envelope_bands", "envelope_f_max", "envelope_highpass",
                                                "full_scale", "mean", "std", "extra"]), _values, max_size=4))
def test_feature_manifest_parser_only_raises_model_error(changes: dict) -> None:
    base = {"kind": FEATURES_KIND, "sample_rate": 1000.0, "window": 256, "channels": ["a", "b"]}
    try:
        f = SensorFeatures.from_manifest(base | changes)
    except ModelError:
        return
    assert f.n_features == len(f.channels) * f.per_channel


# --- the device tasks on the trained packages -------------------------------------------------------


def _counting(model: runtime.Model) -> list[int]:
    """Count real interpreter invocations of MODEL."""
    calls: list[int] = []
    run = model.run

    def counted(*arrays: np.ndarray) -> list[np.ndarray]:
        calls.append(1)
        return run(*arrays)

    model.run = counted  # type: ignore[method-assign]
    return calls


@pytest.fixture(scope="module")
def recording():  # noqa: ANN201
    from converters.datasets import vibration

    m = vibration.make_machine(900, seed=0)  # a machine no model saw
    return vibration.simulate(m, "bearing_outer", 4.0, seed=3, severity=0.8,
                              artefacts=vibration.Artefacts(dropout_rate=1.0, dropout_len=(20, 60)))


def test_dropouts_become_errors_and_never_reach_the_model(anomaly_package, recording) -> None:  # noqa: ANN001
    pkg = ModelPackage.open(anomaly_package)
    model = runtime.load(pkg.model_path, threads=1)
    calls = _counting(model)
    task = SensorAnomalyDetector(pkg, model)
    r = recording
    out = []
    for a in range(0, len(r.samples), 333):
        out += task.feed(SensorBlock(r.samples[a:a + 333], r.sample_rate, r.channels, t0=a / r.sample_rate))
    errors = [o for o in out if isinstance(o, InputError)]
    results = [o for o in out if isinstance(o, dict)]
    starts = range(0, len(r.samples) - task.window + 1, task.hop)
    expected_bad = sum(1 for k in starts if np.isnan(r.samples[k:k + task.window]).any())
    assert errors and len(errors) == expected_bad and len(results) == len(starts) - expected_bad
    assert all(e.code == "missing_samples" and "ax:" in str(e) and "az:" in str(e) for e in errors)
    assert len(calls) == len(results) == task.invocations
    assert np.mean([r_["anomaly"] for r_ in results]) >= 0.9  # a bearing fault on a machine no model saw
    assert set(results[0]) == {"anomaly", "score", "threshold", "error", "channel", "t_start", "t_end"}


def test_classifier_checks_channels_and_rate_and_resets_on_a_new_stream(fault_package) -> None:  # noqa: ANN001
    from converters.datasets import vibration

    pkg = ModelPackage.open(fault_package)
    model = runtime.load(pkg.model_path, threads=1)
    calls = _counting(model)
    task = SensorClassifier(pkg, model, top_k=2)
    assert task.input_kind == "sensor" and task.channels == vibration.ACCEL_CHANNELS and task.sample_rate == 3200.0
    r = vibration.simulate(vibration.make_machine(901, seed=0), "misalignment", 2.0, seed=1, severity=0.9)
    out = task.feed(SensorBlock(r.samples, 1600.0, r.channels))
    assert len(out) == 1 and out[0].code == "sample_rate_mismatch"
    out = task.feed(SensorBlock(r.samples[:, :2], r.sample_rate, ("x", "y")))
    assert out[0].code == "channel_mismatch" and "ax, ay, az" in str(out[0])
    assert calls == []
    out = task.feed(SensorBlock(r.samples[:1600], r.sample_rate, r.channels, stream="a"))
    assert [o["t_start"] for o in out] == [0.0, 0.16]
    assert set(out[0]) == {"label", "score", "top", "t_start", "t_end"} and len(out[0]["top"]) == 2
    out = task.feed(SensorBlock(r.samples[1600:1700], r.sample_rate, r.channels, stream="b"))
    assert out == []  # the 576 buffered samples of stream "a" were dropped, not joined to "b"
    out += task.feed(SensorBlock(r.samples[1700:], r.sample_rate, r.channels, stream="b"))
    assert [o["t_start"] for o in out] == pytest.approx([0.16 * k for k in range(8)])  # 4800 samples of "b"
    labels = [o["label"] for o in out]
    assert labels.count("misalignment") >= len(labels) - 1
    assert task.flush() == []


def test_one_window_given_whole_as_json_lists(fault_package, anomaly_package) -> None:  # noqa: ANN001
    from converters.datasets import vibration

    r = vibration.simulate(vibration.make_machine(902, seed=0), "imbalance", 1.0, seed=1, severity=1.0)
    window = json.loads(json.dumps(r.samples[:1024].tolist()))  # what arrives in an MQTT payload
    for path in (fault_package, anomaly_package):
        pkg = ModelPackage.open(path)
        task = (SensorClassifier if pkg.task == "sensor-classification" else SensorAnomalyDetector)(
            pkg, runtime.load(pkg.model_path, threads=1))
        out = task.classify_window(window, 3200)
        channel_major = task.classify_window(np.asarray(window).T.tolist(), 3200)
        assert out == channel_major and out["t_start"] == 0.0 and out["t_end"] == 0.32
        if pkg.task == "sensor-classification":
            assert out["label"] == "imbalance"
        else:
            assert out["anomaly"] is True
        with pytest.raises(InputError) as e:
            task.classify_window(window[:1000], 3200)
        assert e.value.code == "bad_window" and "1024" in str(e.value)
        with pytest.raises(InputError) as e:
            task.classify_window(window, 1000)
        assert e.value.code == "sample_rate_mismatch"
        holes = [row[:] for row in window]
        holes[7][1] = float("nan")
        with pytest.raises(InputError) as e:
            task.classify_window(holes, 3200)
        assert e.value.code == "missing_samples" and "ay: 1" in str(e.value)
        assert task.invocations == 2


def test_tasks_refuse_a_package_whose_features_do_not_fit_the_model(anomaly_package, tmp_path) -> None:  # noqa: ANN001
    from edge_slm.package import write_package

    pkg = ModelPackage.open(anomaly_package)
    manifest = dict(pkg.manifest)
    prep = dict(manifest["preprocessing"])
    prep["features"] = dict(prep["features"]) | {"bands": 20, "mean": None, "std": None}
    manifest["preprocessing"] = prep
    bad = write_package(tmp_path / "bad", pkg.model_path.read_bytes(), manifest)
    with pytest.raises(ModelError, match="mean/std"):
        SensorAnomalyDetector(bad, runtime.load(bad.model_path))
    prep["features"] = dict(pkg.manifest["preprocessing"]["features"]) | {"channels": ["ax", "ay"], "units": ["g", "g"]}
    prep["features"]["mean"] = prep["features"]["mean"][:102]
    prep["features"]["std"] = prep["features"]["std"][:102]
    bad = write_package(tmp_path / "bad2", pkg.model_path.read_bytes(), manifest)
    with pytest.raises(ModelError, match="153"):
        SensorAnomalyDetector(bad, runtime.load(bad.model_path))
    manifest["preprocessing"] = dict(pkg.manifest["preprocessing"]) | {"anomaly": {"threshold": -1}}
    bad = write_package(tmp_path / "bad3", pkg.model_path.read_bytes(), manifest)
    with pytest.raises(ModelError, match="threshold"):
        SensorAnomalyDetector(bad, runtime.load(bad.model_path))


def test_si_blocks_from_the_serial_bridge_are_converted_to_the_model_units():
    from edge_slm.sensors import SensorWindower
    from edge_slm.streams import SensorBlock

    rng = np.random.default_rng(3)
    g = rng.normal(0, 1, (64, 2)).astype(np.float32)
    w = SensorWindower(64, 64, ("ax", "gx"), 100.0, units=("g", "deg/s"))
    si = np.stack([g[:, 0] * 9.80665, np.radians(g[:, 1])], axis=1)
    [win] = w.feed(SensorBlock(si, 100.0, ("ax", "gx"), units="si"))
    np.testing.assert_allclose(win.samples, g, rtol=1e-5, atol=1e-5)
    w.reset()
    [same] = w.feed(SensorBlock(g, 100.0, ("ax", "gx")))  # no units: already the model's
    np.testing.assert_array_equal(same.samples, g)
    odd = SensorWindower(64, 64, ("t",), 100.0, units=("degC",))
    [err] = odd.feed(SensorBlock(np.zeros((64, 1)), 100.0, ("t",), units="si"))
    assert err.code == "unit_mismatch" and "degC" in str(err)
