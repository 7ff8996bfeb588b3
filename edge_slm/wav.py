"""Read and write WAV files: PCM 8/16/24/32-bit and IEEE float 32/64, plain or WAVE_FORMAT_EXTENSIBLE.

numpy and the standard library only; never imports TensorFlow, scipy, converters or devices. The RIFF
chunks are parsed here because the stdlib `wave` module rejects float WAVs (format 3) and extensible
headers. Anything that is not a readable WAV raises InputError("not_audio") saying what it found.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_slm.audio import Resampler, resample
from edge_slm.errors import InputError
from edge_slm.streams import AudioBlock

__all__ = ["WavInfo", "list_wavs", "read_wav", "read_wav_frames", "wav_info", "write_wav"]

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_ACCEPTED = "WAV (RIFF/WAVE) with PCM 8/16/24/32-bit or float32/float64 samples"
_UNKNOWN_SIZE = 0xFFFFFFFF  # streaming writers (sox/arecord to a pipe) leave the size unset
_MAX_CHANNELS = 64
_MAX_RATE = 1_000_000  # a header beyond this is damaged (and would make resampling enormous)

# what a file that is not a WAV starts with -> what it is
_MAGIC: list[tuple[int, bytes, str]] = [
    (0, b"ID3", "ID3, an MP3 file"),
    (0, b"\xff\xfb", "an MP3 frame header"),
    (0, b"\xff\xf3", "an MP3 frame header"),
    (0, b"\xff\xf2", "an MP3 frame header"),
    (0, b"\xff\xf1", "an AAC (ADTS) header"),
    (0, b"\xff\xf9", "an AAC (ADTS) header"),
    (0, b"fLaC", "fLaC, a FLAC file"),
    (0, b"OggS", "OggS, an Ogg (Vorbis/Opus) file"),
    (0, b"\x89PNG", "\\x89PNG, a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "GIF8, a GIF image"),
    (0, b"%PDF", "%PDF, a PDF document"),
    (0, b"PK\x03\x04", "PK, a ZIP archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"\x1aE\xdf\xa3", "a Matroska/WebM file"),
    (0, b"FORM", "FORM, an AIFF file"),
    (0, b"RF64", "RF64, a 64-bit WAV (not supported)"),
    (0, b"caff", "caff, a Core Audio file"),
    (0, b".snd", ".snd, a Sun/NeXT audio file"),
    (4, b"ftyp", "ftyp, an MP4/M4A file"),
]


@dataclass(frozen=True)
class WavInfo:
    """What the header says. data_offset/data_size locate the sample bytes in the file."""

    sample_rate: int
    channels: int
    bits: int  # container bits per sample
    is_float: bool
    data_offset: int
    data_size: int  # bytes, whole frames only

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.bits // 8

    @property
    def n_frames(self) -> int:
        return self.data_size // self.frame_bytes

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.sample_rate


def _convert_hint(name: str) -> str:
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"convert it: sox {name} -r 16000 -c 1 {stem or 'out'}.wav"


def _not_audio(name: str, what: str) -> InputError:
    return InputError("not_audio", f"{name} is not a WAV file ({what}); edge-slm reads {_ACCEPTED}; "
                                   f"{_convert_hint(name)}")


def _describe_start(head: bytes) -> str:
    if not head:
        return "it is empty"
    for offset, magic, what in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return f"starts with {what}"
    if head[:4] == b"RIFF" and len(head) >= 12:
        return f"a RIFF {head[8:12].decode('latin-1')!r} file, not RIFF WAVE"
    sample = head[:64]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it looks like text: {text[:24]!r}"
    return f"starts with bytes {head[:8].hex(' ')}"


def _parse_header(f: BinaryIO, name: str, total: int) -> WavInfo:
    """Walk the RIFF chunks up to 'data'; f is positioned anywhere, total is the file size."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise _not_audio(name, _describe_start(head + f.read(52)))
    fmt: tuple[int, int, int, int, int] | None = None
    pos = 12
    while True:
        f.seek(pos)
        hdr = f.read(8)
        if len(hdr) < 8:
            missing = "'fmt ' chunk" if fmt is None else "'data' chunk"
            raise InputError("not_audio", f"{name} is a truncated WAV: no {missing} before the end of the "
                                          f"file ({total} bytes); re-record or re-export it")
        cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16:
                raise InputError("not_audio", f"{name}: the WAV 'fmt ' chunk is {size} bytes, too short "
                                              "(needs 16); the file is damaged")
            if body + 16 > total:
                raise InputError("not_audio", f"{name} is a truncated WAV: it ends inside the 'fmt ' "
                                              f"chunk ({total} bytes); re-record or re-export it")
            raw = f.read(min(size, 40))
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", raw[:16])
            if tag == _EXTENSIBLE:
                if len(raw) < 40:
                    raise InputError("not_audio", f"{name}: WAVE_FORMAT_EXTENSIBLE header is cut short "
                                                  f"({len(raw)} of 40 bytes); the file is damaged")
                tag = struct.unpack("<H", raw[24:26])[0]  # first two bytes of the SubFormat GUID
            fmt = (tag, channels, rate, bits, size)
        elif cid == b"data":
            if fmt is None:
                raise InputError("not_audio", f"{name}: the WAV 'data' chunk comes before 'fmt '; "
                                              "the file is damaged")
            available = total - body
            if size == _UNKNOWN_SIZE or (size == 0 and available > 0):
                size = available
            elif size > available:
                raise InputError("not_audio", f"{name} is a truncated WAV: the data chunk declares {size} "
                                              f"bytes but only {available} are there; re-record or "
                                              "re-export it")
            return _check_format(name, fmt, body, size)
        pos = body + size + (size & 1)  # chunks are padded to an even size
        if pos > total:
            raise InputError("not_audio", f"{name} is a truncated WAV: chunk {cid!r} runs past the end "
                                          "of the file, and no 'data' chunk was found")


