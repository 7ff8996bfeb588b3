"""edge_slm.audio against TensorFlow's tf.signal and sox, on real espeak-ng speech."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_slm.audio import (
    FeatureStream,
    FrontEnd,
    Resampler,
    frame,
    mel_filterbank,
    mfcc,
    pre_emphasis,
    resample,
    to_float,
)
from edge_slm.errors import ConfigError, InputError, ModelError
from edge_slm.wav import read_wav


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """espeak-ng speech (22,050 Hz PCM16) and sox's 16 kHz version of it."""
    d = tmp_path_factory.mktemp("audio_speech")
    phrases = ["turn on the kitchen lights", "stop", "what is the temperature outside", "seven"]
    for i, text in enumerate(phrases):
        subprocess.run(["espeak-ng", "-w", str(d / f"p{i}.wav"), text], check=True)
    subprocess.run(["sox", str(d / "p0.wav"), "-r", "16000", str(d / "p0_sox16k.wav")], check=True)
    return d


@pytest.fixture(scope="session")
def speech16k(speech_dir: Path) -> np.ndarray:
    """About five seconds of speech at 16 kHz: the phrases back to back."""
    parts = [read_wav(speech_dir / f"p{i}.wav", target_rate=16000).samples for i in range(4)]
    return np.concatenate(parts)


@pytest.fixture(scope="session")
def tfm():  # noqa: ANN201 - the tensorflow module
    from converters.tf_env import tf

    return tf()


# ------------------------------------------------------------------------------------------- vs TensorFlow


