"""Keyword dataset (espeak-ng, split by voice) and the trained full-int8 keyword package."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from converters.datasets import keywords as kw
from tests.fixtures_voice import KWS_DATASET_OPTIONS

ROOT = Path(__file__).resolve().parents[2]


# --- dataset ----------------------------------------------------------------------------------
def test_heldout_voices_never_occur_in_training(kws_dataset) -> None:  # noqa: ANN001
    train, test = kws_dataset.train.voices, kws_dataset.test.voices
    assert train and test
    assert not train & test
    # Stronger: a held-out voice's variant (its timbre) is never heard in training with any accent.
    assert not {v.split("+")[1] for v in train} & {v.split("+")[1] for v in test}
    assert len(test) >= 20  # many voices, not one


def test_every_class_in_both_splits(kws_dataset) -> None:  # noqa: ANN001
    labels = kws_dataset.labels
    assert len(kws_dataset.commands) >= 10
    assert labels[-2:] == ["_unknown_", "_silence_"]
    for split in (kws_dataset.train, kws_dataset.test):
        counts = np.bincount(split.y, minlength=len(labels))
        assert counts.min() > 0, dict(zip(labels, counts))
        assert split.audio.shape == (len(split.y), 16000) and split.audio.dtype == np.float32
        assert np.all(np.abs(split.audio) <= 1.0)
        for m, y in zip(split.meta, split.y):
            assert m["label"] == labels[y]
            if y < len(kws_dataset.commands):
                assert m["text"] == labels[y]
    # Unknown clips use many words, including ones close to a command.
    unknown = Counter(m["text"] for m in kws_dataset.train.meta if m["label"] == "_unknown_")
    assert len(unknown) >= 20 and {"yet", "lift", "town"} <= set(unknown)


def test_snrs_noises_and_offsets_as_requested(kws_dataset) -> None:  # noqa: ANN001
    for split in (kws_dataset.train, kws_dataset.test):
        speech = [m for m in split.meta if m["voice"]]
        silence = [m for m in split.meta if not m["voice"]]
        assert {m["snr_db"] for m in speech} == set(KWS_DATASET_OPTIONS["snrs_db"])
        assert {m["noise"] for m in split.meta} == set(kw.NOISES)
        assert all(m["snr_db"] is None and m["label"] == "_silence_" for m in silence)
        for m in speech:
            assert 0.0 <= m["offset_s"] and m["offset_s"] + m["duration_s"] <= 1.0 + 1e-9
            assert m["duration_s"] > 0.1
        offsets = [m["offset_s"] for m in speech]
        assert np.std(offsets) > 0.05  # random placement, not one position


def test_mixing_hits_the_requested_snr(kws_speech_cache) -> None:  # noqa: ANN001
    u = kw.Utterance("left", "en-gb+m3", 160, 50)
    speech = kw.synthesize([u], kws_speech_cache, workers=1)[u]
    for kind in kw.NOISES:
        for snr in (20.0, 5.0):
            clip, info = kw.mix_clip(speech, kind, snr, 0.5, 16000, np.random.default_rng(3), 16000)
            unit_noise = kw.make_noise(kind, 16000, np.random.default_rng(3), 16000)  # same draws as inside
            placed = np.zeros(16000)
            start = round(info["offset_s"] * 16000)
            placed[start:start + len(speech)] = speech
            # clip = a * (placed + b * unit_noise): solve for a and a*b
            coef, *_ = np.linalg.lstsq(np.stack([placed, unit_noise], axis=1), clip.astype(np.float64), rcond=None)
            a, ab = coef
            measured = 20 * np.log10(np.sqrt(np.mean(speech.astype(np.float64) ** 2)) / (ab / a))
            assert measured == pytest.approx(snr, abs=0.05), (kind, snr, measured)
            assert np.max(np.abs(clip)) == pytest.approx(0.5, rel=1e-4)


def test_noise_colours_have_their_spectral_slopes() -> None:
    rng = np.random.default_rng(0)
    n = 1 << 16
    f = np.fft.rfftfreq(n, 1 / 16000)
    band = (f > 50) & (f < 4000)
    slopes = {}
    for kind in ("white", "pink", "brown"):
        psd = np.abs(np.fft.rfft(kw.make_noise(kind, n, rng))) ** 2
        slopes[kind] = np.polyfit(np.log10(f[band]), np.log10(psd[band]), 1)[0]
    assert slopes["white"] == pytest.approx(0.0, abs=0.1)
    assert slopes["pink"] == pytest.approx(-1.0, abs=0.1)
    assert slopes["brown"] == pytest.approx(-2.0, abs=0.1)
    hum = kw.make_noise("hum", n, rng)
    psd = np.abs(np.fft.rfft(hum)) ** 2
    mains = [psd[np.argmin(np.abs(f - hz))] for hz in (50, 60)]
    assert max(mains) > 30 * np.median(psd[band])  # a mains line stands out of the fan noise


def test_dataset_is_deterministic_and_cached(kws_speech_cache) -> None:  # noqa: ANN001
    opts = dict(train_per_command=2, test_per_command=1, seed=5, workers=2)
    a = kw.make_keyword_dataset(kws_speech_cache, **opts)
    files = sorted(p.name for p in kws_speech_cache.iterdir())
    b = kw.make_keyword_dataset(kws_speech_cache, **opts)
    assert sorted(p.name for p in kws_speech_cache.iterdir()) == files  # nothing spoken twice
    np.testing.assert_array_equal(a.train.audio, b.train.audio)
    assert a.test.meta == b.test.meta
    c = kw.make_keyword_dataset(kws_speech_cache, **{**opts, "seed": 6})
    assert not np.array_equal(a.train.audio, c.train.audio)


def test_recording_places_commands_at_known_times(kws_package) -> None:  # noqa: ANN001
    from edge_slm.wav import read_wav

    block = read_wav(kws_package.recording)
    assert block.sample_rate == 16000 and len(block.samples) == 60 * 16000
    cmds = kws_package.commands
    assert {e.label for e in cmds} == set(kws_package.dataset.commands)
    assert all(e.voice.split("+")[1] in kw.HELDOUT_VARIANTS for e in kws_package.events)
    starts = [e.t_start for e in kws_package.events]
    assert starts == sorted(starts)
    for e, nxt in zip(kws_package.events, kws_package.events[1:]):
        assert nxt.t_start - e.t_end >= 1.2 - 1e-6
    # the words are where the events say: louder there than in the gaps
    x = block.samples.astype(np.float64)
    inside = np.concatenate([x[int(e.t_start * 16000):int(e.t_end * 16000)] for e in kws_package.events])
    gaps = np.concatenate([x[int(e.t_end * 16000) + 1600:int(n.t_start * 16000) - 1600]
                           for e, n in zip(kws_package.events, kws_package.events[1:])])
    assert np.sqrt(np.mean(inside ** 2)) > 3 * np.sqrt(np.mean(gaps ** 2))


# --- package ----------------------------------------------------------------------------------
def test_manifest_reports_heldout_accuracy_and_agreement(kws_package) -> None:  # noqa: ANN001
    from edge_slm.audio import FrontEnd
    from edge_slm.package import ModelPackage

    pkg = ModelPackage.open(kws_package.package)
    assert pkg.task == "keyword-spotting"
    assert pkg.labels == kws_package.labels
    v = pkg.manifest["validation"]
    held = v["heldout_voice_accuracy"]
    assert held["n"] == len(kws_package.dataset.test)
    assert set(held["voices"]) == kws_package.dataset.test.voices
    assert held["float"] >= 0.90, held
    assert held["int8"] >= 0.90, held
    assert held["int8_float_agreement"] >= 0.99, held
    # convert_model's own numbers on the same held-out eval set
    assert v["quantized"]["top1_agreement"] >= 0.99
    assert v["quantized"]["accuracy_quantized"] >= 0.90
    prep = pkg.preprocessing
    assert FrontEnd.from_manifest(prep["audio"]) == FrontEnd()
    assert prep["clip_s"] == 1.0
    assert set(prep["streaming"]) == {"stride_ms", "smoothing_ms", "threshold", "refractory_ms"}


def test_heldout_accuracy_recomputed_through_the_device_runtime(kws_package) -> None:  # noqa: ANN001
    from edge_slm import runtime
    from edge_slm.kws import KeywordSpotter
    from edge_slm.package import ModelPackage

    pkg = ModelPackage.open(kws_package.package)
    test = kws_package.dataset.test
    int8 = KeywordSpotter(pkg, runtime.load(pkg.model_path)).posteriors_batch(test.audio, 16000)
    flt = KeywordSpotter(pkg, runtime.load(kws_package.float_model)).posteriors_batch(test.audio, 16000)
    acc_int8 = float(np.mean(int8.argmax(1) == test.y))
    acc_float = float(np.mean(flt.argmax(1) == test.y))
    agreement = float(np.mean(int8.argmax(1) == flt.argmax(1)))
    assert acc_int8 >= 0.90 and acc_float >= 0.90 and agreement >= 0.99, (acc_int8, acc_float, agreement)
    held = pkg.manifest["validation"]["heldout_voice_accuracy"]
    assert acc_int8 == pytest.approx(held["int8"], abs=1e-6)
    assert agreement == pytest.approx(held["int8_float_agreement"], abs=1e-6)
    # every class is recognised, not just the frequent ones
    per_class = [np.mean(int8.argmax(1)[test.y == c] == c) for c in range(len(pkg.labels))]
    assert min(per_class) >= 0.6, dict(zip(pkg.labels, np.round(per_class, 2)))


def test_package_is_full_int8(kws_package) -> None:  # noqa: ANN001
    from ai_edge_litert.interpreter import Interpreter

    from converters.tflite_info import describe
    from edge_slm.package import ModelPackage

    pkg = ModelPackage.open(kws_package.package)
    model_bytes = pkg.model_path.read_bytes()
    assert pkg.manifest["quantization"]["recipe"] == "int8"
    assert describe(model_bytes)["float_ops"] == []
    assert pkg.manifest["quantization"]["float_ops"] == []
    assert [t["dtype"] for t in pkg.manifest["inputs"] + pkg.manifest["outputs"]] == ["int8", "int8"]
    interp = Interpreter(model_content=model_bytes)
    interp.allocate_tensors()
    kinds = Counter(np.dtype(t["dtype"]).name for t in interp.get_tensor_details())
    assert set(kinds) <= {"int8", "int32"}, kinds  # int32 only for biases and shapes
    ops = set(describe(model_bytes)["ops"])
    assert "CONV_2D" in ops and "DEQUANTIZE" not in ops
    assert len(model_bytes) < 200_000


def test_train_kws_cli_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "converters.kws", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--out", "--words", "--snr", "--epochs", "--quantize"):
        assert flag in proc.stdout