def _check_format(name: str, fmt: tuple[int, int, int, int, int], offset: int, size: int) -> WavInfo:
    tag, channels, rate, bits, _ = fmt
    if tag == _PCM and bits in (8, 16, 24, 32):
        is_float = False
    elif tag == _FLOAT and bits in (32, 64):
        is_float = True
    else:
        kinds = {1: "PCM", 3: "float", 2: "ADPCM", 6: "A-law", 7: "mu-law", 0x11: "IMA ADPCM",
                 0x55: "MP3"}
        what = f"{kinds.get(tag, f'format 0x{tag:04x}')} with {bits}-bit samples"
        raise InputError("not_audio", f"{name} is a WAV of {what}; edge-slm reads {_ACCEPTED}; "
                                      f"convert it: sox {name} -b 16 -e signed {name.rsplit('.', 1)[0]}-pcm16.wav")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise InputError("not_audio", f"{name}: the WAV header says {channels} channels; the file is damaged")
    if not 1 <= rate <= _MAX_RATE:
        raise InputError("not_audio", f"{name}: the WAV header says sample rate {rate} Hz (accepted: 1 to "
                                      f"{_MAX_RATE}); the file is damaged")
    frame_bytes = channels * bits // 8
    return WavInfo(rate, channels, bits, is_float, offset, size - size % frame_bytes)


def _decode(data: bytes, info: WavInfo, name: str) -> np.ndarray:
    """Interleaved sample bytes -> float32 mono (channels averaged)."""
    n = len(data) // info.frame_bytes
    data = data[: n * info.frame_bytes]
    if info.is_float:
        x = np.frombuffer(data, dtype="<f4" if info.bits == 32 else "<f8").astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise InputError("bad_audio", f"{name} holds NaN or infinite float samples; re-export it")
    elif info.bits == 8:
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif info.bits == 16:
        x = np.frombuffer(data, dtype="<i2") / 32768.0
    elif info.bits == 24:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v / float(1 << 23)
    else:
        x = np.frombuffer(data, dtype="<i4") / 2147483648.0
    x = x.reshape(n, info.channels)
    mono = x[:, 0] if info.channels == 1 else x.mean(axis=1)
    return mono.astype(np.float32)


def _open(source: str | Path | bytes | bytearray | memoryview) -> tuple[BinaryIO, str, int]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return io.BytesIO(data), "the audio payload", len(data)
    path = Path(source)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
        size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise InputError("not_found", f"{path} does not exist") from exc
    except IsADirectoryError as exc:
        raise InputError("not_audio", f"{path} is a folder, not a WAV file; use list_wavs() for a folder") from exc
    except OSError as exc:
        raise InputError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    return f, path.name, size


