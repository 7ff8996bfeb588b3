"""edge_slm.wav on files written by sox and espeak-ng, on files that are not WAVs, and on arbitrary bytes."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_slm.audio import resample
from edge_slm.errors import InputError
from edge_slm.wav import list_wavs, read_wav, read_wav_frames, wav_info, write_wav


def sox(*args: str | Path) -> None:
    subprocess.run(["sox", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="session")
def wavs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """espeak-ng speech (22,050 Hz mono PCM16) and sox's conversions of it to every format we read."""
    d = tmp_path_factory.mktemp("wavs")
    src = d / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(src), "turn on the kitchen lights"], check=True)
    for bits in (16, 24, 32):
        sox(src, "-b", bits, "-e", "signed", d / f"s{bits}.wav")
    sox(src, "-b", 8, "-e", "unsigned", d / "u8.wav")
    sox(src, "-b", 32, "-e", "float", d / "f32.wav")
    sox(src, "-b", 64, "-e", "float", d / "f64.wav")
    sox(src, "-c", 2, d / "stereo.wav")  # both channels the speech
    sox(src, d / "left_only.wav", "remix", "1", "0")  # right channel silent
    sox(src, "-b", 24, "-c", 2, "-r", 44100, d / "s24_stereo_44k.wav")
    sox(src, "-r", 44100, d / "r44k.wav")
    sox(src, "-r", 16000, d / "sox16k.wav")
    for ext in ("flac", "ogg", "aiff", "au", "w64"):
        sox(src, d / f"speech.{ext}")
    return d


@pytest.fixture(scope="session")
def speech(wavs: Path) -> np.ndarray:
    return read_wav(wavs / "speech.wav").samples


def _fmt_tag(path: Path) -> int:
    return struct.unpack("<H", path.read_bytes()[20:22])[0]


@pytest.mark.parametrize("name,atol", [
    ("s16.wav", 0.0), ("s24.wav", 0.0), ("s32.wav", 0.0), ("f32.wav", 0.0), ("f64.wav", 0.0),
    ("u8.wav", 0.02),  # 8 bits: sox rounds (and dithers) to 1/128 steps
    ("stereo.wav", 0.0),
])
def test_every_sox_format_reads_back_the_same_signal(wavs: Path, speech: np.ndarray, name: str,
                                                     atol: float) -> None:
    block = read_wav(wavs / name)
    assert block.sample_rate == 22050 and block.samples.dtype == np.float32
    assert block.samples.shape == speech.shape
    np.testing.assert_allclose(block.samples, speech, atol=atol, rtol=0)
    assert block.t0 == 0.0 and block.stream == name
    if atol:
        assert np.corrcoef(block.samples, speech)[0, 1] > 0.995


def test_sox_files_cover_plain_float_and_extensible_headers(wavs: Path) -> None:
    assert _fmt_tag(wavs / "f32.wav") == 3
    assert _fmt_tag(wavs / "s16.wav") == 1
    assert _fmt_tag(wavs / "s24.wav") == 0xFFFE  # WAVE_FORMAT_EXTENSIBLE
    info = wav_info(wavs / "s24_stereo_44k.wav")
    assert (info.sample_rate, info.channels, info.bits, info.is_float) == (44100, 2, 24, False)


def test_stereo_is_mixed_down_to_mono(wavs: Path, speech: np.ndarray) -> None:
    np.testing.assert_allclose(read_wav(wavs / "left_only.wav").samples, speech / 2, atol=1 / 32768)


def test_target_rate_resamples(wavs: Path, speech: np.ndarray) -> None:
    b = read_wav(wavs / "s24_stereo_44k.wav", target_rate=16000)
    assert b.sample_rate == 16000 and b.samples.size == round(speech.size * 16000 / 22050)
    sox16 = read_wav(wavs / "sox16k.wav").samples
    assert np.corrcoef(b.samples, sox16)[0, 1] > 0.99
    same = read_wav(wavs / "r44k.wav")
    assert same.sample_rate == 44100
    np.testing.assert_array_equal(read_wav(wavs / "speech.wav", target_rate=22050).samples, speech)


