"""Fixtures for the voice work (trained models, compiled programs); loaded from conftest.py via pytest_plugins.

kws_dataset: espeak-ng keyword clips (held-out voices in .test); kws_package: a trained, full-int8 keyword
package plus a 60 s held-out-voice recording with the true command times.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Small enough for ~30 s of espeak-ng + resampling on 2 cores, big enough for >= 90% on held-out voices.
KWS_DATASET_OPTIONS: dict[str, Any] = {"train_per_command": 300, "test_per_command": 30, "mixes_per_utterance": 2,
                                       "unknown_share": 0.5, "snrs_db": (20.0, 10.0, 5.0), "seed": 0}
KWS_EPOCHS = 24
RECORDING_S = 60.0


def _need_espeak() -> None:
    if shutil.which("espeak-ng") or os.access("/usr/bin/espeak-ng", os.X_OK):
        return
    if IN_CI:
        pytest.fail("espeak-ng is not installed; `make test` installs it with apt-get")
    pytest.skip("espeak-ng not installed (apt-get install espeak-ng); CI installs it")


@dataclass
class KwsPackage:
    """A trained keyword package and a long recording spoken by held-out voices."""

    package: Path
    labels: list[str]
    recording: Path  # 16 kHz mono WAV
    events: list[Any]  # converters.datasets.keywords.SpokenEvent: every word, commands and unknown ones
    dataset: Any  # the KeywordDataset it was trained on
    float_model: Path  # the float32 .tflite of the same model, for int8-vs-float checks
    heldout: dict[str, Any]

    @property
    def commands(self) -> list[Any]:
        return [e for e in self.events if e.label != "_unknown_"]

    @property
    def command_times(self) -> list[tuple[str, float, float]]:
        return [(e.label, e.t_start, e.t_end) for e in self.commands]


@pytest.fixture(scope="session")
def kws_speech_cache(tmp_path_factory) -> Path:  # noqa: ANN001
    _need_espeak()
    return tmp_path_factory.mktemp("kws_speech")


@pytest.fixture(scope="session")
def kws_dataset(kws_speech_cache):  # noqa: ANN001, ANN201 - KeywordDataset
    from converters.datasets.keywords import make_keyword_dataset

    return make_keyword_dataset(kws_speech_cache, **KWS_DATASET_OPTIONS)


@pytest.fixture(scope="session")
def kws_package(kws_dataset, kws_speech_cache, tmp_path_factory) -> KwsPackage:  # noqa: ANN001
    from converters.datasets.keywords import make_recording
    from converters.kws import build_keyword_package
    from edge_slm.wav import write_wav

    root = tmp_path_factory.mktemp("kws")
    result = build_keyword_package(root / "package", kws_dataset, work_dir=root / "work", epochs=KWS_EPOCHS)
    float_model = root / "work" / "float32.tflite"
    float_model.write_bytes(result.float_model_bytes)
    rec = make_recording(kws_speech_cache, duration_s=RECORDING_S, seed=7)
    wav = root / "recording_16k.wav"
    write_wav(wav, rec.samples, rec.sample_rate)
    return KwsPackage(result.package, result.labels, wav, rec.events, kws_dataset, float_model, result.heldout)


def score_detections(detections: list[dict[str, Any]], events: list[Any], *, late_s: float = 1.0,
                     early_s: float = 0.0) -> dict[str, Any]:
    """Match detections to spoken commands: a detection of keyword w at time t matches an unmatched command
    w spoken over [t_start, t_end] when t_start - early_s <= t <= t_end + late_s. Returns recall, precision,
    the matched pairs, the missed commands and the false alarms."""
    commands = [e for e in events if e.label != "_unknown_"]
    used: set[int] = set()
    matched, false_alarms = [], []
    for d in sorted(detections, key=lambda d: d["t"]):
        hit = next((i for i, e in enumerate(commands) if i not in used and e.label == d["keyword"]
                    and e.t_start - early_s <= d["t"] <= e.t_end + late_s), None)
        if hit is None:
            false_alarms.append(d)
        else:
            used.add(hit)
            matched.append((commands[hit], d))
    missed = [e for i, e in enumerate(commands) if i not in used]
    return {"recall": len(matched) / max(len(commands), 1), "precision": len(matched) / max(len(detections), 1),
            "matched": matched, "missed": missed, "false_alarms": false_alarms}