def wav_info(source: str | Path | bytes) -> WavInfo:
    """Parse only the header; InputError("not_audio") when it is not a readable WAV."""
    f, name, total = _open(source)
    with f:
        return _parse_header(f, name, total)


def read_wav(source: str | Path | bytes, *, target_rate: int | None = None) -> AudioBlock:
    """A WAV file (path or bytes) -> mono float32 AudioBlock (channels averaged), resampled to target_rate.

    Raises InputError: "not_audio" (not a WAV, truncated, unsupported encoding), "empty_input" (no
    samples), "bad_audio" (NaN in a float WAV), "not_found" / "unreadable" (a path that cannot be read).
    """
    f, name, total = _open(source)
    with f:
        info = _parse_header(f, name, total)
        f.seek(info.data_offset)
        data = f.read(info.data_size)
    if info.n_frames == 0:
        raise InputError("empty_input", f"{name} holds no audio samples")
    samples = _decode(data, info, name)
    rate = info.sample_rate
    if target_rate is not None and int(target_rate) != rate:
        samples = resample(samples, rate, int(target_rate))
        rate = int(target_rate)
    stream = name if not isinstance(source, (bytes, bytearray, memoryview)) else ""
    return AudioBlock(samples, rate, t0=0.0, stream=stream)


def read_wav_frames(path: str | Path, *, block_ms: float, target_rate: int | None = None) -> Iterator[AudioBlock]:
    """Stream a long WAV in blocks of block_ms (at the output rate; the last one may be shorter), t0 set.

    Reads the file piece by piece; with target_rate, a streaming resampler makes the same samples as
    read_wav(path, target_rate=...). The blocks concatenate to exactly what read_wav returns.
    """
    if not block_ms > 0:
        raise ValueError(f"block_ms must be positive, got {block_ms}")
    f, name, total = _open(path)
    with f:
        info = _parse_header(f, name, total)
        rate = info.sample_rate if target_rate is None else int(target_rate)
        step = max(1, int(round(rate * block_ms / 1000.0)))
        resampler = Resampler(info.sample_rate, rate) if rate != info.sample_rate else None
        read_frames = max(step * info.sample_rate // rate, 1024)
        f.seek(info.data_offset)
        left = info.data_size
        pending = np.zeros(0, dtype=np.float32)
        emitted = 0
        while True:
            chunk = f.read(min(left, read_frames * info.frame_bytes)) if left > 0 else b""
            left -= len(chunk)
            done = not chunk
            x = _decode(chunk, info, name) if chunk else np.zeros(0, dtype=np.float32)
            if resampler is not None:
                x = resampler.finish() if done else resampler.feed(x)
            if x.size:
                pending = np.concatenate([pending, x]) if pending.size else x
            while pending.size >= step or (done and pending.size):
                out, pending = pending[:step], pending[step:]
                yield AudioBlock(out.copy(), rate, t0=emitted / rate, stream=name)
                emitted += out.size
            if done:
                return


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono (samples [n]) or interleaved multi-channel (samples [n, channels]) PCM16 WAV.

    Float samples are taken as [-1, 1] and clipped; int16 samples are written as they are.
    """
    a = np.asarray(samples)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or not 1 <= a.shape[1] <= _MAX_CHANNELS:
        raise ValueError(f"samples must be [n] or [n, channels], got shape {np.asarray(samples).shape}")
    if a.dtype == np.int16:
        pcm = a
    else:
        from edge_slm.audio import to_float

        pcm = np.round(np.clip(to_float(a).astype(np.float64), -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
    data = pcm.astype("<i2").tobytes()
    channels = a.shape[1]
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, _PCM, channels, int(sample_rate),
                                    int(sample_rate) * 2 * channels, 2 * channels, 16)
    header += b"data" + struct.pack("<I", len(data))
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(header + data + (b"\0" if len(data) & 1 else b""))
    os.replace(tmp, path)


def list_wavs(folder: str | Path) -> list[Path]:
    """The .wav files (any case) directly in folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".wav")