def test_bytes_and_paths_read_the_same(wavs: Path) -> None:
    path = wavs / "f32.wav"
    a, b = read_wav(path), read_wav(path.read_bytes())
    np.testing.assert_array_equal(a.samples, b.samples)
    assert b.stream == "" and a.stream == "f32.wav"


@pytest.mark.parametrize("name,rate", [("speech.wav", None), ("s24_stereo_44k.wav", 16000), ("f64.wav", 16000)])
def test_read_wav_frames_concatenates_to_read_wav(wavs: Path, name: str, rate: int | None) -> None:
    whole = read_wav(wavs / name, target_rate=rate)
    blocks = list(read_wav_frames(wavs / name, block_ms=100.0, target_rate=rate))
    step = round(whole.sample_rate * 0.1)
    assert all(b.samples.size == step for b in blocks[:-1]) and 0 < blocks[-1].samples.size <= step
    assert [b.t0 for b in blocks] == [i * step / whole.sample_rate for i in range(len(blocks))]
    assert all(b.sample_rate == whole.sample_rate and b.stream == name for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), whole.samples)


def test_write_wav_round_trip(tmp_path: Path, speech: np.ndarray) -> None:
    out = tmp_path / "w.wav"
    write_wav(out, speech, 22050)
    back = read_wav(out)
    assert back.sample_rate == 22050
    np.testing.assert_allclose(back.samples, speech, atol=1 / 32768)
    # sox agrees it is a valid PCM16 WAV
    info = subprocess.run(["soxi", str(out)], capture_output=True, text=True, check=True).stdout
    assert "16-bit" in info and "22050" in info
    stereo = np.stack([speech, -speech], axis=1)
    write_wav(out, stereo, 8000)
    assert wav_info(out).channels == 2
    np.testing.assert_allclose(read_wav(out).samples, 0.0, atol=1 / 32768)
    clipped = tmp_path / "clip.wav"
    write_wav(clipped, np.array([2.0, -2.0, 0.5], np.float32), 16000)
    np.testing.assert_allclose(read_wav(clipped).samples, [32767 / 32768, -1.0, 0.5])


def _riff(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"WAVE"
    for cid, data in chunks:
        body += cid + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _fmt(tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16) -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)


def test_odd_sized_chunks_are_skipped_with_their_padding() -> None:
    pcm = np.array([0, 1000, -1000, 32767, -32768], "<i2")
    data = _riff([(b"fmt ", _fmt()), (b"LIST", b"odd"), (b"junk", b"x"), (b"data", pcm.tobytes())])
    np.testing.assert_array_equal(read_wav(data).samples, pcm / 32768.0)
    # 8-bit mono with an odd number of samples: the data chunk itself is odd-sized
    u8 = bytes([128, 255, 0])
    np.testing.assert_allclose(read_wav(_riff([(b"fmt ", _fmt(bits=8)), (b"data", u8)])).samples,
                               [0.0, 127 / 128, -1.0])


def test_unknown_data_size_reads_to_the_end(wavs: Path, speech: np.ndarray) -> None:
    raw = bytearray((wavs / "s16.wav").read_bytes())
    at = raw.index(b"data")
    raw[at + 4:at + 8] = b"\xff\xff\xff\xff"  # what a writer to a pipe leaves
    np.testing.assert_array_equal(read_wav(bytes(raw)).samples, speech)


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0")) + chunk(b"IEND", b"")


def _mp3() -> bytes:
    """An ID3v2.4 tag and ten silent MPEG-1 Layer III frames (128 kbit/s, 44.1 kHz, 417 bytes each)."""
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 0])
    frame = b"\xff\xfb\x90\x64" + bytes(413)
    return tag + frame * 10


