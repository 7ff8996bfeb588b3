"""KeywordSpotter over a 60 s espeak-ng recording by held-out voices: times, block-size independence,
resampled input, refractory period, stream resets, one-shot classify()."""

from __future__ import annotations

import numpy as np
import pytest

from edge_slm import runtime
from edge_slm.audio import resample
from edge_slm.errors import InputError, ModelError
from edge_slm.kws import KeywordSpotter
from edge_slm.package import ModelPackage
from edge_slm.streams import AudioBlock, SensorBlock
from edge_slm.wav import read_wav, read_wav_frames, write_wav
from tests.fixtures_voice import score_detections

MIN_RECALL = 0.8
MIN_PRECISION = 0.8


def spotter(kws_package, **options) -> KeywordSpotter:  # noqa: ANN001
    pkg = ModelPackage.open(kws_package.package)
    return KeywordSpotter(pkg, runtime.load(pkg.model_path), **options)


def stream(task: KeywordSpotter, samples: np.ndarray, rate: int, block_ms: float, t0: float | None = 0.0,
           name: str = "rec") -> list[dict]:
    step = max(1, int(round(rate * block_ms / 1000)))
    out: list = []
    for i in range(0, len(samples), step):
        out += task.feed(AudioBlock(samples[i:i + step], rate, t0=None if t0 is None else t0 + i / rate,
                                    stream=name))
    out += task.flush()
    assert all(isinstance(d, dict) for d in out), out
    return out


@pytest.fixture(scope="module")
def recording(kws_package) -> np.ndarray:  # noqa: ANN001
    return read_wav(kws_package.recording).samples


@pytest.fixture(scope="module")
def detections_100ms(kws_package) -> list[dict]:  # noqa: ANN001
    task = spotter(kws_package)
    out: list = []
    for block in read_wav_frames(kws_package.recording, block_ms=100):
        out += task.feed(block)
    return out + task.flush()


def test_reports_each_command_near_its_time(kws_package, detections_100ms) -> None:  # noqa: ANN001
    s = score_detections(detections_100ms, kws_package.events)
    assert s["recall"] >= MIN_RECALL, (s["recall"], s["missed"])
    assert s["precision"] >= MIN_PRECISION, (s["precision"], s["false_alarms"])
    for event, d in s["matched"]:
        # the reporting window covers the word, and the report comes at most 1 s after the word ended
        assert d["t_start"] <= event.t_end and d["t"] >= event.t_start
        assert d["t"] - d["t_start"] == pytest.approx(0.99, abs=0.011)
        assert 0.0 <= d["score"] <= 1.0
    assert len(kws_package.commands) >= 20
    # false alarms per minute of audio stay low
    assert len(s["false_alarms"]) <= 5


def test_same_detections_for_10ms_100ms_and_1s_blocks(kws_package, recording, detections_100ms) -> None:  # noqa: ANN001
    task = spotter(kws_package)
    a = stream(task, recording, 16000, 10)
    b = stream(task, recording, 16000, 1000)
    assert a == b == detections_100ms
    assert len(a) > 10


def test_44k1_and_8k_recordings_are_resampled_and_still_work(kws_package, recording, tmp_path) -> None:  # noqa: ANN001
    task = spotter(kws_package)
    for rate, recall in ((44100, MIN_RECALL), (8000, MIN_RECALL)):
        path = tmp_path / f"rec_{rate}.wav"
        write_wav(path, resample(recording, 16000, rate), rate)
        native = read_wav(path)
        assert native.sample_rate == rate
        found = stream(task, native.samples, rate, 100)
        s = score_detections(found, kws_package.events)
        assert s["recall"] >= recall and s["precision"] >= MIN_PRECISION, (rate, s["recall"], s["precision"],
                                                                           s["missed"], s["false_alarms"])
        # blocks of another size give the same result at this rate too
        assert stream(task, native.samples, rate, 37) == found


def repeats(found: list[dict], within_s: float = 1.0) -> int:
    """Reports of the same keyword less than within_s after the previous report."""
    return sum(1 for a, b in zip(found, found[1:]) if a["keyword"] == b["keyword"] and b["t"] - a["t"] < within_s)


def test_refractory_period_prevents_double_reports(kws_package, recording, detections_100ms) -> None:  # noqa: ANN001
    eager = stream(spotter(kws_package, refractory_ms=0, smoothing_ms=0), recording, 16000, 100)
    # without a refractory period one spoken word fires on several consecutive strides
    assert repeats(eager) >= len(kws_package.commands)
    assert repeats(detections_100ms) == 0
    for refractory_ms in (1000, 2500):
        found = stream(spotter(kws_package, refractory_ms=refractory_ms), recording, 16000, 100)
        times = [d["t"] for d in found]
        assert times and all(b - a >= refractory_ms / 1000 - 1e-6 for a, b in zip(times, times[1:]))


def test_unknown_and_silence_never_fire(kws_package, recording) -> None:  # noqa: ANN001
    # threshold 0: every stride outside the refractory period reports its best class
    found = stream(spotter(kws_package, threshold=0.0, refractory_ms=0), recording[:10 * 16000], 16000, 100)
    assert len(found) == pytest.approx((10 - 0.99) / 0.1 + 1, abs=1)
    assert {d["keyword"] for d in found} <= set(kws_package.dataset.commands)


