"""wav://, microphone:// and serial:// sources: what they deliver, and the errors they give before serving."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from edge_slm.errors import ConfigError, InputError
from edge_slm.sources import build_source
from edge_slm.streams import AudioBlock, StreamEnd
from tests.conftest import IN_CI


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):  # noqa: ANN001, ANN201
    """Two real espeak-ng recordings (22,050 Hz) and a folder holding them plus a text file named .wav."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        if IN_CI:
            pytest.fail("espeak-ng is missing; `make test` installs it")
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("wavs")
    for name, text in (("a.wav", "turn on the light"), ("b.wav", "stop the motor now")):
        subprocess.run([espeak, "-w", str(folder / name), text], check=True, capture_output=True, timeout=60)
    (folder / "c.wav").write_text("these are notes, not audio\n")
    (folder / "readme.txt").write_text("ignored: not a .wav\n")
    return folder


def collect(source) -> list:  # noqa: ANN001
    got: list = []
    done = threading.Event()
    source.start(got.append, done.set)
    assert done.wait(30), "source never ended"
    return got


def test_wav_folder_is_resampled_in_blocks_with_stream_ends_and_bad_files_as_errors(spoken):
    from edge_slm.wav import read_wav

    src = build_source(f"wav://{spoken}?block_ms=50", "unused", sample_rate=16000)
    assert src.finite
    items = collect(src)
    by_file: dict[str, list] = {}
    for raw in items:
        by_file.setdefault(raw.origin.split(":", 1)[1], []).append(raw.data)
    assert sorted(by_file) == ["a.wav", "b.wav", "c.wav"]
    assert len(by_file["c.wav"]) == 1 and isinstance(by_file["c.wav"][0], InputError)
    assert by_file["c.wav"][0].code == "not_audio"
    for name in ("a.wav", "b.wav"):
        blocks = by_file[name]
        assert isinstance(blocks[-1], StreamEnd) and blocks[-1].stream == name
        audio = [b for b in blocks if isinstance(b, AudioBlock)]
        assert all(b.sample_rate == 16000 and b.stream == name for b in audio)
        assert all(len(b.samples) == 800 for b in audio[:-1])  # 50 ms at 16 kHz
        assert [b.t0 for b in audio] == pytest.approx([i * 0.05 for i in range(len(audio))])
        whole = np.concatenate([b.samples for b in audio])
        np.testing.assert_array_equal(whole, read_wav(spoken / name, target_rate=16000).samples)
        assert np.abs(whole).max() > 0.1  # speech, not silence


def test_wav_source_realtime_paces_blocks(spoken):
    import time

    src = build_source(f"wav://{spoken / 'a.wav'}?block_ms=100&realtime=1", "unused", sample_rate=16000)
    start = time.monotonic()
    items = collect(src)
    duration = sum(len(r.data.samples) for r in items if isinstance(r.data, AudioBlock)) / 16000
    # paced: the last block is not handed over before its own start time (a lower bound, never flaky)
    assert time.monotonic() - start >= duration - 0.1 - 1e-3


@pytest.mark.parametrize(("spec", "match"), [
    ("wav:///nonexistent/x.wav", "does not exist"),
    ("wav://{dir}/readme.txt", "not a WAV file"),
    ("wav://{dir}?block_ms=abc", "block_ms"),
    ("wav://{dir}?blocks=5", "unknown option 'blocks'"),
    ("wav://{dir}?realtime=maybe", "realtime"),
    ("wav://{dir}?block_ms=0", "positive"),
])
def test_wav_source_errors_name_the_problem(spoken, spec, match):
    with pytest.raises(ConfigError, match=match):
        build_source(spec.format(dir=spoken), "unused", sample_rate=16000)


def test_wav_folder_without_wavs_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no .wav files"):
        build_source(f"wav://{tmp_path}", "unused")


def test_microphone_without_sounddevice_says_how_to_install_it():
    # a device without the optional extra: sounddevice is made unimportable in a child interpreter,
    # so this runs the same whether or not this machine has it
    code = ("import sys; sys.modules['sounddevice'] = None\n"
            "from edge_slm.sources import build_source\n"
            "from edge_slm.errors import ConfigError\n"
            "try:\n    build_source('microphone://?rate=16000', 'unused', sample_rate=16000)\n"
            "except ConfigError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'edge-slm[audio]'" in out.stdout and "libportaudio2" in out.stdout


@pytest.mark.parametrize(("spec", "match"), [
    ("serial://", "names no port"),
    ("serial:///dev/ttyUSB0?speed=9600", "unknown option"),
    ("serial://socket://127.0.0.1:9?baud=9600", "baud only applies"),
    ("serial:///dev/ttyUSB0?hello_timeout_s=soon", "hello_timeout_s"),
])
def test_serial_source_errors_name_the_option(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_source(spec, "unused", kind="sensor")


def test_serial_spec_maps_to_the_bridge_url():
    from edge_slm.serial_source import split_spec

    assert split_spec("serial:///dev/ttyACM0?baud=921600") == ("serial:///dev/ttyACM0?baud=921600", 5.0, True)
    assert split_spec("serial://socket://10.0.0.5:7000?hello_timeout_s=2&start=0") == ("socket://10.0.0.5:7000", 2.0, False)