@pytest.mark.parametrize("name,content,found", [
    ("notes.txt", b"turn on the lights\nthis is text\n", "text"),
    ("image.png", _png(), "PNG"),
    ("song.mp3", _mp3(), "ID3"),
    ("bare.mp3", b"\xff\xfb\x90\x64" + bytes(413), "MP3"),
    ("empty.wav", b"", "empty"),
    ("random.wav", bytes(range(7, 200)), "bytes"),
])
def test_non_audio_files_are_not_audio(tmp_path: Path, name: str, content: bytes, found: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_wav(path)
    assert err.value.code == "not_audio"
    msg = str(err.value)
    assert name in msg and found in msg and "sox" in msg and "PCM" in msg


@pytest.mark.parametrize("ext,found", [("flac", "FLAC"), ("ogg", "Ogg"), ("aiff", "AIFF"), ("au", "Sun"),
                                       ("w64", "bytes")])
def test_other_audio_formats_written_by_sox_say_convert(wavs: Path, ext: str, found: str) -> None:
    with pytest.raises(InputError) as err:
        read_wav(wavs / f"speech.{ext}")
    assert err.value.code == "not_audio"
    assert found in str(err.value) and f"sox speech.{ext} -r 16000 -c 1 speech.wav" in str(err.value)


@pytest.mark.parametrize("cut", [4, 20, 30, 44, 1000])
def test_truncated_wav_is_not_audio(wavs: Path, cut: int) -> None:
    raw = (wavs / "s16.wav").read_bytes()[:cut]
    with pytest.raises(InputError) as err:
        read_wav(raw)
    assert err.value.code == "not_audio"
    assert ("truncated" in str(err.value)) or ("not a WAV" in str(err.value))


def test_unsupported_wav_encodings_say_what_they_are() -> None:
    alaw = _riff([(b"fmt ", _fmt(tag=6, bits=8)), (b"data", bytes(100))])
    with pytest.raises(InputError, match="A-law") as err:
        read_wav(alaw)
    assert err.value.code == "not_audio"
    with pytest.raises(InputError, match="12-bit"):
        read_wav(_riff([(b"fmt ", _fmt(bits=12)), (b"data", bytes(100))]))
    huge_rate = bytearray(_fmt())
    huge_rate[4:8] = struct.pack("<I", 4_000_000_000)  # would need a 10-million-tap resampling filter
    with pytest.raises(InputError, match="sample rate 4000000000 Hz"):
        read_wav(_riff([(b"fmt ", bytes(huge_rate)), (b"data", bytes(100))]), target_rate=16000)


def test_nan_in_a_float_wav_is_bad_audio() -> None:
    data = np.array([0.1, np.nan, 0.2], "<f4").tobytes()
    with pytest.raises(InputError) as err:
        read_wav(_riff([(b"fmt ", _fmt(tag=3, bits=32)), (b"data", data)]))
    assert err.value.code == "bad_audio"


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        read_wav(tmp_path / "nope.wav")
    assert err.value.code == "not_found"
    with pytest.raises(InputError) as err:
        read_wav(_riff([(b"fmt ", _fmt()), (b"data", b"")]))
    assert err.value.code == "empty_input"
    with pytest.raises(InputError) as err:
        read_wav(tmp_path)
    assert err.value.code == "not_audio"


def test_list_wavs_is_sorted_and_only_wavs(tmp_path: Path) -> None:
    for name in ("b.wav", "a.WAV", "c.txt", "d.wav"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.wav").mkdir()
    assert [p.name for p in list_wavs(tmp_path)] == ["a.WAV", "b.wav", "d.wav"]


def test_resampled_read_matches_resample(wavs: Path, speech: np.ndarray) -> None:
    np.testing.assert_array_equal(read_wav(wavs / "s16.wav", target_rate=16000).samples,
                                  resample(speech, 22050, 16000))


# ------------------------------------------------------------------------------------------- properties


def _check_only_input_errors(data: bytes) -> None:
    for rate in (None, 16000):
        try:
            block = read_wav(data, target_rate=rate)
        except InputError as exc:
            assert exc.code in {"not_audio", "bad_audio", "empty_input"}, exc.code
            assert str(exc)
        else:
            assert block.samples.dtype == np.float32 and block.samples.ndim == 1 and block.sample_rate > 0
            assert rate is None or block.sample_rate == rate


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_input_error(data: bytes) -> None:
    _check_only_input_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_chunks_after_a_riff_header_raise_only_input_error(tail: bytes) -> None:
    _check_only_input_errors(b"RIFF" + struct.pack("<I", len(tail) + 4) + b"WAVE" + tail)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(40, 2000))
def test_corrupted_real_headers_raise_only_input_error(wavs: Path, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray((wavs / "s24_stereo_44k.wav").read_bytes()[:cut])
    for pos, value in flips:
        if pos < len(raw):
            raw[pos] = value
    _check_only_input_errors(bytes(raw))


_ENCODINGS = {  # (format tag, bits, numpy dtype of the stored samples, scale to [-1, 1])
    "u8": (1, 8, np.uint8), "s16": (1, 16, np.dtype("<i2")), "s24": (1, 24, None), "s32": (1, 32, np.dtype("<i4")),
    "f32": (3, 32, np.dtype("<f4")), "f64": (3, 64, np.dtype("<f8")),
}


def _encode(x: np.ndarray, enc: str) -> tuple[bytes, np.ndarray]:
    """float samples [n, ch] in [-1, 1) -> (sample bytes, the float values those bytes stand for)."""
    tag, bits, dtype = _ENCODINGS[enc]
    if enc == "u8":
        q = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8)
        return q.tobytes(), (q.astype(np.float64) - 128) / 128
    if tag == 3:
        q = x.astype(dtype)
        return q.tobytes(), q.astype(np.float64)
    full = 2 ** (bits - 1)
    q = np.clip(np.round(x * full), -full, full - 1).astype(np.int64)
    if bits == 24:
        u = (q % (1 << 24)).astype(np.uint32).reshape(-1)
        data = np.stack([u & 0xFF, (u >> 8) & 0xFF, u >> 16], axis=1).astype(np.uint8).tobytes()
    else:
        data = q.astype(dtype).tobytes()
    return data, q / full


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(_ENCODINGS)), st.integers(1, 4), st.integers(1, 300),
       st.sampled_from([8000, 11025, 16000, 44100, 96000]), st.booleans(), st.integers(0, 2 ** 32 - 1))