def test_stream_time_follows_t0_and_a_new_stream_resets(kws_package, recording, detections_100ms) -> None:  # noqa: ANN001
    task = spotter(kws_package)
    shifted = stream(task, recording, 16000, 100, t0=100.0)
    assert [d["keyword"] for d in shifted] == [d["keyword"] for d in detections_100ms]
    assert [d["t"] for d in shifted] == pytest.approx([d["t"] + 100.0 for d in detections_100ms], abs=1e-3)
    # half a recording on stream "a", then the whole recording on stream "b" without t0: "b" starts afresh
    for i in range(0, 30 * 16000, 1600):
        task.feed(AudioBlock(recording[i:i + 1600], 16000, stream="a"))
    again = []
    for i in range(0, len(recording), 1600):
        again += task.feed(AudioBlock(recording[i:i + 1600], 16000, stream="b"))
    again += task.flush()
    assert again == detections_100ms


def test_classify_one_clip(kws_package) -> None:  # noqa: ANN001
    task = spotter(kws_package)
    test = kws_package.dataset.test
    labels = kws_package.labels
    picks = np.random.default_rng(0).permutation(len(test))[:60]
    hits = 0
    for i in picks:
        r = task.classify(test.audio[i], 16000)
        assert set(r) >= {"label", "score", "top", "is_command"}
        assert r["top"][0]["label"] == r["label"] and len(r["top"]) == 3
        assert r["is_command"] == (r["label"] in kws_package.dataset.commands)
        hits += r["label"] == labels[test.y[i]]
    assert hits / len(picks) >= 0.85
    # a longer clip at 44.1 kHz: the word is found wherever it is
    i = next(i for i in picks if test.y[i] < len(kws_package.dataset.commands) and
             task.classify(test.audio[i], 16000)["label"] == labels[test.y[i]])
    silence = test.audio[int(np.flatnonzero(test.y == labels.index("_silence_"))[0])]
    long = np.concatenate([silence[:12000], test.audio[i], silence[4000:]])  # 2.5 s, the word in the middle
    r = task.classify(resample(long, 16000, 44100), 44100)
    assert r["label"] == labels[test.y[i]]
    with pytest.raises(InputError):
        task.classify(np.zeros(0, np.float32), 16000)


def test_rejects_wrong_inputs_and_packages(kws_package, text_model) -> None:  # noqa: ANN001
    task = spotter(kws_package)
    out = task.feed(SensorBlock(np.zeros((10, 3)), 100.0))
    assert len(out) == 1 and isinstance(out[0], InputError) and out[0].code == "bad_input_kind"
    pkg = ModelPackage.open(text_model.package)
    with pytest.raises(ModelError, match="keyword-spotting"):
        KeywordSpotter(pkg, runtime.load(pkg.model_path))
    settings = spotter(kws_package, threshold=0.5, stride_ms=60, smoothing_ms=180, refractory_ms=700).settings()
    assert settings["threshold"] == 0.5 and settings["stride_ms"] == pytest.approx(60.0)
    assert settings["smoothing_ms"] == pytest.approx(180.0) and settings["refractory_ms"] == 700.0
    defaults = spotter(kws_package).settings()
    assert defaults["threshold"] == ModelPackage.open(kws_package.package).preprocessing["streaming"]["threshold"]
    for bad in ({"threshold": 1.5}, {"stride_ms": 0}, {"refractory_ms": -1}):
        with pytest.raises(ModelError, match=next(iter(bad))):
            spotter(kws_package, **bad)


def test_energy_vad_skips_the_model_in_quiet_stretches_and_keeps_the_commands(kws_package, recording) -> None:  # noqa: ANN001
    rng = np.random.default_rng(5)
    quiet = (rng.normal(0, 1, 16000 * 10) * 10 ** (-55 / 20)).astype(np.float32)  # 10 s of room noise
    audio = np.concatenate([quiet, recording, quiet])
    plain, gated = spotter(kws_package), spotter(kws_package, vad="energy")
    d_plain = stream(plain, audio, 16000, 100)
    d_gated = stream(gated, audio, 16000, 100)
    events = [type(e)(e.word, e.label, e.voice, e.t_start + 10, e.t_end + 10) for e in kws_package.events]
    s_plain, s_gated = score_detections(d_plain, events), score_detections(d_gated, events)
    assert s_gated["recall"] >= s_plain["recall"] - 0.05 and s_gated["recall"] >= MIN_RECALL
    assert len(s_gated["false_alarms"]) <= len(s_plain["false_alarms"])
    # at least the two quiet stretches (minus a clip each) went without a model call
    stride_s = gated.stride_ms / 1000
    assert gated.windows_skipped >= 2 * (10 - 2) / stride_s, (gated.windows_skipped, gated.windows_run)
    assert plain.windows_skipped == 0 and gated.windows_run < plain.windows_run
    assert gated.settings()["vad"] == "energy"
    with pytest.raises(ModelError, match="vad"):
        spotter(kws_package, vad="loud")