@pytest.mark.parametrize("rate,n_fft,n_mels,fmin,fmax", [
    (16000, 512, 40, 20.0, 8000.0),
    (16000, 1024, 64, 125.0, 7500.0),
    (22050, 512, 32, 0.0, 11025.0),
    (8000, 256, 20, 300.0, 3800.0),
])
def test_mel_filterbank_matches_tf(tfm, rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> None:
    ours = mel_filterbank(rate, n_fft, n_mels, fmin, fmax)
    theirs = tfm.signal.linear_to_mel_weight_matrix(n_mels, n_fft // 2 + 1, rate, fmin, fmax).numpy()
    assert ours.shape == theirs.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert np.all(ours[0] == 0)  # DC carries no weight
    assert np.all(ours.max(axis=0) > 0)  # no empty filter


def _tf_log_mel(tfm, x: np.ndarray, fe: FrontEnd) -> np.ndarray:
    """The same pipeline written with tf.signal ops only."""
    sig = tfm.constant(x[None, :], dtype=tfm.float32)
    if fe.preemphasis:
        frames = tfm.signal.frame(sig, fe.window_length(), fe.hop_length())
        c = fe.preemphasis
        frames = tfm.concat([frames[..., :1] * (1.0 - c), frames[..., 1:] - c * frames[..., :-1]], axis=-1)
        window = tfm.signal.hann_window(fe.window_length(), periodic=True)
        spec = tfm.signal.rfft(frames * window, fft_length=[fe.fft_length()])
    else:
        spec = tfm.signal.stft(sig, fe.window_length(), fe.hop_length(), fe.fft_length())
    power = tfm.math.square(tfm.abs(spec))
    mel = tfm.signal.linear_to_mel_weight_matrix(fe.n_mels, fe.fft_length() // 2 + 1, fe.sample_rate,
                                                 fe.fmin, fe.upper_hz())
    return tfm.math.log(tfm.tensordot(power, mel, 1) + fe.log_floor).numpy()[0]


@pytest.mark.parametrize("preemphasis", [0.0, 0.97])
def test_log_mel_matches_tf_signal(tfm, speech16k: np.ndarray, preemphasis: float) -> None:
    fe = FrontEnd(preemphasis=preemphasis)
    ours = fe.features(speech16k)
    theirs = _tf_log_mel(tfm, speech16k, fe)
    assert ours.shape == theirs.shape == (fe.n_frames(speech16k.size), 40)
    assert ours.dtype == np.float32
    # log domain: absolute error is relative error of the mel energies
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)  # measured: 1.2e-4
    assert np.median(np.abs(ours - theirs)) < 1e-5
    assert ours.std() > 1.0  # speech, not a constant


def test_mfcc_matches_tf_signal(tfm, speech16k: np.ndarray) -> None:
    fe = FrontEnd(n_mfcc=13, n_mels=40)
    ours = fe.features(speech16k)
    log_mel = FrontEnd(n_mels=40).features(speech16k)
    theirs = tfm.signal.mfccs_from_log_mel_spectrograms(tfm.constant(log_mel)).numpy()[:, :13]
    assert ours.shape == (fe.n_frames(speech16k.size), 13) == (len(log_mel), fe.n_features())
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # measured: 8e-6
    np.testing.assert_allclose(mfcc(log_mel, 13), ours, atol=1e-6)


def test_window_and_frame_counts() -> None:
    fe = FrontEnd()
    assert (fe.window_length(), fe.hop_length(), fe.fft_length()) == (480, 320, 512)
    assert fe.n_frames(16000) == 49 and fe.n_frames(479) == 0 and fe.n_frames(480) == 1
    assert fe.n_frames(800) == 2 and fe.n_samples(2) == 800
    assert FrontEnd(sample_rate=8000, window_ms=25, hop_ms=10, n_fft=512).fft_length() == 512
    assert fe.features(np.zeros(300, np.float32)).shape == (0, 40)
    x = np.arange(10.0)
    np.testing.assert_array_equal(frame(x, 4, 3), [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    assert frame(x[:9], 4, 3).shape == (2, 4)


def test_features_batch_equals_features(speech16k: np.ndarray) -> None:
    fe = FrontEnd(n_mfcc=10)
    clips = np.stack([speech16k[i * 8000:i * 8000 + 16000] for i in range(4)])
    batch = fe.features_batch(clips)
    assert batch.shape == (4, 49, 10)
    for i in range(4):
        np.testing.assert_array_equal(batch[i], fe.features(clips[i]))
    np.testing.assert_array_equal(fe.features(speech16k), fe.features(speech16k.copy()))  # deterministic


def test_int16_input_gives_the_same_features(speech16k: np.ndarray) -> None:
    fe = FrontEnd()
    pcm = np.round(speech16k * 32767).astype(np.int16)
    np.testing.assert_allclose(fe.features(pcm), fe.features(pcm / 32768.0), atol=1e-5)
    with pytest.raises(InputError) as err:
        fe.features(np.zeros((2, 1000), np.float32))
    assert err.value.code == "bad_audio"


# ------------------------------------------------------------------------------------------- streaming


def test_streaming_in_hop_multiples_gives_the_whole_clip_features(speech16k: np.ndarray) -> None:
    fe = FrontEnd()
    whole = fe.features(speech16k)
    hop, win = fe.hop_length(), fe.window_length()
    # chunks start at multiples of hop; each carries the (win - hop) samples the next frame needs
    step = 7 * hop
    pieces = [fe.features(speech16k[s:s + step + win - hop]) for s in range(0, speech16k.size, step)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize("n_mfcc", [0, 13])
def test_feature_stream_with_any_block_sizes_equals_whole_clip(speech16k: np.ndarray, n_mfcc: int) -> None:
    fe = FrontEnd(n_mfcc=n_mfcc)
    whole = fe.features(speech16k)
    stream = FeatureStream(fe)
    rng = np.random.default_rng(0)
    out, i = [], 0
    while i < speech16k.size:
        n = int(rng.integers(1, 2500))
        out.append(stream.push(speech16k[i:i + n]))
        i += n
    got = np.concatenate(out)
    assert stream.frames_done == len(whole)
    np.testing.assert_array_equal(got, whole)
    stream.reset()
    assert stream.push(speech16k[:100]).shape == (0, fe.n_features())


def test_pre_emphasis_is_per_frame() -> None:
    x = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    np.testing.assert_allclose(pre_emphasis(x, 0.5), [[0.5, 1.5, 2.0], [1.5, 0.5, 0.0]])
    np.testing.assert_array_equal(pre_emphasis(x, 0.0), x)


# ------------------------------------------------------------------------------------------- resampling


def _tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * rate / x.size)


@pytest.mark.parametrize("src,dst", [(44100, 16000), (22050, 16000), (48000, 16000), (16000, 48000),
                                     (8000, 16000), (16000, 22050)])
def test_resample_keeps_frequency_and_amplitude(src: int, dst: int) -> None:
    for freq in (440.0, 1000.0, 3000.0):
        y = resample(_tone(freq, src), src, dst)
        assert y.dtype == np.float32 and y.size == dst
        inner = y[dst // 20:-dst // 20]  # away from the edges, where the zeros outside the clip leak in
        assert abs(_peak_hz(inner, dst) - freq) <= dst / inner.size
        rms_db = 20 * np.log10(np.sqrt(np.mean(inner.astype(np.float64) ** 2)) / (0.5 / np.sqrt(2)))
        assert abs(rms_db) < 0.05, (freq, rms_db)
        ref = _tone(freq, dst)[dst // 20:-dst // 20]
        assert np.max(np.abs(inner - ref)) < 1e-3


@pytest.mark.parametrize("src,dst,freq", [(44100, 16000, 9000.0), (44100, 16000, 12000.0),
                                          (48000, 8000, 4500.0), (22050, 16000, 10000.0)])
def test_resample_attenuates_tones_above_the_new_nyquist(src: int, dst: int, freq: float) -> None:
    y = resample(_tone(freq, src, amp=0.9), src, dst)
    inner = y[dst // 20:-dst // 20].astype(np.float64)
    attenuation_db = 20 * np.log10(np.sqrt(np.mean(inner ** 2)) / (0.9 / np.sqrt(2)))
    assert attenuation_db < -40.0, attenuation_db


@pytest.mark.parametrize("src,dst", [(44100, 16000), (16000, 22050)])
def test_resample_passband_is_flat_to_85_percent_of_nyquist(src: int, dst: int) -> None:
    nyquist = min(src, dst) / 2
    for frac in (0.1, 0.5, 0.7, 0.85):
        y = resample(_tone(frac * nyquist, src, amp=0.9), src, dst)[dst // 20:-dst // 20].astype(np.float64)
        gain_db = 20 * np.log10(np.sqrt(np.mean(y ** 2)) / (0.9 / np.sqrt(2)))
        assert abs(gain_db) < 0.1, (frac, gain_db)


def test_resample_length_is_exact() -> None:
    rng = np.random.default_rng(1)
    for src, dst in [(22050, 16000), (44100, 16000), (16000, 44100), (16001, 16000), (11025, 8000)]:
        for n in (0, 1, 2, 3, 137, 1000, 22051):
            y = resample(rng.normal(size=n).astype(np.float32), src, dst)
            assert y.size == round(Fraction(n * dst, src)), (src, dst, n)


def test_resample_same_rate_is_identity() -> None:
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)


def test_resample_of_espeak_speech_is_close_to_sox(speech_dir: Path) -> None:
    src = read_wav(speech_dir / "p0.wav")
    assert src.sample_rate == 22050
    ours = resample(src.samples, 22050, 16000)
    theirs = read_wav(speech_dir / "p0_sox16k.wav")
    assert theirs.sample_rate == 16000 and theirs.samples.size == ours.size
    corr = np.corrcoef(ours, theirs.samples)[0, 1]
    assert corr > 0.99, corr
    # and clearly better than naive decimation by nearest sample
    naive = src.samples[np.minimum(np.round(np.arange(ours.size) * 22050 / 16000).astype(int), src.samples.size - 1)]
    assert np.mean((ours - theirs.samples) ** 2) < np.mean((naive - theirs.samples) ** 2)


def test_streaming_resampler_equals_whole_signal(speech16k: np.ndarray) -> None:
    x = speech16k[:40000]
    whole = resample(x, 16000, 22050)
    r = Resampler(16000, 22050)
    rng = np.random.default_rng(2)
    out, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 3000))
        out.append(r.feed(x[i:i + n]))
        i += n
    out.append(r.finish())
    np.testing.assert_array_equal(np.concatenate(out), whole)


# ------------------------------------------------------------------------------------------- conversions


def test_to_float_scales_every_integer_type() -> None:
    np.testing.assert_array_equal(to_float(np.array([-32768, 0, 16384], np.int16)), [-1.0, 0.0, 0.5])
    np.testing.assert_array_equal(to_float(np.array([0, 128, 192], np.uint8)), [-1.0, 0.0, 0.5])
    np.testing.assert_array_equal(to_float(np.array([-2 ** 31, 2 ** 30], np.int32)), [-1.0, 0.5])
    np.testing.assert_array_equal(to_float(np.array([-128, 64], np.int8)), [-1.0, 0.5])
    f = to_float(np.array([0.25, -0.5], np.float64))
    assert f.dtype == np.float32 and f.tolist() == [0.25, -0.5]


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_through_json() -> None:
    for fe in (FrontEnd(), FrontEnd(sample_rate=8000, window_ms=25, hop_ms=10, n_mels=32, n_mfcc=12,
                                    preemphasis=0.0, fmin=60, fmax=3800, log_floor=1e-3)):
        d = json.loads(json.dumps(fe.to_manifest()))
        assert d["features"] == ("mfcc" if fe.n_mfcc else "log_mel")
        assert FrontEnd.from_manifest(d) == fe
    assert FrontEnd.from_manifest({"n_mels": 64}) == FrontEnd(n_mels=64)


@pytest.mark.parametrize("patch,key", [
    ({"n_melz": 40}, "n_melz"),
    ({"n_mels": "40"}, "n_mels"),
    ({"n_mels": 40.5}, "n_mels"),
    ({"sample_rate": True}, "sample_rate"),
    ({"sample_rate": -16000}, "sample_rate"),
    ({"hop_ms": 0}, "hop_ms"),
    ({"n_fft": 256}, "n_fft"),
    ({"n_mfcc": 50}, "n_mfcc"),
    ({"fmax": 9000}, "fmax"),
    ({"fmin": 8000}, "fmin"),
    ({"preemphasis": 1.5}, "preemphasis"),
    ({"log_floor": 0}, "log_floor"),
    ({"window_ms": float("nan")}, "window_ms"),
    ({"schema_version": 2}, "schema_version"),
    ({"features": "mfcc"}, "features"),
    ({"window_ms": 1e12}, "window_ms"),
    ({"n_fft": 2 ** 40}, "n_fft"),
    ({"hop_ms": 10 ** 400}, "hop_ms"),
])
def test_from_manifest_names_the_bad_key(patch: dict, key: str) -> None:
    d = FrontEnd().to_manifest()
    d.update(patch)
    with pytest.raises(ModelError, match=key):
        FrontEnd.from_manifest(d)


def test_numpy_scalars_become_plain_numbers() -> None:
    fe = FrontEnd(sample_rate=np.int64(8000), window_ms=np.float32(25.0), n_mels=np.int32(20), hop_ms=10)
    assert type(fe.sample_rate) is int and type(fe.window_ms) is float and type(fe.hop_ms) is float
    assert fe == FrontEnd(sample_rate=8000, window_ms=25.0, n_mels=20, hop_ms=10.0)
    json.dumps(fe.to_manifest())


def test_bad_front_end_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_mels"):
        FrontEnd(n_mels=0)
    with pytest.raises(ModelError, match="object"):
        FrontEnd.from_manifest(["not", "a", "dict"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- properties

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats(allow_nan=True)
                     | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=5)
_KEYS = st.sampled_from(["sample_rate", "window_ms", "hop_ms", "n_fft", "n_mels", "n_mfcc", "preemphasis",
                         "fmin", "fmax", "log_floor", "schema_version", "features", "extra"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _JSON | st.integers(0, 20000) | st.floats(0, 20000) | st.integers(), max_size=6))
def test_from_manifest_gives_a_front_end_or_model_error(d: dict) -> None:
    try:
        fe = FrontEnd.from_manifest(d)
    except ModelError as exc:
        assert any(repr(k) in str(exc) or k in str(exc) for k in list(d) + ["object"]), str(exc)
    else:
        assert FrontEnd.from_manifest(json.loads(json.dumps(fe.to_manifest()))) == fe
        assert fe.n_features() > 0 and fe.hop_length() > 0 and fe.fft_length() >= fe.window_length()


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([8000, 16000, 22050]), st.sampled_from([20.0, 25.0, 30.0, 32.0]),
       st.sampled_from([10.0, 12.5, 20.0, 40.0]), st.sampled_from([0, 13]),
       st.lists(st.integers(1, 4000), min_size=1, max_size=12))
def test_feature_stream_is_exact_for_any_front_end_and_split(rate: int, window_ms: float, hop_ms: float,
                                                           n_mfcc: int, sizes: list[int]) -> None:
    fe = FrontEnd(sample_rate=rate, window_ms=window_ms, hop_ms=hop_ms, n_mels=24, n_mfcc=n_mfcc,
                  fmax=min(7000.0, rate / 2))
    x = np.random.default_rng(sum(sizes)).normal(scale=0.1, size=sum(sizes)).astype(np.float32)
    stream, out, i = FeatureStream(fe), [], 0
    for n in sizes:
        out.append(stream.push(x[i:i + n]))
        i += n
    np.testing.assert_array_equal(np.concatenate(out), fe.features(x))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(22050, 16000), (16000, 44100), (48000, 16000), (8000, 11025)]),
       st.lists(st.integers(0, 3000), min_size=1, max_size=8))
def test_streaming_resampler_is_exact_for_any_split(rates: tuple[int, int], sizes: list[int]) -> None:
    x = np.random.default_rng(len(sizes)).normal(size=sum(sizes)).astype(np.float32)
    r, out, i = Resampler(*rates), [], 0
    for n in sizes:
        out.append(r.feed(x[i:i + n]))
        i += n
    out.append(r.finish())
    np.testing.assert_array_equal(np.concatenate(out), resample(x, *rates))