def test_any_pcm_or_float_wav_decodes_to_its_samples(enc: str, channels: int, n: int, rate: int,
                                                     extensible: bool, seed: int) -> None:
    x = np.random.default_rng(seed).uniform(-1, 1, size=(n, channels))
    data, expected = _encode(x, enc)
    tag, bits, _ = _ENCODINGS[enc]
    fmt = _fmt(tag, channels, rate, bits)
    if extensible:  # cbSize, valid bits, channel mask, SubFormat GUID (the tag, then the fixed tail)
        fmt = _fmt(0xFFFE, channels, rate, bits) + struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + \
            b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    block = read_wav(_riff([(b"fmt ", fmt), (b"LIST", b"INFOx"), (b"data", data)]))
    assert block.sample_rate == rate and block.samples.dtype == np.float32
    np.testing.assert_allclose(block.samples, expected.mean(axis=1), rtol=1e-6, atol=1e-7)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(1.0, 700.0), st.sampled_from([None, 8000, 16000, 48000]))
def test_read_wav_frames_any_block_size(wavs: Path, block_ms: float, rate: int | None) -> None:
    whole = read_wav(wavs / "s24_stereo_44k.wav", target_rate=rate).samples
    blocks = list(read_wav_frames(wavs / "s24_stereo_44k.wav", block_ms=block_ms, target_rate=rate))
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), whole)
