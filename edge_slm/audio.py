"""The one audio front end (framing, log-mel, MFCC, resampling) used by training (converters) and the device.

numpy and the standard library only; never imports TensorFlow, scipy, librosa, converters or devices.

Written by hand on purpose: the device install is numpy + the TFLite runtime, so scipy.signal and
librosa are not there, and the converters must compute exactly the numbers the device computes. The
filterbank, STFT and MFCC follow tf.signal (linear_to_mel_weight_matrix, stft with a periodic Hann
window, mfccs_from_log_mel_spectrograms) so a model trained on TF features sees the same inputs here;
tests/edge_slm/test_audio.py checks that against TensorFlow.

Framing: frame i covers samples [i * hop, i * hop + window); only whole frames are produced (no padding),
so n_frames = 1 + (n - window) // hop (0 when n < window). Every frame is a pure function of its own
window of samples (pre-emphasis is applied inside each frame, Kaldi style), and the mel and DCT products
are computed row by row (not by BLAS, whose rounding depends on the batch size). Hence a long recording
cut into pieces that start at multiples of hop (each reaching window - hop samples into the next piece)
gives bit for bit the frames of the whole clip, and features_batch() gives bit for bit what features()
gives. A streaming consumer (the keyword spotter) must buffer like FeatureStream does: append the new
block, compute the frames of the buffer, then drop n_frames * hop samples from its front and keep the
rest (always fewer than window + hop samples) for the next block. Frame i of a stream then starts at
sample i * hop, i.e. at time i * hop_ms.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any

import numpy as np

from edge_slm.errors import ConfigError, InputError, ModelError

__all__ = [
    "FeatureStream",
    "FrontEnd",
    "Resampler",
    "frame",
    "hann_window",
    "hz_to_mel",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "mfcc",
    "power_spectrum",
    "pre_emphasis",
    "resample",
    "to_float",
]

MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------------------------- samples


def to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 / int32 / int8 / uint8 (unsigned, 128 = silence) / float samples -> float32 in [-1, 1].

    Integers are scaled by their full range (int16: / 32768). Floats are taken as already in [-1, 1]
    and only cast.
    """
    a = np.asarray(pcm)
    if a.dtype == np.uint8:
        return ((a.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if a.dtype.kind == "i":
        scale = float(2 ** (8 * a.dtype.itemsize - 1))
        return (a.astype(np.float64) / scale).astype(np.float32)
    if a.dtype.kind == "u":
        half = float(2 ** (8 * a.dtype.itemsize - 1))
        return ((a.astype(np.float64) - half) / half).astype(np.float32)
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    raise InputError("bad_audio", f"audio samples must be integer or float, got dtype {a.dtype}")


def pre_emphasis(x: np.ndarray, coef: float) -> np.ndarray:
    """y[n] = x[n] - coef * x[n-1] along the last axis, with x[-1] taken as x[0] (Kaldi's per-frame rule).

    Applied to each frame on its own, so a frame does not depend on the sample before it.
    """
    x = np.asarray(x, dtype=np.float32)
    if not coef:
        return x
    y = np.empty_like(x)
    y[..., 1:] = x[..., 1:] - np.float32(coef) * x[..., :-1]
    y[..., :1] = x[..., :1] * np.float32(1.0 - coef)
    return y


def frame(x: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """[..., n] -> [..., n_frames, frame_length] (a read-only view); whole frames only, starting at 0."""
    x = np.asarray(x)
    if frame_length <= 0 or hop_length <= 0:
        raise ValueError(f"frame_length and hop_length must be positive, got {frame_length}, {hop_length}")
    n = x.shape[-1]
    count = 0 if n < frame_length else 1 + (n - frame_length) // hop_length
    if count == 0:
        return np.zeros(x.shape[:-1] + (0, frame_length), dtype=x.dtype)
    view = np.lib.stride_tricks.sliding_window_view(x, frame_length, axis=-1)
    return view[..., : (count - 1) * hop_length + 1 : hop_length, :]


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (tf.signal.hann_window(n, periodic=True)), float32 [n]."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def power_spectrum(frames: np.ndarray, n_fft: int, window: np.ndarray | None = None) -> np.ndarray:
    """|rfft(frames * window, n_fft)|^2: [..., frame_length] -> float32 [..., n_fft // 2 + 1]."""
    frames = np.asarray(frames, dtype=np.float32)
    if window is not None:
        frames = frames * window
    spec = np.fft.rfft(frames, n=n_fft, axis=-1)
    return (spec.real * spec.real + spec.imag * spec.imag).astype(np.float32)


# ---------------------------------------------------------------------------------------------- mel


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 1127 * ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * np.expm1(np.asarray(mel, dtype=np.float64) / 1127.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular HTK-mel filters, float32 [n_fft // 2 + 1, n_mels]; same as tf.signal.linear_to_mel_weight_matrix.

    Triangles are drawn on the mel axis between n_mels + 2 equally spaced mel points from fmin to fmax;
    the DC bin gets no weight; filters are not area-normalised (peak 1).
    """
    nyquist = sample_rate / 2.0
    if not 0.0 <= fmin < fmax <= nyquist:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
                         f"sample_rate={sample_rate}")
    n_bins = n_fft // 2 + 1
    bins_mel = hz_to_mel(np.linspace(0.0, nyquist, n_bins)[1:])[:, None]
    edges = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    lower, center, upper = edges[:-2][None, :], edges[1:-1][None, :], edges[2:][None, :]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.concatenate([np.zeros((1, n_mels)), weights]).astype(np.float32)


def _row_dot(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """x @ matrix, computed column by column over each column's non-zero span.

    Unlike a BLAS matmul, whose rounding depends on how many rows it is given, every output row here is
    a function of its input row alone: a frame gets the same bits whether it comes alone (streaming) or
    inside a batch. Mel filters are narrow, so this is also cheaper than the dense product.
    """
    out = np.empty(x.shape[:-1] + (matrix.shape[1],), dtype=np.float32)
    for j in range(matrix.shape[1]):
        nz = np.flatnonzero(matrix[:, j])
        if nz.size == 0:
            out[..., j] = 0.0
            continue
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        out[..., j] = np.sum(x[..., lo:hi] * matrix[lo:hi, j], axis=-1, dtype=np.float32)
    return out


def log_mel(power: np.ndarray, mel_matrix: np.ndarray, log_floor: float) -> np.ndarray:
    """ln(power @ mel_matrix + log_floor): [..., n_bins] -> float32 [..., n_mels]."""
    mel = _row_dot(np.asarray(power, dtype=np.float32), np.asarray(mel_matrix, dtype=np.float32))
    return np.log(mel + np.float32(log_floor)).astype(np.float32)


def _dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    # tf.signal.mfccs_from_log_mel_spectrograms: unnormalised DCT-II scaled by 1 / sqrt(2 N), which is the
    # orthonormal DCT-II except that coefficient 0 is sqrt(2) larger.
    n = np.arange(n_in)[:, None]
    k = np.arange(n_out)[None, :]
    return (2.0 * np.cos(np.pi * k * (2 * n + 1) / (2.0 * n_in)) / math.sqrt(2.0 * n_in)).astype(np.float32)


def mfcc(log_mel_features: np.ndarray, n_mfcc: int) -> np.ndarray:
    """First n_mfcc cepstral coefficients of log-mel features, as tf.signal.mfccs_from_log_mel_spectrograms.

    [..., n_mels] -> float32 [..., n_mfcc]. That is DCT-II with orthonormal scaling for coefficients >= 1
    and sqrt(2 / n_mels) * sum for coefficient 0 (TF's convention, kept so TF-trained models transfer).
    """
    x = np.asarray(log_mel_features, dtype=np.float32)
    return _row_dot(x, _dct_matrix(x.shape[-1], n_mfcc))


# ---------------------------------------------------------------------------------------------- front end


@dataclass(frozen=True)
class FrontEnd:
    """Audio -> features float32 [n_frames, n_features]; the parameters go into the model manifest.

    Per frame: pre-emphasis (within the frame), periodic Hann window, rfft of n_fft points, power |X|^2,
    HTK mel filterbank (fmin..fmax, peak-1 triangles), ln(mel + log_floor); with n_mfcc > 0 the first
    n_mfcc coefficients of TF's MFCC DCT of that. Invalid parameters raise ConfigError naming the field.
    """

    sample_rate: int = 16000
    window_ms: float = 30.0
    hop_ms: float = 20.0
    n_fft: int = 0  # 0: next power of two >= window length
    n_mels: int = 40
    n_mfcc: int = 0  # 0: log-mel features; > 0: that many MFCCs
    preemphasis: float = 0.97  # 0 disables
    fmin: float = 20.0
    fmax: float = 0.0  # 0: sample_rate / 2
    log_floor: float = 1e-6

    def __post_init__(self) -> None:
        for key, problem in self._problems():
            raise ConfigError(f"audio front end: {key}: {problem}")
        for f in fields(self):  # numpy scalars -> plain int/float, so the manifest is JSON-ready
            v = getattr(self, f.name)
            object.__setattr__(self, f.name, int(v) if f.name in _INT_FIELDS else float(v))

    def _problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for f in fields(self):
            v = getattr(self, f.name)
            want_int = f.name in _INT_FIELDS
            ok = isinstance(v, numbers.Integral if want_int else numbers.Real) and not isinstance(v, bool)
            if not ok or not _finite(v):
                out.append((f.name, f"must be {'an integer' if want_int else 'a number'}, got {v!r}"))
        if out:
            return out
        for key, limit in _LIMITS.items():
            if getattr(self, key) > limit:
                out.append((key, f"must be at most {limit:g}, got {getattr(self, key)}"))
        if out:
            return out
        if self.sample_rate <= 0:
            out.append(("sample_rate", f"must be positive, got {self.sample_rate}"))
            return out
        if self.window_ms <= 0 or self.window_length() < 2:
            out.append(("window_ms", f"must cover at least 2 samples, got {self.window_ms} ms at "
                                     f"sample_rate {self.sample_rate}"))
        if self.hop_ms <= 0 or self.hop_length() < 1:
            out.append(("hop_ms", f"must cover at least 1 sample, got {self.hop_ms} ms at "
                                  f"sample_rate {self.sample_rate}"))
        if self.n_fft != 0 and (self.n_fft < 0 or (out == [] and self.n_fft < self.window_length())):
            out.append(("n_fft", f"must be 0 (auto) or >= the window length, got {self.n_fft}"))
        if self.n_mels <= 0:
            out.append(("n_mels", f"must be positive, got {self.n_mels}"))
        if not 0 <= self.n_mfcc <= max(self.n_mels, 0):
            out.append(("n_mfcc", f"must be 0 (log-mel) or 1..n_mels ({self.n_mels}), got {self.n_mfcc}"))
        if not 0.0 <= self.preemphasis < 1.0:
            out.append(("preemphasis", f"must be in [0, 1), got {self.preemphasis}"))
        nyquist = self.sample_rate / 2.0
        if self.fmax < 0 or self.fmax > nyquist:
            out.append(("fmax", f"must be 0 (sample_rate / 2) or in (fmin, {nyquist:g}] for sample_rate "
                                f"{self.sample_rate}, got {self.fmax}"))
        elif not 0.0 <= self.fmin < self.upper_hz():
            out.append(("fmin", f"must be >= 0 and below fmax ({self.upper_hz():g} Hz at sample_rate "
                                f"{self.sample_rate}), got {self.fmin}"))
        if not self.log_floor > 0:
            out.append(("log_floor", f"must be positive, got {self.log_floor}"))
        return out

    # -- sizes

    def n_features(self) -> int:
        return self.n_mfcc if self.n_mfcc > 0 else self.n_mels

    def window_length(self) -> int:
        """Samples per frame: round(sample_rate * window_ms / 1000)."""
        return int(round(self.sample_rate * self.window_ms / 1000.0))

    def hop_length(self) -> int:
        """Samples between frame starts: round(sample_rate * hop_ms / 1000)."""
        return int(round(self.sample_rate * self.hop_ms / 1000.0))

    def fft_length(self) -> int:
        if self.n_fft:
            return self.n_fft
        return 1 << max(0, (self.window_length() - 1).bit_length())

    def upper_hz(self) -> float:
        return float(self.fmax) if self.fmax else self.sample_rate / 2.0

    def n_frames(self, n_samples: int) -> int:
        w, h = self.window_length(), self.hop_length()
        return 0 if n_samples < w else 1 + (n_samples - w) // h

    def n_samples(self, n_frames: int) -> int:
        """Fewest samples that give n_frames frames."""
        return 0 if n_frames <= 0 else self.window_length() + (n_frames - 1) * self.hop_length()

    # -- features

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        cached = _TABLES.get(self)
        if cached is None:
            window = hann_window(self.window_length())
            mel = mel_filterbank(self.sample_rate, self.fft_length(), self.n_mels, float(self.fmin),
                                 self.upper_hz())
            dct = _dct_matrix(self.n_mels, self.n_mfcc) if self.n_mfcc else None
            cached = (window, mel, dct)
            if len(_TABLES) > 32:
                _TABLES.clear()
            _TABLES[self] = cached
        return cached

    def _features(self, samples: np.ndarray) -> np.ndarray:
        window, mel, dct = self._tables()
        frames = frame(samples, self.window_length(), self.hop_length())
        frames = pre_emphasis(frames, self.preemphasis)
        feats = log_mel(power_spectrum(frames, self.fft_length(), window), mel, self.log_floor)
        if dct is not None:
            feats = _row_dot(feats, dct)
        return np.ascontiguousarray(feats, dtype=np.float32)

    def features(self, samples: np.ndarray) -> np.ndarray:
        """float32 mono samples at self.sample_rate [n] -> float32 [n_frames(n), n_features()]."""
        x = np.asarray(samples)
        if x.ndim != 1:
            raise InputError("bad_audio", f"features() needs mono samples [n], got shape {x.shape}; "
                                          "mix channels down first (read_wav does)")
        return self._features(to_float(x))

    def features_batch(self, clips: np.ndarray) -> np.ndarray:
        """[batch, n] -> float32 [batch, n_frames(n), n_features()]; the same numbers as features() per row."""
        x = np.asarray(clips)
        if x.ndim != 2:
            raise InputError("bad_audio", f"features_batch() needs clips [batch, n], got shape {x.shape}")
        return self._features(to_float(x))

    # -- manifest

    def to_manifest(self) -> dict[str, Any]:
        """JSON-ready dict for manifest["preprocessing"]["audio"]; from_manifest() reads it back."""
        d: dict[str, Any] = {"schema_version": MANIFEST_VERSION,
                             "features": "mfcc" if self.n_mfcc else "log_mel"}
        d.update(asdict(self))
        return d

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> FrontEnd:
        """Inverse of to_manifest(); a missing key takes its default, a wrong or unknown key is a ModelError."""
        where = 'manifest preprocessing "audio"'
        if not isinstance(d, dict):
            raise ModelError(f"{where} must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"schema_version", "features"})
        if unknown:
            raise ModelError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}; "
                             "the package may be for a newer edge-slm: upgrade edge-slm")
        version = d.get("schema_version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise ModelError(f"{where}: schema_version {version!r} is not supported (this edge-slm reads "
                             f"{MANIFEST_VERSION}); upgrade edge-slm")
        kwargs = {k: v for k, v in d.items() if k in names}
        probe = object.__new__(cls)
        for f in fields(cls):
            object.__setattr__(probe, f.name, kwargs.get(f.name, f.default))
        problems = probe._problems()
        if problems:
            key, problem = problems[0]
            raise ModelError(f"{where}: {key!r} {problem}; re-convert the model or fix manifest.json")
        fe = cls(**kwargs)
        kind = d.get("features")
        if kind is not None and kind != ("mfcc" if fe.n_mfcc else "log_mel"):
            raise ModelError(f"{where}: 'features' is {kind!r} but n_mfcc={fe.n_mfcc}; the manifest is "
                             "inconsistent: re-convert the model")
        return fe


def _finite(v: numbers.Real) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int with hundreds of digits
        return False


_INT_FIELDS = frozenset({"sample_rate", "n_fft", "n_mels", "n_mfcc"})
# far beyond any real front end; a manifest past them is damaged and would allocate without bound
_LIMITS = {"sample_rate": 1_000_000, "window_ms": 10_000.0, "hop_ms": 10_000.0, "n_fft": 1 << 20,
           "n_mels": 1024, "n_mfcc": 1024}

_TABLES: dict[FrontEnd, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}


class FeatureStream:
    """Streaming features: push() blocks of any size, get exactly the frames the whole recording would give.

    Keeps the unconsumed tail (fewer than window + hop samples) between pushes. frames_done counts the
    frames returned so far; frame i starts at sample i * hop_length of the stream.
    """

    def __init__(self, front_end: FrontEnd) -> None:
        self.front_end = front_end
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)
        self._skip = 0  # samples still to drop before the next frame (when hop > window)
        self.frames_done = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        x = to_float(np.asarray(samples).reshape(-1))
        if self._skip:
            drop = min(self._skip, x.size)
            x, self._skip = x[drop:], self._skip - drop
        buf = np.concatenate([self._buf, x]) if self._buf.size else x
        count = self.front_end.n_frames(buf.size)
        if count == 0:
            self._buf = buf.copy()
            return np.zeros((0, self.front_end.n_features()), dtype=np.float32)
        feats = self.front_end.features(buf[: self.front_end.n_samples(count)])
        consumed = count * self.front_end.hop_length()
        self._skip = max(0, consumed - buf.size)
        self._buf = buf[consumed:].copy()
        self.frames_done += count
        return feats


# ---------------------------------------------------------------------------------------------- resampling

_ZEROS = 32  # zero crossings of the sinc on each side of the centre tap
_ROLLOFF = 0.92  # cutoff as a fraction of the lower Nyquist: the Kaiser transition band ends below Nyquist
_KAISER_BETA = 9.0  # about 90 dB of stopband
_MAX_TABLE = 1 << 20  # largest (phases x taps) kernel table; beyond it taps are computed per block


class Resampler:
    """Band-limited resampling by a rational factor (windowed-sinc polyphase, Kaiser window).

    Streaming: feed() blocks, then finish(); the concatenated output equals resample() of the whole
    signal, sample for sample, length round(n * to_rate / from_rate).
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if int(from_rate) != from_rate or int(to_rate) != to_rate or from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive integers, got {from_rate} -> {to_rate}")
        self.from_rate, self.to_rate = int(from_rate), int(to_rate)
        g = math.gcd(self.from_rate, self.to_rate)
        self.up, self.down = self.to_rate // g, self.from_rate // g
        # kernel in input-sample units: cutoff fc (fraction of the input Nyquist), support |t| < zeros / fc
        self.fc = _ROLLOFF * min(1.0, self.up / self.down)
        self.half = int(math.ceil(_ZEROS / self.fc))  # taps on each side of the centre
        self.taps = 2 * self.half
        self._table = self._kernel(np.arange(self.up)[:, None]) if self.up * self.taps <= _MAX_TABLE else None
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self.half, dtype=np.float64)  # zeros before the first sample
        self._base = -self.half  # absolute input index of _buf[0]
        self._n_in = 0
        self._k = 0  # next output index

    def _kernel(self, phases: np.ndarray) -> np.ndarray:
        # taps j = -half+1 .. half for output phase p: h(p / up - j)
        j = np.arange(-self.half + 1, self.half + 1)[None, :]
        t = phases / self.up - j
        w = np.clip(t / self.half, -1.0, 1.0)
        h = self.fc * np.sinc(self.fc * t) * np.i0(_KAISER_BETA * np.sqrt(1.0 - w * w)) / np.i0(_KAISER_BETA)
        return h / h.sum(axis=-1, keepdims=True)  # unity gain at DC for every phase

    def _produce(self, k_end: int) -> np.ndarray:
        out = []
        # the by-phase path copies nothing, so it takes big blocks; the gather path copies taps per output
        block = max(16384, 128 * self.up) if self._table is not None and self.up <= 1024 else 16384
        while self._k < k_end:
            k1 = min(k_end, self._k + block)
            if self._table is not None and k1 - self._k >= 4 * self.up:
                out.append(self._by_phase(self._k, k1))
            else:
                k = np.arange(self._k, k1, dtype=np.int64)
                n0 = (k * self.down) // self.up
                p = (k * self.down) % self.up
                h = self._table[p] if self._table is not None else self._kernel(p[:, None])
                idx = (n0 - self.half + 1 - self._base)[:, None] + np.arange(self.taps)[None, :]
                out.append(np.einsum("ij,ij->i", self._buf[idx], h))
            self._k = k1
        n0_next = (self._k * self.down) // self.up
        drop = n0_next - self.half + 1 - self._base
        if drop > 0:
            self._buf = self._buf[drop:]
            self._base += drop
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)

    def _by_phase(self, k0: int, k1: int) -> np.ndarray:
        # Outputs k, k + up, k + 2 up, ... share a phase and step through the input by `down`: a strided
        # view gives their taps without copying. Same einsum (same summation order per output) as the
        # gather path, so the numbers do not depend on which path a block took.
        y = np.empty(k1 - k0, dtype=np.float64)
        step = self._buf.strides[0]
        for r in range(min(self.up, k1 - k0)):
            k = k0 + r
            count = (k1 - k + self.up - 1) // self.up
            start = (k * self.down) // self.up - self.half + 1 - self._base
            view = np.lib.stride_tricks.as_strided(self._buf[start:], shape=(count, self.taps),
                                                   strides=(self.down * step, step), writeable=False)
            h = np.broadcast_to(self._table[(k * self.down) % self.up], (count, self.taps))
            y[r::self.up] = np.einsum("ij,ij->i", view, h)
        return y

    def feed(self, x: np.ndarray) -> np.ndarray:
        """More input samples -> the output samples that are now fully determined (float32)."""
        x = to_float(np.asarray(x).reshape(-1)).astype(np.float64)
        self._buf = np.concatenate([self._buf, x])
        self._n_in += x.size
        # output k needs inputs up to n0(k) + half: n0(k) <= n_in - 1 - half
        last_in = self._n_in - 1 - self.half
        k_end = 0 if last_in < 0 else (last_in * self.up) // self.down + 1
        k_end = min(k_end, self.total_out())
        return self._produce(k_end)

    def total_out(self) -> int:
        return int(round(Fraction(self._n_in * self.up, self.down)))

    def finish(self) -> np.ndarray:
        """The input ended: the remaining output samples (zeros are assumed past the end)."""
        self._buf = np.concatenate([self._buf, np.zeros(self.half + 1)])
        out = self._produce(self.total_out())
        return out


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited, anti-aliased resampling -> float32 of length round(len(x) * to_rate / from_rate).

    Windowed-sinc polyphase filter (Kaiser, 32 zero crossings each side) with its -6 dB point at 92% of
    the lower of the two Nyquist frequencies: flat within 0.05 dB up to 85% of it, and tones at or
    above the new Nyquist are attenuated by more than 90 dB. Zero phase: no delay is added. Past both
    ends of x the signal is taken as zero.
    """
    x = np.asarray(x)
    if x.ndim != 1:
        raise InputError("bad_audio", f"resample() needs mono samples [n], got shape {x.shape}")
    if int(from_rate) == int(to_rate):
        return to_float(x).copy()
    r = Resampler(from_rate, to_rate)
    step = 1 << 18  # in pieces, so the float64 working buffer stays small for long recordings
    parts = [r.feed(x[i:i + step]) for i in range(0, x.size, step)]
    parts.append(r.finish())
    return np.concatenate(parts)
